// Backward kernels of the spinal layer: at most two launches (docs/design.md), with G = dL/dy.
//
// Launch 1, spinal_bwd_chain_kernel (when dx, dWx, dWh or db is wanted). Block b owns rows 16 b .. 16 b + 15;
// rows are independent, so blocks never wait on each other. For i = L-1 .. 0 and each 64-column tile:
//     dH_i  = G @ Wo[:, i*w:(i+1)*w] + grad_H[:, i*w:(i+1)*w]      (GEMM with K = out)
//     carry = dZ_{i+1} @ Wh[slots[i+1]-1]                            (GEMM with K = w; i < L-1)
//     dZ_i  = (dH_i + carry) * act'(.)
// act' comes from H for relu, leaky_relu (slope >= 0), tanh, sigmoid, identity; for gelu, silu and
// leaky_relu with a negative slope (RECOMPUTE_Z) Z_i is recomputed from x and H by the forward's z_tile
// (spinal_common.cuh); act' is activation_derivative of csrc/spinal_activation.h.
// dZ_i goes to a workspace (B, L, w) in the accumulation type; the next (smaller) i reads the block's own
// rows of it back (the carry never leaves the block's rows). Then, if dx is wanted,
//     dx[:, (starts[i] + j) mod D] += dZ_i @ Wx[slots[i]]           (GEMM with K = w, N = c)
// accumulated in a (B, D) buffer of the accumulation type: within one sub-layer the c columns are distinct,
// and sub-layers are separated by barriers, so each add is done by one thread with no atomics.
//
// Launch 2, spinal_bwd_weights_kernel (when any weight gradient is wanted): one block per 16x64 tile of
// one gradient and piece of at most kWeightPieceRows rows of B, reducing over the piece's rows (and, for tied
// slots, over all sub-layers using the slot, in sub-layer order). A batch of one piece writes the gradient; a larger
// one writes partial tiles, and launch 3, spinal_bwd_reduce_kernel, sums them in piece order. Fixed orders:
// deterministic, no atomics.
//     dWx[s] = sum_{i: slots[i] = s} dZ_i.T @ x[:, idx_i]       db[s] = sum_{i: slots[i] = s} dZ_i.sum(0)
//     dWh[s] = sum_{i: slots[i] = s + 1} dZ_i.T @ h_{i-1}       dWo = G.T @ H,   dbo = G.sum(0)
// Tile products: for fp16 / bf16 both kernels run on tensor cores (Mma::kHalf, fp32 accumulation), their operands
// staged in the dtype: G, x, H and the weights as stored, dZ rounded to it (as the reference, computing in that dtype,
// rounds it; the products of 16-bit operands are exact in fp32, so the rounding of dZ is the only one before the fp32
// sums, over out, w or c terms in the chain and over B rows in the weights kernel). A recomputed Z is the forward's
// own (the same tile steps on the same staged operands). fp32 / fp64 use the FMA tile (fp64 accumulation for double).
// Rows past B are masked (loads give 0, stores skipped); no thread returns before a barrier.
#pragma once

#include "spinal_common.cuh"

namespace spinal_ops::cuda {

template <typename T>
struct BwdParams {
  const T* gy;             // (B, out) incoming gradient of y, or null
  const T* gh;             // (B, L*w) incoming gradient of H, or null
  const T* x;              // (B, D)
  const T* h_all;          // (B, L*w)
  const T* wx;             // (S, w, c)
  const T* wh;             // (S-1, w, w)
  const T* bias;           // (S, w) or null
  const T* wo;             // (out, L*w) or null
  const int* starts;       // (L)
  const int* slots;        // (L) weight slot of each sub-layer
  acc_t<T>* dz;            // (B, L, w) workspace written by launch 1, read by launch 2
  acc_t<T>* dx_acc;        // (B, D) accumulator of dx (may alias dx when T is the accumulation type)
  acc_t<T>* wpart;         // (weight_pieces(B), weight jobs, 16, 64) partial tiles, when B is split; else null
  T* dx;                   // (B, D) or null (not wanted)
  T* dwx;                  // (S, w, c) or null
  T* dwh;                  // (S-1, w, w) or null
  T* db;                   // (S, w) or null
  T* dwo;                  // (out, L*w) or null
  T* dbo;                  // (out) or null
  int rows, in_features, layers, width, chunk, out, x_slots, h_slots;
  acc_t<T> slope;
};

// The backward's tile product: tensor cores for fp16 / bf16, FMA otherwise.
template <typename T>
inline constexpr Mma kBwdMma = is_16bit<T> ? Mma::kHalf : Mma::kNone;

// Shared memory of the chain and weights launches: the staging carve alone.
template <typename T>
using BwdSmem = StageSmem<T, kBwdMma<T>>;

template <typename T, Activation ACT, bool RECOMPUTE_Z>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) spinal_bwd_chain_kernel(const BwdParams<T> p) {
  using Acc = acc_t<T>;
  using Smem = BwdSmem<T>;
  using S = typename Smem::S;
  using TileT = Tile<S, Acc, kBwdMma<T>>;
  unsigned char* smem = simt::dynamic_shared<unsigned char>();
  S* As = reinterpret_cast<S*>(smem);
  S* Bs = reinterpret_cast<S*>(smem + Smem::as);
  float* Cs = reinterpret_cast<float*>(smem + Smem::as + Smem::bs);

  const int B = p.rows, D = p.in_features, L = p.layers, w = p.width, c = p.chunk, out = p.out;
  const int64_t Lw = static_cast<int64_t>(L) * w;
  const int r0 = blockIdx.x * BM;
  const int row = r0 + own_row();
  const bool valid = row < B;
  const Acc zero_acc = Acc(0);
  auto dz_at = [&](int gr, int i, int k) -> Acc* { return p.dz + (static_cast<int64_t>(gr) * L + i) * w + k; };

  if (p.dx) {
    for (int64_t e = threadIdx.x; e < static_cast<int64_t>(BM) * D; e += kThreads) {  // BM * D: 64-bit
      const int gr = r0 + static_cast<int>(e / D);
      if (gr < B) p.dx_acc[static_cast<int64_t>(gr) * D + e % D] = zero_acc;
    }
  }

  for (int i = L - 1; i >= 0; --i) {
    const int xs = x_slot(p.slots, i);
    const T* Wx = p.wx + static_cast<int64_t>(xs) * w * c;
    const int start = p.starts[i];
    for (int n0 = 0; n0 < w; n0 += BN) {
      const int n_valid = valid_columns(w, n0);
      TileT g;
      g.zero_all();
      if (p.gy) {
        gemm<S>(g, out, n_valid, As, Bs,
                [&](int r, int k) -> S {
                  const int gr = r0 + r;
                  return gr < B ? convert<S>(p.gy[static_cast<int64_t>(gr) * out + k]) : zero<S>();
                },
                [&](int n, int k) -> S {
                  return n0 + n < w ? convert<S>(p.wo[static_cast<int64_t>(k) * Lw + static_cast<int64_t>(i) * w + n0 + n])
                                    : zero<S>();
                });
      }
      if (i < L - 1) {
        const T* Wn = p.wh + static_cast<int64_t>(h_slot(p.slots, i + 1)) * w * w;
        gemm<S>(g, w, n_valid, As, Bs,
                [&](int r, int k) -> S { return r0 + r < B ? convert<S>(*dz_at(r0 + r, i + 1, k)) : zero<S>(); },
                [&](int n, int k) -> S {
                  return n0 + n < w ? convert<S>(Wn[static_cast<int64_t>(k) * w + n0 + n]) : zero<S>();
                });
      }
      g.finish(Cs);
      Acc dh[kPerThread];  // this thread's results of the tile, before Cs serves the next one
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) dh[j] = g.get(Cs, j);
      Acc zv[kPerThread] = {};
      if constexpr (RECOMPUTE_Z) {
        TileT z;
        const T* Wh = i > 0 ? p.wh + static_cast<int64_t>(h_slot(p.slots, i)) * w * w : nullptr;
        z_tile<S>(z, As, Bs, p.x, B, D, r0, start, Wx, c, i > 0, Wh, w, n0, [&](int r, int k) -> S {
          const int gr = r0 + r;
          return gr < B ? convert<S>(p.h_all[gr * Lw + static_cast<int64_t>(i - 1) * w + k]) : zero<S>();
        });
        z.finish(Cs);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) zv[j] = z.get(Cs, j);
      }
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int n = n0 + own_col(j);
        if (n >= w || !valid) continue;
        const int64_t hidx = row * Lw + static_cast<int64_t>(i) * w + n;
        Acc d = dh[j];
        if (p.gh) d += convert<Acc>(p.gh[hidx]);
        Acc deriv;
        if constexpr (RECOMPUTE_Z) {
          Acc zz = zv[j];
          if (p.bias) zz += convert<Acc>(p.bias[static_cast<int64_t>(xs) * w + n]);
          deriv = activation_derivative<ACT, true>(zz, p.slope);
        } else {
          deriv = activation_derivative<ACT, false>(convert<Acc>(p.h_all[hidx]), p.slope);
        }
        *dz_at(row, i, n) = d * deriv;
      }
    }
    if (p.dx) {
      for (int n0 = 0; n0 < c; n0 += BN) {
        TileT a;
        a.zero_all();
        gemm<S>(a, w, valid_columns(c, n0), As, Bs,  // the opening barrier makes dZ_i visible to all
                [&](int r, int k) -> S { return r0 + r < B ? convert<S>(*dz_at(r0 + r, i, k)) : zero<S>(); },
                [&](int n, int k) -> S {
                  return n0 + n < c ? convert<S>(Wx[static_cast<int64_t>(k) * c + n0 + n]) : zero<S>();
                });
        a.finish(Cs);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          const int n = n0 + own_col(j);
          if (n >= c || !valid) continue;
          int col = start + n;
          col -= col >= D ? D : 0;
          p.dx_acc[static_cast<int64_t>(row) * D + col] += a.get(Cs, j);
        }
      }
    }
    __syncthreads();  // dZ_i is complete before sub-layer i-1 reads it as the carry
  }

  if (p.dx) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < static_cast<int64_t>(BM) * D; e += kThreads) {
      const int gr = r0 + static_cast<int>(e / D);
      if (gr < B) {
        const int64_t idx = static_cast<int64_t>(gr) * D + e % D;
        p.dx[idx] = convert<T>(p.dx_acc[idx]);
      }
    }
  }
}

// Number of 16x64 tiles of each weight gradient, in launch order (a kind that is not wanted has none).
struct WeightJobs {
  int wx, b, wh, wo, bo;
  __host__ __device__ int total() const { return wx + b + wh + wo + bo; }
};

__host__ __device__ inline int tiles(int n, int t) { return (n + t - 1) / t; }

template <typename T>
__host__ __device__ inline WeightJobs weight_jobs(const BwdParams<T>& p) {
  const int tw = tiles(p.width, BM);
  WeightJobs j{};
  j.wx = p.dwx ? p.x_slots * tw * tiles(p.chunk, BN) : 0;
  j.b = p.db ? p.x_slots * tw : 0;
  j.wh = p.dwh ? p.h_slots * tw * tiles(p.width, BN) : 0;
  j.wo = p.dwo ? tiles(p.out, BM) * tiles(p.layers * p.width, BN) : 0;
  j.bo = p.dbo ? tiles(p.out, BM) : 0;
  return j;
}

// Rows of B one block of the weights launch reduces: a larger batch splits each tile's reduction into pieces of
// kWeightPieceRows rows, one block each (so the blocks spread over the SMs instead of few blocks looping over every
// row), written as fp32 (fp64) partial tiles that spinal_bwd_reduce_kernel sums in piece order: a fixed order,
// deterministic, no atomics. 128 rows are 4 staging rounds of the FMA tile, 2 of the tensor-core one; of 64, 128, 256
// and 512 rows the GPU cost model (spinal_ops/gpu_model.py, `python -m spinal_ops gpu-model`) meets the most targets
// with 128 and 256 (no GPU has measured it), and 128 makes twice the blocks for batches of a few hundred rows.
constexpr int kWeightPieceRows = 128;
__host__ __device__ inline int weight_pieces(int rows) { return rows > kWeightPieceRows ? tiles(rows, kWeightPieceRows) : 1; }

// The 16x64 output tile of weight-gradient job `job` (weight_jobs order): where it goes and its extent.
template <typename T>
struct WeightTile {
  int kind;       // 0 dWx, 1 db, 2 dWh, 3 dWo, 4 dbo
  int slot;       // weight slot (dWx, db, dWh)
  int m0, n0;     // first row and column of the tile in the gradient
  int rows_out;   // rows of the gradient
  int cols;       // columns of the gradient (its row stride)
  T* dst;
};

template <typename T>
__host__ __device__ inline WeightTile<T> weight_tile(const BwdParams<T>& p, const WeightJobs& jobs, int job) {
  const int w = p.width, c = p.chunk, Lw = p.layers * p.width, tw = tiles(w, BM);
  if (job < jobs.wx) {
    const int tc = tiles(c, BN), s = job / (tw * tc), rem = job % (tw * tc);
    return {0, s, (rem / tc) * BM, (rem % tc) * BN, w, c, p.dwx + static_cast<int64_t>(s) * w * c};
  }
  if ((job -= jobs.wx) < jobs.b) return {1, job / tw, (job % tw) * BM, 0, w, 1, p.db + static_cast<int64_t>(job / tw) * w};
  if ((job -= jobs.b) < jobs.wh) {
    const int tc = tiles(w, BN), s = job / (tw * tc), rem = job % (tw * tc);
    return {2, s, (rem / tc) * BM, (rem % tc) * BN, w, w, p.dwh + static_cast<int64_t>(s) * w * w};
  }
  if ((job -= jobs.wh) < jobs.wo) {
    const int tc = tiles(Lw, BN);
    return {3, 0, (job / tc) * BM, (job % tc) * BN, p.out, Lw, p.dwo};
  }
  job -= jobs.wo;
  return {4, 0, job * BM, 0, p.out, 1, p.dbo};
}

// Grid: weight_jobs(p).total() x weight_pieces(B) blocks, piece-major (block = piece * jobs + job).
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) spinal_bwd_weights_kernel(const BwdParams<T> p) {
  using Acc = acc_t<T>;
  using Smem = BwdSmem<T>;
  using S = typename Smem::S;
  using TileT = Tile<S, Acc, kBwdMma<T>>;
  unsigned char* smem = simt::dynamic_shared<unsigned char>();
  S* As = reinterpret_cast<S*>(smem);
  S* Bs = reinterpret_cast<S*>(smem + Smem::as);
  float* Cs = reinterpret_cast<float*>(smem + Smem::as + Smem::bs);

  const int B = p.rows, D = p.in_features, L = p.layers, w = p.width, c = p.chunk, out = p.out;
  const int Lw = L * w;
  const S zero_s = zero<S>();
  const WeightJobs jobs = weight_jobs(p);
  const int job = blockIdx.x % jobs.total(), piece = blockIdx.x / jobs.total();
  const int r_begin = piece * kWeightPieceRows;
  const int rows = weight_pieces(B) == 1 ? B : (B - r_begin < kWeightPieceRows ? B - r_begin : kWeightPieceRows);
  const WeightTile<T> t = weight_tile(p, jobs, job);
  const int m0 = t.m0, n0 = t.n0;

  TileT acc;
  acc.zero_all();
  // Row r of the piece is row r_begin + r of the batch.
  auto dz = [&](int r, int i, int m) -> S {
    return m < w ? convert<S>(p.dz[(static_cast<int64_t>(r_begin + r) * L + i) * w + m]) : zero_s;
  };
  auto ones = [&](int n, int) -> S { return n == 0 ? convert<S>(1.0f) : zero_s; };

  if (t.kind == 0) {  // dWx[s] = sum_i dZ_i.T @ x[:, idx_i]
    for (int i = 0; i < L; ++i) {
      if (x_slot(p.slots, i) != t.slot) continue;  // uniform across the block: every thread skips together
      const int start = p.starts[i];
      gemm<S>(acc, rows, valid_columns(c, n0), As, Bs, [&](int m, int r) -> S { return dz(r, i, m0 + m); },
              [&](int n, int r) -> S {
                if (n0 + n >= c) return zero_s;
                int col = start + n0 + n;
                col -= col >= D ? D : 0;
                return convert<S>(p.x[static_cast<int64_t>(r_begin + r) * D + col]);
              });
    }
  } else if (t.kind == 1) {  // db[s] = sum_i dZ_i.sum(0): column 0 of dZ_i.T @ ones
    for (int i = 0; i < L; ++i) {
      if (x_slot(p.slots, i) != t.slot) continue;
      gemm<S>(acc, rows, 1, As, Bs, [&](int m, int r) -> S { return dz(r, i, m0 + m); }, ones);
    }
  } else if (t.kind == 2) {  // dWh[s] = sum_i dZ_i.T @ h_{i-1}
    for (int i = 1; i < L; ++i) {
      if (h_slot(p.slots, i) != t.slot) continue;
      gemm<S>(acc, rows, valid_columns(w, n0), As, Bs, [&](int m, int r) -> S { return dz(r, i, m0 + m); },
              [&](int n, int r) -> S {
                return n0 + n < w ? convert<S>(p.h_all[static_cast<int64_t>(r_begin + r) * Lw + (i - 1) * w + n0 + n])
                                  : zero_s;
              });
    }
  } else if (p.gy) {
    const auto g = [&](int m, int r) -> S {
      return m0 + m < out ? convert<S>(p.gy[static_cast<int64_t>(r_begin + r) * out + m0 + m]) : zero_s;
    };
    if (t.kind == 3) {  // dWo = G.T @ H
      gemm<S>(acc, rows, valid_columns(Lw, n0), As, Bs, g, [&](int n, int r) -> S {
        return n0 + n < Lw ? convert<S>(p.h_all[static_cast<int64_t>(r_begin + r) * Lw + n0 + n]) : zero_s;
      });
    } else {  // dbo = G.sum(0)
      gemm<S>(acc, rows, 1, As, Bs, g, ones);
    }
  }
  acc.finish(Cs);

  const int m = m0 + own_row();
  if (weight_pieces(B) > 1) {  // a partial tile, every owned element, for spinal_bwd_reduce_kernel
    Acc* part = p.wpart + static_cast<int64_t>(blockIdx.x) * BM * BN;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) part[own_row() * BN + own_col(j)] = acc.get(Cs, j);
    return;
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int n = n0 + own_col(j);
    if (m < t.rows_out && n < t.cols) t.dst[static_cast<int64_t>(m) * t.cols + n] = convert<T>(acc.get(Cs, j));
  }
}

// The second pass of a split weights launch: block `job` sums the job's partial tiles in piece order and writes the
// tile of the gradient. No shared memory, no barriers.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) spinal_bwd_reduce_kernel(const BwdParams<T> p) {
  using Acc = acc_t<T>;
  const WeightJobs jobs = weight_jobs(p);
  const int job = blockIdx.x, pieces = weight_pieces(p.rows);
  const WeightTile<T> t = weight_tile(p, jobs, job);
  const int m = t.m0 + own_row();
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int n = t.n0 + own_col(j);
    Acc sum = Acc(0);
    for (int q = 0; q < pieces; ++q)
      sum += p.wpart[(static_cast<int64_t>(q) * jobs.total() + job) * BM * BN + own_row() * BN + own_col(j)];
    if (m < t.rows_out && n < t.cols) t.dst[static_cast<int64_t>(m) * t.cols + n] = convert<T>(sum);
  }
}

}  // namespace spinal_ops::cuda
