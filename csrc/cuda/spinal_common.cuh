// Pieces shared by the spinal kernels: types, the block-tile GEMM every phase uses, and the Z tile (the
// sub-layer's pre-activation) that the forward computes and the backward recomputes. The activations are
// csrc/spinal_activation.h, shared with the CPU kernel.
//
// Block tile: BM = 16 rows x BN = 64 columns, reduced in slices of kSlice<S> terms (128 for 16-bit staged
// operands, else 32), kThreads = 128 threads (4 warps).
//   * BM = 16 is the row size of a wmma tile, so the tensor-core path covers a block tile with one row of
//     16x16 tiles, one per warp (4 warps x 16 columns = BN). Small BM also keeps many row tiles per SM for
//     typical batches (B = 256 gives 16 blocks).
//   * A slice is one staging round: the loads of a round are all in flight at once, and the barrier that ends it
//     waits for the slowest, so a round's bytes bound what a block streams per L2 round trip. 32 terms are two
//     16-deep wmma steps (four 8-deep tf32 steps) and keep the staged fp32 / fp64 operands small: (BM + BN) *
//     (32 + 8) elements, 12.8 KB in fp32, 25.6 KB in fp64. 16-bit operands take 128-term slices (eight wmma
//     steps): 20 KB of loads per round (2.5 KB with 16 terms), 21.3 KB staged. The GPU cost model
//     (spinal_ops/gpu_model.py) chose 128 over 64 (the per-round bytes bound a block's stream from L2): 2 more of its
//     192 rows within 1.5x of the floor at B >= 1024 and 2 more within 2x at B <= 64, no row lost; not measured.
//   * kThreads = 128: each thread owns 8 results of the 16x64 tile in the FMA path (registers: 8
//     accumulators), and 4 warps match the 4 wmma column tiles.
// Narrow layers and short chunks fill a tile partly: gemm() passes each step the slice's valid terms and the tile's
// valid columns, and the steps skip what is padding (Tile::step), so a 20-wide layer or a 4-term chunk does not pay
// for a 64-column, 32-deep tile.
// These are derived from the tile geometry (see README.md for the occupancy they give), not from a sweep:
// no GPU is available to measure one.
//
// Ownership of the results of a tile (both paths, after `finish`): thread t owns row t / 8 and columns
// t % 8 + 8 * j, j = 0..7. Every epilogue uses this mapping, so a value accumulated across phases by the
// same (row, column) is always touched by the same thread.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../spinal_activation.h"
#include "simt.h"

namespace spinal_ops::cuda {

constexpr int kThreads = 128;
// Second __launch_bounds__ argument. Without it ptxas 13.0 capped these kernels at 64 registers and
// spilled (measured: up to 80 bytes of spill stores); asking for 2 resident blocks per SM only caps them at
// 255, and they settle at 70-168 registers with no spills (see README.md for the occupancy that gives).
constexpr int kMinBlocksPerSM = 2;
constexpr int BM = 16;
constexpr int BN = 64;
template <typename S>
inline constexpr int kSlice = sizeof(S) == 2 ? 128 : 32;  // terms per staging round (a multiple of every wmma K)
template <typename S>
inline constexpr int kLds = kSlice<S> + 8;  // staged row stride: a multiple of 8 elements (wmma ldm rule), breaks
                                            // bank stride
constexpr int LDC = BN + 4;  // fp32 result tile stride (multiple of 4 floats, the wmma store rule)
constexpr int kPerThread = BM * BN / kThreads;  // 8 results per thread
constexpr int kColsPerRow = BN / kPerThread;     // 8 threads share a row

// How a tile product is computed: FMA (fp32/fp64), tensor cores on 16-bit operands (fp16/bf16), or tensor
// cores on tf32-rounded fp32 operands.
enum class Mma : int { kNone = 0, kHalf, kTf32 };

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
// Accumulation type: fp32 for every dtype but fp64.
template <typename T>
using acc_t = typename AccOf<T>::type;

// Type of the staged operands: the input dtype on tensor cores, fp32 for tf32, else the accumulation type.
template <typename T, Mma M>
using stage_t = std::conditional_t<M == Mma::kHalf, T, std::conditional_t<M == Mma::kTf32, float, acc_t<T>>>;

template <typename T>
inline constexpr bool is_16bit = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, __half>) {  // intrinsics: torch builds without implicit conversions
    return convert<To>(__half2float(v));
  } else if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return convert<To>(__bfloat162float(v));
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

template <typename T>
__device__ __forceinline__ T zero() {
  return convert<T>(0.0f);
}

// Weight slots (tying): sub-layer i uses weight_x[slots[i]], bias[slots[i]] and, for i >= 1,
// weight_h[slots[i] - 1]; a slot may serve several sub-layers (their gradient terms add up).
__device__ __forceinline__ int x_slot(const int* slots, int i) { return slots[i]; }
__device__ __forceinline__ int h_slot(const int* slots, int i) { return slots[i] - 1; }

// ------------------------------------------------------------------------------------ block-tile GEMM
// A tile result C[BM][BN] += A[BM][K] * B[BN][K]^T, with A and B produced element-wise by loaders
// (a(r, k), b(n, k) return the staged type, zero outside the problem). Staged in shared memory:
// As[BM][LDS] and Bs[BN][LDS] (B is stored n-major, i.e. column-major for the wmma B operand).
template <typename S, typename Acc, Mma M>
struct Tile;

// FMA path: thread t accumulates its 8 owned results in registers. A step multiplies the slice's k_valid staged
// terms only (the rest are zero padding) and skips result j where columns 8j .. 8j + 7 are all past n_valid: the
// same j for every thread, so warps skip it together (a 20-wide layer computes 24 of the tile's 64 columns).
template <typename S, typename Acc>
struct Tile<S, Acc, Mma::kNone> {
  Acc v[kPerThread];
  __device__ __forceinline__ void zero_all() {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) v[j] = Acc(0);
  }
  __device__ __forceinline__ void step(const S* As, const S* Bs, int k_valid, int n_valid) {
    constexpr int LDS = kLds<S>;
    const int r = threadIdx.x / kColsPerRow, c = threadIdx.x % kColsPerRow;
#pragma unroll 4
    for (int k = 0; k < k_valid; ++k) {
      const Acc a = As[r * LDS + k];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        if (kColsPerRow * j < n_valid) v[j] += a * Bs[(c + kColsPerRow * j) * LDS + k];
      }
    }
  }
  __device__ __forceinline__ void finish(float*) {}
  __device__ __forceinline__ Acc get(const float*, int j) const { return v[j]; }
};

// Tensor-core path: warp q owns the 16x16 result tile of columns 16q..16q+15. A step runs the wmma K-steps that
// hold some of the slice's k_valid terms, and a warp whose 16 columns are all past n_valid skips its steps (its
// accumulator stays zero; those columns are never read).
template <typename S, Mma M>
struct WmmaShape {
  static constexpr int K = M == Mma::kTf32 ? 8 : 16;
  using In = std::conditional_t<M == Mma::kTf32, nvcuda::wmma::precision::tf32, S>;
};

template <typename S, Mma M>
struct WmmaTile {
  using Shape = WmmaShape<S, M>;
  static constexpr int MK = Shape::K;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, MK, float> c;
  __device__ __forceinline__ void zero_all() { nvcuda::wmma::fill_fragment(c, 0.0f); }
  __device__ __forceinline__ void step(const S* As, const S* Bs, int k_valid, int n_valid) {
    using namespace nvcuda;
    constexpr int LDS = kLds<S>;
    const int q = threadIdx.x / 32;
    if (16 * q >= n_valid) return;  // uniform across the warp
    wmma::fragment<wmma::matrix_a, 16, 16, MK, typename Shape::In, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, MK, typename Shape::In, wmma::col_major> b;
#pragma unroll
    for (int k = 0; k < k_valid; k += MK) {
      wmma::load_matrix_sync(a, As + k, LDS);
      wmma::load_matrix_sync(b, Bs + q * 16 * LDS + k, LDS);
      if constexpr (M == Mma::kTf32) {
        for (int e = 0; e < a.num_elements; ++e) a.x[e] = nvcuda::wmma::__float_to_tf32(a.x[e]);
        for (int e = 0; e < b.num_elements; ++e) b.x[e] = nvcuda::wmma::__float_to_tf32(b.x[e]);
      }
      wmma::mma_sync(c, a, b, c);
    }
  }
  // Publishes the warp tiles to Cs[BM][LDC] so each thread can read its owned results. Reached by every
  // thread of the block (it holds barriers).
  __device__ __forceinline__ void finish(float* Cs) {
    __syncthreads();  // earlier readers of Cs are done
    nvcuda::wmma::store_matrix_sync(Cs + (threadIdx.x / 32) * 16, c, LDC, nvcuda::wmma::mem_row_major);
    __syncthreads();
  }
  __device__ __forceinline__ float get(const float* Cs, int j) const {
    const int r = threadIdx.x / kColsPerRow, col = threadIdx.x % kColsPerRow + kColsPerRow * j;
    return Cs[r * LDC + col];
  }
};

template <typename S>
struct Tile<S, float, Mma::kHalf> : WmmaTile<S, Mma::kHalf> {};
template <typename S>
struct Tile<S, float, Mma::kTf32> : WmmaTile<S, Mma::kTf32> {};

// Columns of a BN-wide tile starting at column n0 of an `extent`-wide result that lie inside it (at most BN): the
// n_valid that gemm() takes.
__host__ __device__ constexpr int valid_columns(int extent, int n0) { return extent - n0 < BN ? extent - n0 : BN; }

// Accumulates A[BM][K] * B[BN][K]^T into `acc`. Every thread of the block calls it with the same K and n_valid: the
// rows of B (columns of the result) that b() does not zero, at most BN (the steps skip the others).
template <typename S, typename TileT, typename ALoad, typename BLoad>
__device__ __forceinline__ void gemm(TileT& acc, int K, int n_valid, S* As, S* Bs, ALoad a, BLoad b) {
  constexpr int BK = kSlice<S>, LDS = kLds<S>;
  const int t = threadIdx.x;
  for (int k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();  // the previous step's readers of As / Bs are done; earlier epilogue writes are visible
    for (int e = t; e < BM * BK; e += kThreads) {
      const int r = e / BK, k = e % BK;
      As[r * LDS + k] = k0 + k < K ? a(r, k0 + k) : zero<S>();
    }
    for (int e = t; e < BN * BK; e += kThreads) {
      const int n = e / BK, k = e % BK;
      Bs[n * LDS + k] = k0 + k < K ? b(n, k0 + k) : zero<S>();
    }
    __syncthreads();
    acc.step(As, Bs, K - k0 < BK ? K - k0 : BK, n_valid);
  }
}

// ------------------------------------------------------------------------------------------- Z tile
// Z_i without the bias for the block's rows r0 .. r0 + 15 and columns n0 .. n0 + 63 of sub-layer i:
//     z = x[:, (start + k) mod D] @ Wx.T            (K = c; start < D and k < c <= D, so one subtraction wraps)
//       + h_{i-1} @ Wh.T                            (K = w; when recurrent, i.e. i >= 1)
// Wx / Wh are the sub-layer's weight slots; h_prev(r, k) returns h_{i-1}[r0 + r, k] as S (zero past B). The one
// definition of Z for the forward (spinal_fwd_kernel.cuh) and the backward chain's recomputation
// (spinal_bwd_kernel.cuh). Every thread of the block calls it (it holds barriers).
template <typename S, typename TileT, typename T, typename HPrev>
__device__ __forceinline__ void z_tile(TileT& z, S* As, S* Bs, const T* x, int B, int D, int r0, int start,
                                       const T* Wx, int c, bool recurrent, const T* Wh, int w, int n0,
                                       HPrev h_prev) {
  z.zero_all();
  const int n_valid = valid_columns(w, n0);
  gemm<S>(z, c, n_valid, As, Bs,
          [&](int r, int k) -> S {
            const int gr = r0 + r;
            if (gr >= B) return zero<S>();
            int col = start + k;
            col -= col >= D ? D : 0;
            return convert<S>(x[static_cast<int64_t>(gr) * D + col]);
          },
          [&](int n, int k) -> S {
            return n0 + n < w ? convert<S>(Wx[static_cast<int64_t>(n0 + n) * c + k]) : zero<S>();
          });
  if (recurrent) {
    gemm<S>(z, w, n_valid, As, Bs, h_prev, [&](int n, int k) -> S {
      return n0 + n < w ? convert<S>(Wh[static_cast<int64_t>(n0 + n) * w + k]) : zero<S>();
    });
  }
}

// Owned row / column of result j of this thread.
__device__ __forceinline__ int own_row() { return threadIdx.x / kColsPerRow; }
__device__ __forceinline__ int own_col(int j) { return threadIdx.x % kColsPerRow + kColsPerRow * j; }

// Round a byte offset up to 128 (wmma needs 256-bit aligned tile pointers; 128 keeps every carve aligned).
__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// The staging carve every kernel's shared memory starts with (bytes), in this order: As[BM][LDS] and Bs[BN][LDS] of
// the staged type of T under M, and Cs[BM][LDC] (fp32 results of the wmma tiles; tensor cores only).
template <typename T, Mma M>
struct StageSmem {
  using S = stage_t<T, M>;
  static constexpr size_t as = align128(sizeof(S) * BM * kLds<S>);
  static constexpr size_t bs = align128(sizeof(S) * BN * kLds<S>);
  static constexpr size_t cs = M == Mma::kNone ? 0 : align128(sizeof(float) * BM * LDC);
  static constexpr size_t bytes = as + bs + cs;
};

}  // namespace spinal_ops::cuda
