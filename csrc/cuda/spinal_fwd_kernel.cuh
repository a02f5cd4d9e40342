// Forward kernel of the spinal layer: one launch computes H and y (docs/design.md).
//
// Mapping. Block b owns rows r0 = 16 b .. r0 + 15 of x, H and y (rows are independent in the forward, so
// blocks never wait on each other). The block walks the sub-layers i = 0 .. L-1 in order; for each one it
// computes the tile Z_i[16, w] in column tiles of 64 (z_tile in spinal_common.cuh):
//     Z_i = x[:, idx_i] @ Wx[slot].T          (the input projection: a GEMM with K = c, read straight from
//                                             x with the wrap-around column map (starts[i] + k) mod D)
//         + h_{i-1} @ Wh[slot].T              (the recurrence: K = w)
//         + b[slot]
// then h_i = act(Z_i) (csrc/spinal_activation.h), written to H; then the head y[16, out] += h_i @ Wo[:, i*w:(i+1)*w].T.
// Each column tile is a block-tile GEMM (spinal_common.cuh): 4 warps, 16x64 results, K staged in slices of
// kSlice terms (32; 128 for 16-bit operands) through shared memory; thread t owns row t / 8, columns t % 8 + 8 j of
// the tile.
//
// On-chip state.
//   * Fast path (WFAST = 64, taken when w <= 64, the common SpinalNet widths 20, 50, 64): one column tile
//     covers w, and h_{i-1} / h_i live in two shared-memory buffers [16][64] (ping-pong); the recurrence
//     never touches global memory.
//   * General path (WFAST = 0, any w): h_{i-1} is read back from the block's own rows of H, which the block
//     wrote in the previous sub-layer (visible after the __syncthreads that opens every staging round; the
//     16 x w values stay in L1/L2). This bounds shared memory whatever w is.
//   * The head accumulator y[16][out] is fp32 (fp64 for double) in shared memory when it fits in 16 KB,
//     else in a global workspace (B, out) whose elements are each owned by one thread. y is written once,
//     after the last sub-layer (+ head bias), in the output dtype.
// Tensor cores: fp16/bf16 operands (MMA = kHalf) or tf32-rounded fp32 operands (kTf32) through wmma with
// fp32 accumulation; fp32/fp64 otherwise with FMA (MMA = kNone). h is rounded to the output dtype before
// it feeds the next sub-layer, exactly as the reference computed in that dtype.
// Assumptions: x, weights contiguous (checked by check_forward_args); 1 <= c <= D; starts[i] in [0, D);
// rows past B are masked (loads give 0, stores are skipped), never returned from, so every thread reaches
// every barrier.
#pragma once

#include "spinal_common.cuh"

namespace spinal_ops::cuda {

template <typename T>
struct FwdParams {
  const T* x;              // (B, D)
  const T* wx;             // (S, w, c)
  const T* wh;             // (S-1, w, w)
  const T* bias;           // (S, w) or null
  const T* wo;             // (out, L*w) or null (hidden mode)
  const T* bo;             // (out) or null
  const int* starts;       // (L) first column of each chunk
  const int* slots;        // (L) weight slot of each sub-layer
  T* h_all;                // (B, L*w) output H
  T* y;                    // (B, out) output y, or null (hidden mode)
  acc_t<T>* y_ws;          // (B, out) head accumulator in global memory, or null: in shared memory
  int rows, in_features, layers, width, chunk, out;
  acc_t<T> slope;
};

// Shared-memory carve of the forward kernel (bytes), in this order: the staging carve (StageSmem: As, Bs, Cs), the
// two h buffers (fast path only), the head accumulator (when it is kept on chip).
template <typename T, int WFAST, Mma MMA>
struct FwdSmem : StageSmem<T, MMA> {
  using Stage = StageSmem<T, MMA>;
  static constexpr size_t hb = align128(sizeof(T) * 2 * BM * WFAST);
  static constexpr size_t fixed = Stage::bytes + hb;
  // The head's accumulators stay on chip up to 16 KB (the 16- and 32-bit blocks then stay under 48 KB of dynamic
  // shared memory; fp64's fast path goes over it, and launch() in simt.h opts in above 48 KB).
  static constexpr size_t kYaccLimit = 16 * 1024;
  static __host__ __device__ size_t yacc(int out) { return align128(sizeof(acc_t<T>) * BM * out); }
  static __host__ __device__ bool yacc_on_chip(int out) { return yacc(out) <= kYaccLimit; }
  static __host__ __device__ size_t bytes(int out, bool head) {
    return fixed + (head && yacc_on_chip(out) ? yacc(out) : 0);
  }
};

template <typename T, Activation ACT, int WFAST, Mma MMA>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) spinal_fwd_kernel(const FwdParams<T> p) {
  using Acc = acc_t<T>;
  using S = stage_t<T, MMA>;
  using Smem = FwdSmem<T, WFAST, MMA>;
  using TileT = Tile<S, Acc, MMA>;
  static_assert(WFAST == 0 || WFAST == BN, "the fast path covers w with one column tile");

  unsigned char* smem = simt::dynamic_shared<unsigned char>();
  S* As = reinterpret_cast<S*>(smem);
  S* Bs = reinterpret_cast<S*>(smem + Smem::as);
  float* Cs = reinterpret_cast<float*>(smem + Smem::as + Smem::bs);
  T* hbuf = reinterpret_cast<T*>(smem + Smem::as + Smem::bs + Smem::cs);
  Acc* yacc_smem = reinterpret_cast<Acc*>(smem + Smem::fixed);

  const int B = p.rows, D = p.in_features, L = p.layers, w = p.width, c = p.chunk, out = p.out;
  const int64_t Lw = static_cast<int64_t>(L) * w;
  const int r0 = blockIdx.x * BM;
  const int er = own_row();
  const int row = r0 + er;
  const bool valid = row < B;  // masks rows past B (no early return: barriers follow)
  const bool head = p.wo != nullptr;
  // Head accumulator row of this thread: shared memory, or the global workspace (null for masked rows).
  Acc* yrow = p.y_ws ? (valid ? p.y_ws + static_cast<int64_t>(row) * out : nullptr) : yacc_smem + er * out;

  for (int i = 0; i < L; ++i) {
    const int xs = x_slot(p.slots, i);
    const T* Wx = p.wx + static_cast<int64_t>(xs) * w * c;
    const T* Wh = i > 0 ? p.wh + static_cast<int64_t>(h_slot(p.slots, i)) * w * w : nullptr;
    const int start = p.starts[i];
    T* h_prev_s = hbuf + ((i + 1) & 1) * BM * WFAST;
    T* h_cur_s = hbuf + (i & 1) * BM * WFAST;

    // h_{i-1}[r, k]
    auto load_h_prev = [&](int r, int k) -> S {
      if constexpr (WFAST > 0) {
        return convert<S>(h_prev_s[r * WFAST + k]);
      } else {
        const int gr = r0 + r;
        return gr < B ? convert<S>(p.h_all[gr * Lw + static_cast<int64_t>(i - 1) * w + k]) : zero<S>();
      }
    };

    const int n_end = WFAST > 0 ? BN : w;
    for (int n0 = 0; n0 < n_end; n0 += BN) {
      TileT z;
      z_tile<S>(z, As, Bs, p.x, B, D, r0, start, Wx, c, i > 0, Wh, w, n0, load_h_prev);
      z.finish(Cs);
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int n = n0 + own_col(j);
        if (n >= w) continue;
        Acc zz = z.get(Cs, j);
        if (p.bias) zz += convert<Acc>(p.bias[static_cast<int64_t>(xs) * w + n]);
        const T h = convert<T>(activation_forward<ACT>(zz, p.slope));
        if (valid) p.h_all[row * Lw + static_cast<int64_t>(i) * w + n] = h;
        if constexpr (WFAST > 0) h_cur_s[er * WFAST + n] = valid ? h : zero<T>();
      }
    }

    if (head) {
      __syncthreads();  // h_i complete before the head reads it
      auto load_h_cur = [&](int r, int k) -> S {
        if constexpr (WFAST > 0) {
          return convert<S>(h_cur_s[r * WFAST + k]);
        } else {
          const int gr = r0 + r;
          return gr < B ? convert<S>(p.h_all[gr * Lw + static_cast<int64_t>(i) * w + k]) : zero<S>();
        }
      };
      for (int o0 = 0; o0 < out; o0 += BN) {
        TileT yt;
        yt.zero_all();
        gemm<S>(yt, w, valid_columns(out, o0), As, Bs, load_h_cur, [&](int n, int k) -> S {
          return o0 + n < out ? convert<S>(p.wo[static_cast<int64_t>(o0 + n) * Lw + static_cast<int64_t>(i) * w + k])
                              : zero<S>();
        });
        yt.finish(Cs);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          const int o = o0 + own_col(j);
          if (o >= out || yrow == nullptr) continue;
          const Acc acc = (i == 0 ? Acc(0) : yrow[o]) + yt.get(Cs, j);
          if (i < L - 1) {
            yrow[o] = acc;
          } else if (valid) {
            p.y[static_cast<int64_t>(row) * out + o] = convert<T>(acc + (p.bo ? convert<Acc>(p.bo[o]) : Acc(0)));
          }
        }
      }
    }
    __syncthreads();  // h buffers swap roles; H of sub-layer i is visible to the next one
  }
}

}  // namespace spinal_ops::cuda
