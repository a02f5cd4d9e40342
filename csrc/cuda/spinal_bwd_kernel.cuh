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
// one gradient, reducing over all B rows (and, for tied slots, over all sub-layers using the slot, in sub-layer
// order) in a fixed order: deterministic, no atomics, no second reduction pass.
//     dWx[s] = sum_{i: slots[i] = s} dZ_i.T @ x[:, idx_i]       db[s] = sum_{i: slots[i] = s} dZ_i.sum(0)
//     dWh[s] = sum_{i: slots[i] = s + 1} dZ_i.T @ h_{i-1}       dWo = G.T @ H,   dbo = G.sum(0)
// Both launches use the FMA block tile (spinal_common.cuh) with fp32 accumulation (fp64 for double), for
// every dtype: the backward reductions run over B rows, where fp16 staging would lose precision.
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
  T* dx;                   // (B, D) or null (not wanted)
  T* dwx;                  // (S, w, c) or null
  T* dwh;                  // (S-1, w, w) or null
  T* db;                   // (S, w) or null
  T* dwo;                  // (out, L*w) or null
  T* dbo;                  // (out) or null
  int rows, in_features, layers, width, chunk, out, x_slots, h_slots;
  acc_t<T> slope;
};

// Shared memory of both backward launches: the FMA staging tiles.
template <typename T>
struct BwdSmem {
  static constexpr size_t as = align128(sizeof(acc_t<T>) * BM * kLds<acc_t<T>>);
  static constexpr size_t bytes = as + align128(sizeof(acc_t<T>) * BN * kLds<acc_t<T>>);
};

template <typename T, Activation ACT, bool RECOMPUTE_Z>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) spinal_bwd_chain_kernel(const BwdParams<T> p) {
  using Acc = acc_t<T>;
  using TileT = Tile<Acc, Acc, Mma::kNone>;
  unsigned char* smem = simt::dynamic_shared<unsigned char>();
  Acc* As = reinterpret_cast<Acc*>(smem);
  Acc* Bs = reinterpret_cast<Acc*>(smem + BwdSmem<T>::as);

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
        gemm<Acc>(g, out, n_valid, As, Bs,
                  [&](int r, int k) -> Acc {
                    const int gr = r0 + r;
                    return gr < B ? convert<Acc>(p.gy[static_cast<int64_t>(gr) * out + k]) : zero_acc;
                  },
                  [&](int n, int k) -> Acc {
                    return n0 + n < w ? convert<Acc>(p.wo[static_cast<int64_t>(k) * Lw + static_cast<int64_t>(i) * w + n0 + n])
                                      : zero_acc;
                  });
      }
      if (i < L - 1) {
        const T* Wn = p.wh + static_cast<int64_t>(h_slot(p.slots, i + 1)) * w * w;
        gemm<Acc>(g, w, n_valid, As, Bs,
                  [&](int r, int k) -> Acc { return r0 + r < B ? *dz_at(r0 + r, i + 1, k) : zero_acc; },
                  [&](int n, int k) -> Acc {
                    return n0 + n < w ? convert<Acc>(Wn[static_cast<int64_t>(k) * w + n0 + n]) : zero_acc;
                  });
      }
      TileT z;
      if constexpr (RECOMPUTE_Z) {
        const T* Wh = i > 0 ? p.wh + static_cast<int64_t>(h_slot(p.slots, i)) * w * w : nullptr;
        z_tile<Acc>(z, As, Bs, p.x, B, D, r0, start, Wx, c, i > 0, Wh, w, n0, [&](int r, int k) -> Acc {
          const int gr = r0 + r;
          return gr < B ? convert<Acc>(p.h_all[gr * Lw + static_cast<int64_t>(i - 1) * w + k]) : zero_acc;
        });
      }
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int n = n0 + own_col(j);
        if (n >= w || !valid) continue;
        const int64_t hidx = row * Lw + static_cast<int64_t>(i) * w + n;
        Acc d = g.get(nullptr, j);
        if (p.gh) d += convert<Acc>(p.gh[hidx]);
        Acc deriv;
        if constexpr (RECOMPUTE_Z) {
          Acc zz = z.get(nullptr, j);
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
        gemm<Acc>(a, w, valid_columns(c, n0), As, Bs,  // the opening barrier makes dZ_i visible to all
                  [&](int r, int k) -> Acc { return r0 + r < B ? *dz_at(r0 + r, i, k) : zero_acc; },
                  [&](int n, int k) -> Acc {
                    return n0 + n < c ? convert<Acc>(Wx[static_cast<int64_t>(k) * c + n0 + n]) : zero_acc;
                  });
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          const int n = n0 + own_col(j);
          if (n >= c || !valid) continue;
          int col = start + n;
          col -= col >= D ? D : 0;
          p.dx_acc[static_cast<int64_t>(row) * D + col] += a.get(nullptr, j);
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

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) spinal_bwd_weights_kernel(const BwdParams<T> p) {
  using Acc = acc_t<T>;
  using TileT = Tile<Acc, Acc, Mma::kNone>;
  unsigned char* smem = simt::dynamic_shared<unsigned char>();
  Acc* As = reinterpret_cast<Acc*>(smem);
  Acc* Bs = reinterpret_cast<Acc*>(smem + BwdSmem<T>::as);

  const int B = p.rows, D = p.in_features, L = p.layers, w = p.width, c = p.chunk, out = p.out;
  const int Lw = L * w;
  const Acc zero_acc = Acc(0);
  const WeightJobs jobs = weight_jobs(p);
  int job = blockIdx.x;
  const int tw = tiles(w, BM);

  TileT acc;
  acc.zero_all();
  T* dst = nullptr;  // gradient tile destination (row-major, `cols` columns)
  int m0 = 0, n0 = 0, rows_out = 0, cols = 0;
  auto dz = [&](int r, int i, int m) -> Acc {
    return m < w ? p.dz[(static_cast<int64_t>(r) * L + i) * w + m] : zero_acc;
  };
  auto ones = [&](int n, int) -> Acc { return n == 0 ? Acc(1) : zero_acc; };

  if (job < jobs.wx) {  // dWx[s] = sum_i dZ_i.T @ x[:, idx_i]
    const int tc = tiles(c, BN);
    const int s = job / (tw * tc), rem = job % (tw * tc);
    m0 = (rem / tc) * BM, n0 = (rem % tc) * BN, rows_out = w, cols = c;
    dst = p.dwx + static_cast<int64_t>(s) * w * c;
    for (int i = 0; i < L; ++i) {
      if (x_slot(p.slots, i) != s) continue;  // uniform across the block: every thread skips together
      const int start = p.starts[i];
      gemm<Acc>(acc, B, valid_columns(cols, n0), As, Bs, [&](int m, int r) -> Acc { return dz(r, i, m0 + m); },
                [&](int n, int r) -> Acc {
                  if (n0 + n >= c) return zero_acc;
                  int col = start + n0 + n;
                  col -= col >= D ? D : 0;
                  return convert<Acc>(p.x[static_cast<int64_t>(r) * D + col]);
                });
    }
  } else if ((job -= jobs.wx) < jobs.b) {  // db[s] = sum_i dZ_i.sum(0): column 0 of dZ_i.T @ ones
    const int s = job / tw;
    m0 = (job % tw) * BM, n0 = 0, rows_out = w, cols = 1;
    dst = p.db + static_cast<int64_t>(s) * w;
    for (int i = 0; i < L; ++i) {
      if (x_slot(p.slots, i) != s) continue;
      gemm<Acc>(acc, B, 1, As, Bs, [&](int m, int r) -> Acc { return dz(r, i, m0 + m); }, ones);
    }
  } else if ((job -= jobs.b) < jobs.wh) {  // dWh[s] = sum_i dZ_i.T @ h_{i-1}
    const int tc = tiles(w, BN);
    const int s = job / (tw * tc), rem = job % (tw * tc);
    m0 = (rem / tc) * BM, n0 = (rem % tc) * BN, rows_out = w, cols = w;
    dst = p.dwh + static_cast<int64_t>(s) * w * w;
    for (int i = 1; i < L; ++i) {
      if (h_slot(p.slots, i) != s) continue;
      gemm<Acc>(acc, B, valid_columns(cols, n0), As, Bs, [&](int m, int r) -> Acc { return dz(r, i, m0 + m); },
                [&](int n, int r) -> Acc {
                  return n0 + n < w ? convert<Acc>(p.h_all[static_cast<int64_t>(r) * Lw + (i - 1) * w + n0 + n])
                                    : zero_acc;
                });
    }
  } else if ((job -= jobs.wh) < jobs.wo) {  // dWo = G.T @ H
    const int tc = tiles(Lw, BN);
    m0 = (job / tc) * BM, n0 = (job % tc) * BN, rows_out = out, cols = Lw;
    dst = p.dwo;
    if (p.gy) {
      gemm<Acc>(acc, B, valid_columns(cols, n0), As, Bs,
                [&](int m, int r) -> Acc {
                  return m0 + m < out ? convert<Acc>(p.gy[static_cast<int64_t>(r) * out + m0 + m]) : zero_acc;
                },
                [&](int n, int r) -> Acc {
                  return n0 + n < Lw ? convert<Acc>(p.h_all[static_cast<int64_t>(r) * Lw + n0 + n]) : zero_acc;
                });
    }
  } else {  // dbo = G.sum(0)
    job -= jobs.wo;
    m0 = job * BM, n0 = 0, rows_out = out, cols = 1;
    dst = p.dbo;
    if (p.gy) {
      gemm<Acc>(acc, B, 1, As, Bs,
                [&](int m, int r) -> Acc {
                  return m0 + m < out ? convert<Acc>(p.gy[static_cast<int64_t>(r) * out + m0 + m]) : zero_acc;
                },
                ones);
    }
  }

  const int m = m0 + own_row();
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int n = n0 + own_col(j);
    if (m < rows_out && n < cols) dst[static_cast<int64_t>(m) * cols + n] = convert<T>(acc.get(nullptr, j));
  }
}

}  // namespace spinal_ops::cuda
