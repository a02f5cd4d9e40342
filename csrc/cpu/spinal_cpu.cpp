// Fused C++ CPU kernels of the spinal ops (backend `cpu`): forward and backward, float32 and float64, and
// bfloat16 / float16 with float32 arithmetic (see "Reduced precision" below).
//
// Layout: x (B, D) and H (B, L*w) row-major; sub-layer i owns columns [i*w, (i+1)*w) of H.
//
// Forward, per row tile (RowTiles: independent jobs, run in parallel):
//   for i = 0 .. L-1:  H_i  = x[:, s_i : s_i+c1] @ Wx_i[:, :c1].T          (one product)
//                      H_i += x[:, 0 : c2]      @ Wx_i[:, c1:].T          (only when the chunk wraps)
//                      H_i += H_{i-1} @ Wh_i.T                            (i >= 1: the recurrence)
//                      H_i  = act(H_i + b_i)                              (in place, one pass)
//   y = H @ Wo.T + bo                                                     (head mode)
// The tile of H is written and read back while it is still in cache. A batch that is one tile splits each
// sub-layer's products into column blocks instead (ColumnSplit), one job each, with a join per sub-layer. Layers of
// short products (transposes) run each tile transposed, the tile's rows along the vectors (forward_tile_transposed).
//
// Backward, with G = dL/dy and dH = G @ Wo (+ grad_H):
//   chain, per row tile: dZ_i = (dH_i + carry) * act'(.) for i = L-1 .. 0, written over dH in one (B, L*w) scratch
//      tensor; carry = dZ_i @ Wh_i; dx[:, chunk_i] += dZ_i @ Wx_i (scatter with wrap, in sub-layer order, so the sum
//      order is fixed; with several tiles the first sub-layer to reach a column writes it: no zero fill of dx, and
//      streaming stores where no other sub-layer adds into it: Backward::dx_stream). act' comes from H, or from Z
//      recomputed from x and H for gelu, silu and leaky_relu with a negative slope.
//   weight gradients, products over all rows: dWx_i = dZ_i.T @ x_chunk, dWh_i = dZ_i.T @ H_{i-1}, dWo[:, block i] =
//      G.T @ H_i, in jobs of at most kWeightRows output rows; a slot that serves several sub-layers (tied weights)
//      gets per-sub-layer partials that are added in sub-layer order afterwards; bias gradients are column sums in
//      row order (with several tiles and no tied slot, jobs of the same round: bias_gradient).
//   Several tiles: the chain of every tile (one job each), then the weight gradients. One tile: per sub-layer, dZ_i
//      (column blocks), then carry, dx and sub-layer i's weight gradients as the jobs of one round; the head's
//      weight gradient joins the first round. (A small batch has little chain work to spread, but a wide layer has
//      weight-sized gradients to write at any batch size.)
// The products go through csrc/cpu/spinal_gemm.h, the jobs through csrc/cpu/spinal_parallel.h, the activations
// through csrc/spinal_activation.h (shared with the CUDA kernels).
//
// Reduced precision: bfloat16 and float16 calls run the float32 kernels on the weights as they are stored: each
// weight element is widened to float32 in the registers as the kernels load it (kernels::load_wide; a W^T packed
// for the axpy kernel is widened as it is packed), so a call makes no float32 copy of the weights. x, the biases
// and the incoming gradients (activation-sized) are widened on entry; the results (H, y, the gradients) are
// rounded back to the input dtype once, on exit. (The backward of an activation whose act' needs Z recomputes the
// float32 H rather than widen the rounded one.) Every product and sum is float32 and the chain keeps float32
// between sub-layers, so the error is that of one rounding of each result (the reference rounds after every op),
// and the results are those of the float32 kernels on the widened tensors, rounded, bit for bit (tested), except
// that products on reduced weights never go to the BLAS (use_blas; AVX2 and baseline CPUs), and that on a CPU with
// AVX512_BF16 the input products x Wx^T of bfloat16 calls run on bfloat16 pairs (x and Wx as stored, Wx packed in
// pairs where float32 would pack W^T (pack_weights); kernels::pair_gemm and pair_dot_gemm), at twice the float32
// rate, and so does the recurrence H_{i-1} Wh_i^T where act' comes from H (recurrence_pairs: H_{i-1} rounded to
// bfloat16 as the call returns it, as the reference rounds it). The head keeps float32 operands, and so does the
// backward's chain (dZ and the carry); from 16 rows (backward_pairs) its weight gradients dZ_i^T x_chunk and
// dZ_i^T H_{i-1} run on pairs of rows (WeightPairs: dZ rounded to bfloat16, as the reference rounds it; x as stored,
// H rounded), and dx += dZ_i Wx_i on dZ_i rounded and Wx packed in pairs of rows (Problem::wxr). The weight gradients
// of a bfloat16 call without tied slots are written in bfloat16 by the kernels (the same rounding, one pass fewer).
//
// Determinism: every element of every product is summed in an order fixed by the problem sizes
// (csrc/cpu/spinal_gemm.h; products on the BLAS run it single-threaded) and the split into jobs depends only on the
// sizes (csrc/cpu/spinal_parallel.h), so outputs and gradients are bitwise identical across runs and across thread
// counts.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "../spinal_args.h"
#include "spinal_gemm.h"
#include "spinal_parallel.h"

namespace spinal_ops::cpu {
namespace {

// Raw pointers and sizes of one call, and the packed W^T of the NT products that run on it (packs_transposed). The
// weights are stored as S: T, or bfloat16 / float16 read as stored and widened to T = float32 in the kernels.
template <typename T, typename S = T>
struct Problem {
  SpinalDims d;
  const int64_t* starts;
  const T* x;    // (B, D)
  const S* wx;   // (Lx, w, c)
  const S* wh;   // (Lh, w, w)
  const T* b;    // (Lx, w) or nullptr
  const S* wo;   // (out, L*w) or nullptr
  const T* bo;   // (out) or nullptr
  const T* wxt = nullptr;  // per slot (c, ldwxt): Wx_s^T, or nullptr
  const T* wht = nullptr;  // per slot (w, ldwht): Wh_s^T, or nullptr
  const T* wot = nullptr;  // (L*w, ldwot): Wo^T, or nullptr
  int64_t ldwxt = 0, ldwht = 0, ldwot = 0;
  // bfloat16 calls whose input products run on bfloat16 pairs (pairs_run): x as stored, and per slot Wx_s packed
  // in pairs (ceil(c / 2), ldwxp; pack_pairs) where pack_weights packs them, else null
  const S* xs = nullptr;
  const uint32_t* wxp = nullptr;
  int64_t ldwxp = 0;
  // ... and whose recurrence H_{i-1} Wh_i^T runs on pairs too (hpairs: recurrence_pairs), H_{i-1} rounded to bfloat16
  // as the call returns it: per slot Wh_s packed in pairs (ceil(w / 2), ldwhp) where pack_weights packs them, else
  // null (Wh as stored, the dot form)
  bool hpairs = false;
  const uint32_t* whp = nullptr;
  int64_t ldwhp = 0;
  // ... and whose backward's dx runs on pairs (input_gradient_pairs): per slot Wx_s packed in pairs of rows
  // ((w + 1) / 2, ldwxr; pack_row_pairs), else null
  const uint32_t* wxr = nullptr;
  int64_t ldwxr = 0;

  const S* wx_slot(int64_t i) const { return wx + d.x_slot(i) * d.width * d.chunk; }
  const S* wh_slot(int64_t i) const { return wh + d.h_slot(i) * d.width * d.width; }
  const T* b_slot(int64_t i) const { return b ? b + d.x_slot(i) * d.width : nullptr; }
  NtOperand<T, S> wx_op(int64_t i) const {
    return {wx_slot(i), d.chunk, wxt ? wxt + d.x_slot(i) * d.chunk * ldwxt : nullptr, ldwxt};
  }
  NtOperand<T, S> wh_op(int64_t i) const {
    return {wh_slot(i), d.width, wht ? wht + d.h_slot(i) * d.width * ldwht : nullptr, ldwht};
  }
  NtOperand<T, S> wo_op() const { return {wo, d.hidden(), wot, ldwot}; }
  const uint32_t* wxp_slot(int64_t i) const { return wxp + d.x_slot(i) * ((d.chunk + 1) / 2) * ldwxp; }
  const uint32_t* whp_slot(int64_t i) const { return whp + d.h_slot(i) * ((d.width + 1) / 2) * ldwhp; }
  const uint32_t* wxr_slot(int64_t i) const { return wxr + d.x_slot(i) * ((d.width + 1) / 2) * ldwxr; }
};

// x and the biases are T tensors (x undefined where the input products run on bfloat16 pairs), the weights S tensors.
template <typename T, typename S>
Problem<T, S> make_problem(const SpinalDims& d, c10::IntArrayRef starts, const at::Tensor& x, const at::Tensor& wx,
                           const at::Tensor& wh, const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& wo, const std::optional<at::Tensor>& bo) {
  return Problem<T, S>{d,
                       starts.data(),
                       x.defined() ? x.const_data_ptr<T>() : nullptr,
                       wx.const_data_ptr<S>(),
                       wh.const_data_ptr<S>(),
                       b ? b->const_data_ptr<T>() : nullptr,
                       wo ? wo->const_data_ptr<S>() : nullptr,
                       bo ? bo->const_data_ptr<T>() : nullptr};
}

// Packs W^T of the forward's NT products that run on it (packs_transposed) into `buffer` (T: reduced weights are
// widened as they are packed), one job per weight slot, and points p at it. The input products of a call on
// bfloat16 pairs (p.xs set) take Wx packed in pairs instead, into `pairs`, where float32 would pack W^T, and Wx as
// stored elsewhere (the dot form); a recurrence on pairs (p.hpairs) takes Wh so too. Measured with bfloat16 forwards of SpinalLinear (AMD EPYC Zen 5, 2 threads,
// median of 20 calls, microseconds; packed / as stored): vgg-head B = 64 90 / 78, 128 150 / 153, 256 234 / 300,
// 1024 717 / 1065; wide-resnet-head 64 1652 / 818, 128 1656 / 1546, 256 3284 / 4022, 512 5153 / 6614, 1024 9562 /
// 12650; wide-resnet-custom 64 4013 / 2355, 128 4933 / 4708, 256 9681 / 11022, 1024 28816 / 36614.
template <typename T, typename S>
void pack_weights(Problem<T, S>& p, int64_t tile_rows, bool with_head, at::Tensor& buffer, at::Tensor& pairs) {
  const SpinalDims& d = p.d;
  const int64_t rows = d.rows, w = d.width, c = d.chunk, lw = d.hidden();
  bool px = packs_transposed(rows, tile_rows, w, c);
  bool ph = d.h_slots > 0 && packs_transposed(rows, tile_rows, w, w);
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const bool xp = p.xs != nullptr && px, hp = p.hpairs && ph;  // packed in pairs instead
    if (xp || hp) {
      px = px && !xp, ph = ph && !hp;
      const int64_t ldp = pair_ld(w), xslot = (c + 1) / 2 * ldp, hslot = (w + 1) / 2 * ldp;
      const int64_t xsize = xp ? d.x_slots * xslot : 0, xjobs = xp ? d.x_slots : 0;
      pairs = at::empty({xsize + (hp ? d.h_slots * hslot : 0)}, at::TensorOptions().dtype(at::kInt));
      uint32_t* out = reinterpret_cast<uint32_t*>(pairs.mutable_data_ptr<int32_t>());
      run_jobs(xjobs + (hp ? d.h_slots : 0), pairs.numel(), [&](int64_t job) {
        if (job < xjobs) return pack_pairs(w, c, p.wx + job * w * c, c, out + job * xslot, ldp);
        const int64_t s = job - xjobs;
        pack_pairs(w, w, p.wh + s * w * w, w, out + xsize + s * hslot, ldp);
      });
      if (xp) p.wxp = out, p.ldwxp = ldp;
      if (hp) p.whp = out + xsize, p.ldwhp = ldp;
    }
  }
  const bool po = with_head && d.has_head && packs_transposed(rows, tile_rows, d.out, lw);
  if (!(px || ph || po)) return;
  const int64_t ldw = packed_ld<T>(w), ldo = po ? packed_ld<T>(d.out) : 0;
  const int64_t xsize = px ? d.x_slots * c * ldw : 0, hsize = ph ? d.h_slots * w * ldw : 0;
  buffer = at::empty({xsize + hsize + (po ? lw * ldo : 0)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>()));
  T* out = buffer.mutable_data_ptr<T>();
  const int64_t xjobs = px ? d.x_slots : 0, hjobs = ph ? d.h_slots : 0;
  run_jobs(xjobs + hjobs + (po ? 1 : 0), xsize + hsize + (po ? lw * ldo : 0), [&](int64_t job) {
    if (job < xjobs) {
      pack_transposed(w, c, p.wx + job * w * c, c, out + job * c * ldw, ldw);
    } else if (job < xjobs + hjobs) {
      const int64_t s = job - xjobs;
      pack_transposed(w, w, p.wh + s * w * w, w, out + xsize + s * w * ldw, ldw);
    } else {
      pack_transposed(d.out, lw, p.wo, lw, out + xsize + hsize, ldo);
    }
  });
  if (px) p.wxt = out, p.ldwxt = ldw;
  if (ph) p.wht = out + xsize, p.ldwht = ldw;
  if (po) p.wot = out + xsize + hsize, p.ldwot = ldo;
}

// Columns [n0, n0 + n) of x_chunk_i @ Wx_i^T (rows [r0, r0 + m)) into z (ldz; z points at column n0): on bfloat16
// pairs where p.xs is set (Wx packed in pairs, a wrapping chunk gathered into one row first; or Wx as stored, the
// dot form), else on the float32 kernels.
template <typename T, typename S>
void input_product(const Problem<T, S>& p, int64_t i, int64_t r0, int64_t m, int64_t n0, int64_t n, T* z,
                   int64_t ldz) {
  const SpinalDims& d = p.d;
  const int64_t s = p.starts[i];
  const int64_t c1 = std::min(d.chunk, d.in_features - s);
  const int64_t c2 = d.chunk - c1;
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (p.wxp != nullptr) {
      const S* a = p.xs + r0 * d.in_features + s;
      int64_t lda = d.in_features;
      std::vector<S> gathered;
      if (c2 > 0) {
        gathered.resize(static_cast<size_t>(m * d.chunk));
        for (int64_t r = 0; r < m; ++r) {
          const S* row = p.xs + (r0 + r) * d.in_features;
          std::copy_n(row + s, c1, &gathered[r * d.chunk]);
          std::copy_n(row, c2, &gathered[r * d.chunk + c1]);
        }
        a = gathered.data(), lda = d.chunk;
      }
      return pair_product(m, n, d.chunk, a, lda, p.wxp_slot(i) + n0, p.ldwxp, z, ldz, false);
    }
    if (p.xs != nullptr) {
      const S* xr = p.xs + r0 * d.in_features;
      const S* wxi = p.wx_slot(i) + n0 * d.chunk;
      pair_dot_product(m, n, c1, xr + s, d.in_features, wxi, d.chunk, z, ldz, false);
      if (c2 > 0) pair_dot_product(m, n, c2, xr, d.in_features, wxi + c1, d.chunk, z, ldz, true);
      return;
    }
  }
  const NtOperand<T, S> wxi = p.wx_op(i).shifted(n0, 0);
  nt_gemm(m, n, c1, p.x + r0 * d.in_features + s, d.in_features, wxi, false, z, ldz);
  if (c2 > 0) nt_gemm(m, n, c2, p.x + r0 * d.in_features, d.in_features, wxi.shifted(0, c1), true, z, ldz);
}

// Columns [n0, n1) of Z_i (rows [r0, r0+m), sub-layer i) into z (ldz; z points at column n0), from x and
// H_{i-1}; the bias is NOT added. Output column n of Z_i reads row n of Wx_i and of Wh_i.
template <typename T, typename S>
void input_and_recurrent_product(const Problem<T, S>& p, int64_t i, int64_t r0, int64_t m, int64_t n0, int64_t n1,
                                 const T* h_all, T* z, int64_t ldz) {
  const SpinalDims& d = p.d;
  const int64_t lw = d.hidden();
  const int64_t n = n1 - n0;
  input_product(p, i, r0, m, n0, n, z, ldz);
  if (i == 0) return;
  const T* h_prev = h_all + r0 * lw + (i - 1) * d.width;
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (p.hpairs) {
      // H_{i-1} as the call returns it (vcvtneps2bf16 flushes a denormal to zero where the narrowing keeps it: the
      // pairs read a bfloat16 denormal as zero either way)
      const std::unique_ptr<S[]> rounded(new S[static_cast<size_t>(m * d.width)]);
      round_rows_bf16(m, d.width, h_prev, lw, rounded.get(), d.width);
      if (p.whp != nullptr) {
        return pair_product(m, n, d.width, rounded.get(), d.width, p.whp_slot(i) + n0, p.ldwhp, z, ldz, true);
      }
      return pair_dot_product(m, n, d.width, rounded.get(), d.width, p.wh_slot(i) + n0 * d.width, d.width, z, ldz,
                              true);
    }
  }
  nt_gemm(m, n, d.width, h_prev, lw, p.wh_op(i).shifted(n0, 0), true, z, ldz);
}

// h = act(h + bias), m rows of n columns of one sub-layer (row stride ld), one call per tile (see chain_rule);
// locals and __restrict let the loop vectorize.
template <Activation A, typename T>
SPINAL_CLONES void bias_activation(int64_t m, int64_t n, T* __restrict h, int64_t ld, const T* __restrict bias,
                                   T slope) {
  for (int64_t r = 0; r < m; ++r) {
    T* __restrict row = h + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = activation_forward<A>(row[j] + bias[j], slope);
  }
}

// dz = (dz + carry) * act'(.), m rows of n columns of one sub-layer (row strides ldz, ldc, ldh): act' from z + bias
// (kFromZ, hz holds Z without the bias) or from h (hz holds H; bias unused). One call per tile: the rows of a
// narrow layer are short (20-50 columns), so the call and the loop's remainder are paid once per tile, not per row.
template <Activation A, bool kFromZ, typename T>
SPINAL_CLONES void chain_rule(int64_t m, int64_t n, T* __restrict dz, int64_t ldz, const T* __restrict carry,
                              int64_t ldc, const T* __restrict hz, int64_t ldh, const T* __restrict bias, T slope) {
  for (int64_t r = 0; r < m; ++r) {
    T* __restrict d = dz + r * ldz;
    const T* __restrict cr = carry + r * ldc;
    const T* __restrict h = hz + r * ldh;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T g = activation_derivative<A, kFromZ>(kFromZ ? h[j] + bias[j] : h[j], slope);
      d[j] = (d[j] + cr[j]) * g;
    }
  }
}

template <Activation A, typename T, typename S>
void forward_tile(const Problem<T, S>& p, int64_t r0, int64_t m, T* h_all, T* y, const T* zero_bias, bool one_tile) {
  const SpinalDims& d = p.d;
  const int64_t lw = d.hidden();
  const T slope = static_cast<T>(d.negative_slope);
  const int64_t layer_work = m * d.width * (d.chunk + d.width);
  const ColumnSplit split = ColumnSplit::make(d.width, layer_work, one_tile);
  for (int64_t i = 0; i < d.layers; ++i) {
    T* hi = h_all + r0 * lw + i * d.width;
    const T* bi = p.b ? p.b_slot(i) : zero_bias;
    run_jobs(split.blocks, layer_work, [&](int64_t blk) {
      const int64_t n0 = split.begin(blk), n1 = split.end(blk);
      input_and_recurrent_product(p, i, r0, m, n0, n1, h_all, hi + n0, lw);
      bias_activation<A>(m, n1 - n0, hi + n0, lw, bi + n0, slope);
    });
  }
  if (d.has_head) {
    T* yt = y + r0 * d.out;
    nt_gemm(m, d.out, lw, h_all + r0 * lw, lw, p.wo_op(), false, yt, d.out);
    if (p.bo) {
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < d.out; ++j) yt[r * d.out + j] += p.bo[j];
    }
  }
}

// Whether the forward's row tiles run transposed (forward_tile_transposed): layers whose products all have fewer than
// kTransposedTerms terms (chunk and width), where the dot kernel's lane sums cost as much as its few vector
// multiply-adds per output, whose act' comes from H (the backward recomputes Z for the others, the usual way), in tiles
// of at least transposed_rows() rows (32 with AVX-512, 16 otherwise: two vectors of float32 rows with AVX-512 and AVX2;
// several tiles: one tile splits its columns instead). Measured with float32 forwards of SpinalLinear (2 threads,
// alternating runs, transposed / not, median microseconds over 0.5-1 s): on an AMD EPYC Zen 5 (AVX-512) regression (c =
// 4, w = 50) B = 1024 (tiles of 128 rows) 112 / 145, B = 256 (32 rows) 44 / 59 and 43 / 48, B = 128 (16 rows, one
// vector) 42 / 29 and 34 / 35, B = 64 (16 rows) 23 / 21 three times; vit-custom (c = 128, w = 20) B = 1024 214 / 194
// and resnet-head (c = 256, w = 20) 183 / 144, so long chunks stay on the dot kernel. On an AMD EPYC Zen 1 (AVX2: 16
// rows are two vectors; minimum of 7 blocks, three alternating rounds) regression B = 32 74-75 / 83-91, B = 64 92-98 /
// 108-126, B = 128 132-140 / 152-191; capped to the baseline set (four vectors of 4) no difference at 16 rows (B = 64
// 118-128 / 116-125).
inline constexpr int64_t kTransposedTerms = 64;
inline int64_t transposed_rows() { return vector_isa() == Isa::kAvx512 ? 32 : 16; }
bool transposes(const SpinalDims& d, const RowTiles& tiles) {
  return d.width < kTransposedTerms && d.chunk < kTransposedTerms && tiles.count > 1 &&
         tiles.size >= transposed_rows() && !needs_preactivation(d.activation, d.negative_slope);
}

// row = act(row + bias), one row of a transposed sub-layer (one output column of Z over the tile's rows).
template <Activation A, typename T>
SPINAL_CLONES void bias_activation_column(T* __restrict row, T bias, int64_t n, T slope) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = activation_forward<A>(row[j] + bias, slope);
}

// One row tile of a layer of short products (transposes), transposed: the rows of the tile run along the vectors of
// the axpy kernel (16 rows per AVX-512 vector) instead of the terms of the dot kernel (50 terms: 4 vectors and a lane
// sum per output). Z_i^T (w x m) = Wx_i @ x_chunk^T + Wh_i @ H_{i-1}^T, act in place, y^T = Wo @ H^T; x_chunk^T is
// gathered per sub-layer, H^T and y^T are transposed into h_all and y at the end.
template <Activation A, typename T>
void forward_tile_transposed(const Problem<T, T>& p, int64_t r0, int64_t m, T* h_all, T* y, const T* zero_bias) {
  const SpinalDims& d = p.d;
  const int64_t lw = d.hidden(), w = d.width, c = d.chunk, in = d.in_features;
  const T slope = static_cast<T>(d.negative_slope);
  std::vector<T> xt(static_cast<size_t>(c * m)), ht(static_cast<size_t>(lw * m));
  for (int64_t i = 0; i < d.layers; ++i) {
    const int64_t s = p.starts[i], c1 = std::min(c, in - s);
    transpose(m, c1, p.x + r0 * in + s, in, xt.data(), m);
    transpose(m, c - c1, p.x + r0 * in, in, xt.data() + c1 * m, m);  // the wrapped part
    T* zt = ht.data() + i * w * m;
    nn_gemm<T>(false, w, m, c, p.wx_slot(i), c, xt.data(), m, false, zt, m);
    if (i > 0) nn_gemm<T>(false, w, m, w, p.wh_slot(i), w, zt - w * m, m, true, zt, m);
    const T* bi = p.b ? p.b_slot(i) : zero_bias;
    for (int64_t n = 0; n < w; ++n) bias_activation_column<A>(zt + n * m, bi[n], m, slope);
  }
  transpose(lw, m, ht.data(), m, h_all + r0 * lw, lw);
  if (d.has_head) {
    std::vector<T> yt(static_cast<size_t>(d.out * m));
    nn_gemm<T>(false, d.out, m, lw, p.wo, lw, ht.data(), m, false, yt.data(), m);
    if (p.bo) {
      for (int64_t j = 0; j < d.out; ++j)
        for (int64_t r = 0; r < m; ++r) yt[j * m + r] += p.bo[j];
    }
    transpose(d.out, m, yt.data(), m, y + r0 * d.out, d.out);
  }
}

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// A bfloat16/float16 tensor widened to float32 (absent stays absent).
at::Tensor widen(const at::Tensor& t) { return t.to(at::kFloat); }
std::optional<at::Tensor> widen(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(widen(*t)) : std::nullopt;
}

// What only the cpu kernels require: CPU float32/float64 tensors, and sizes that fit the 32-bit integers of the
// Fortran BLAS interface (rows are the `k` of the weight-gradient GEMMs; D, L*w and out are leading dimensions).
void check_cpu_args(const SpinalDims& d, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || is_reduced(x),
              "spinal_ops cpu backend: x must be float32, float64, bfloat16 or float16, got ", x.scalar_type(),
              " (the reference backend runs every dtype: spinal_ops.use_backend('reference'))");
  TORCH_CHECK(x.device().is_cpu(), "spinal_ops cpu backend: x must be a CPU tensor, got ", x.device());
  check_index_limits(d, "cpu",
                     {"the 32-bit sizes of the BLAS interface",
                      "fewer than 2^31 rows, in_features, L*w and out_features (offsets are 64-bit)",
                      "split the batch, or use the reference backend (spinal_ops.use_backend('reference'))"});
}

// Whether a bfloat16 call whose input products run on pairs runs its recurrence H_{i-1} Wh_i^T on pairs too, H_{i-1}
// rounded to bfloat16 as the call returns it (the reference rounds it so too): where act' comes from H, which the
// backward then reads as returned. Not for gelu, silu and leaky_relu with a negative slope: their backward recomputes
// Z from the float32 chain, and the rounding could move Z across the kink of leaky_relu (and with it act').
inline bool recurrence_pairs(const SpinalDims& d) { return !needs_preactivation(d.activation, d.negative_slope); }

// H (and y) of one call into h_all and y (T tensors): x and the biases are T, the weights S (see Problem).
// x_stored: x as given where its input products run on bfloat16 pairs (pairs_run; Problem::xs), or null.
template <typename T, typename S>
void forward_kernel(const SpinalDims& d, c10::IntArrayRef starts, const at::Tensor& x, const at::Tensor& weight_x,
                    const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias,
                    const at::Tensor* x_stored, at::Tensor& h_all, at::Tensor& y) {
  auto p = make_problem<T, S>(d, starts, x, weight_x, weight_h, bias, head_weight, head_bias);
  if (x_stored) p.xs = x_stored->const_data_ptr<S>();
  p.hpairs = x_stored != nullptr && recurrence_pairs(d);
  const RowTiles tiles = RowTiles::make(d, sizeof(T));
  const bool transposed = std::is_same_v<S, T> && transposes(d, tiles);
  at::Tensor packed, pairs;
  // Transposed tiles read the weights as stored (they are the left operand there): nothing to pack.
  if (!transposed) pack_weights(p, std::min(tiles.size, d.rows), /*with_head=*/true, packed, pairs);
  T* hp = h_all.mutable_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const std::vector<T> zero_bias(static_cast<size_t>(d.width), T(0));
  with_activation(d.activation, [&](auto act) {
    for_each_tile(tiles, d.rows * row_work(d), [&](int64_t r0, int64_t m, bool one_tile) {
      if constexpr (std::is_same_v<S, T>) {
        if (transposed) return forward_tile_transposed<decltype(act)::value>(p, r0, m, hp, yp, zero_bias.data());
      }
      forward_tile<decltype(act)::value>(p, r0, m, hp, yp, zero_bias.data(), one_tile);
    });
  });
}

// Whether the input products of a call with x run on bfloat16 pairs: every bfloat16 call where the CPU has them
// (x is then passed as stored, Problem::xs, and not widened).
bool pairs_run(const at::Tensor& x) { return x.scalar_type() == at::kBFloat16 && bf16_pairs(); }

// The float32 H and y of a bfloat16 / float16 call: x (unless pairs_run) and the biases widened, the weights read
// as stored.
std::tuple<at::Tensor, at::Tensor> reduced_forward(const SpinalDims& d, c10::IntArrayRef starts, const at::Tensor& x,
                                                   const at::Tensor& weight_x, const at::Tensor& weight_h,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& head_weight,
                                                   const std::optional<at::Tensor>& head_bias) {
  const bool pairs = pairs_run(x);
  const at::Tensor x32 = pairs ? at::Tensor() : widen(x);
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor h_all = at::empty({d.rows, d.hidden()}, options);
  at::Tensor y = at::empty({d.rows, d.out}, options);
  if (!pairs && transposes(d, RowTiles::make(d, sizeof(float)))) {  // short products: small weights, widened
    forward_kernel<float, float>(d, starts, x32, widen(weight_x), widen(weight_h), widen(bias), widen(head_weight),
                                 widen(head_bias), nullptr, h_all, y);
    return {h_all, y};
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "spinal_forward_cpu", [&] {
    forward_kernel<float, scalar_t>(d, starts, x32, weight_x, weight_h, widen(bias), head_weight, widen(head_bias),
                                    pairs ? &x : nullptr, h_all, y);
  });
  return {h_all, y};
}

std::tuple<at::Tensor, at::Tensor> spinal_forward_cpu(const at::Tensor& x, const at::Tensor& weight_x,
                                                      const at::Tensor& weight_h,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& head_weight,
                                                      const std::optional<at::Tensor>& head_bias,
                                                      c10::IntArrayRef starts, c10::IntArrayRef slots,
                                                      c10::string_view activation, double negative_slope) {
  const SpinalDims d = check_forward_args("cpu", x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots,
                                          activation, negative_slope);
  check_cpu_args(d, x);
  if (is_reduced(x)) {
    auto [h32, y32] = reduced_forward(d, starts, x, weight_x, weight_h, bias, head_weight, head_bias);
    return {h32.to(x.scalar_type()), y32.to(x.scalar_type())};
  }
  at::Tensor h_all = at::empty({d.rows, d.hidden()}, x.options());
  at::Tensor y = at::empty({d.rows, d.out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spinal_forward_cpu", [&] {
    forward_kernel<scalar_t, scalar_t>(d, starts, x, weight_x, weight_h, bias, head_weight, head_bias, nullptr, h_all,
                                       y);
  });
  return {h_all, y};
}

// The chain of the backward for sub-layer i of one row tile: dz (B, L*w) holds dH_i on entry, dZ_i on exit. Columns
// [n0, n0+n) of the sub-layer (with Z_i recomputed for those columns when act' needs it; zbuf holds m x w).
template <Activation A, typename T, typename S>
void chain_columns(const Problem<T, S>& p, int64_t i, int64_t r0, int64_t m, int64_t n0, int64_t n, const T* h_all,
                   T* dz, const T* carry, T* zbuf, const T* zero_bias) {
  const SpinalDims& d = p.d;
  const int64_t lw = d.hidden(), w = d.width;
  const T slope = static_cast<T>(d.negative_slope);
  T* dzi = dz + r0 * lw + i * w;
  if constexpr (kDerivativeFromZ<A>) {
    if (needs_preactivation(d.activation, d.negative_slope)) {
      const T* bi = p.b ? p.b_slot(i) : zero_bias;
      input_and_recurrent_product(p, i, r0, m, n0, n0 + n, h_all, zbuf + n0, w);
      chain_rule<A, true>(m, n, dzi + n0, lw, carry + n0, w, zbuf + n0, w, bi + n0, slope);
      return;
    }
  }
  if constexpr (kDerivativeFromH<A>) {
    const T* hi = h_all + r0 * lw + i * w;
    chain_rule<A, false>(m, n, dzi + n0, lw, carry + n0, w, hi + n0, lw, zero_bias, slope);
  }
}

// The types of the calls whose backward products may run on bfloat16 pairs: float32 arithmetic on bfloat16 weights.
template <typename T, typename S>
inline constexpr bool kPairTypes = std::is_same_v<T, float> && std::is_same_v<S, c10::BFloat16>;

// dx[:, (s_i + j) mod D] += dZ_i @ Wx_i[:, j] for the chunk columns j in [j0, j1), rows [r0, r0+m), split where
// the chunk wraps. On bfloat16 pairs where p.wxr is set: dz16 holds the rows of dZ_i rounded to bfloat16 (m x w).
// first (D entries), where given: the sub-layer whose product reaches each column of x first (the chain runs from
// L-1 down: the last sub-layer whose chunk holds the column), or -1 where no chunk does; the columns that sub-layer i
// reaches first are written (=), not added into, so dx needs no zero fill before the chain (the same sums: 0 + v is
// v, up to the sign of a zero). stream: those columns are written with streaming stores (kernels::Out::kStream; see
// Backward::dx_stream).
template <typename T, typename S>
void input_gradient(const Problem<T, S>& p, int64_t i, int64_t r0, int64_t m, int64_t j0, int64_t j1, const T* dz,
                    T* dx, const c10::BFloat16* dz16 = nullptr, const int32_t* first = nullptr, bool stream = false) {
  const SpinalDims& d = p.d;
  const int64_t lw = d.hidden(), w = d.width;
  const int64_t s = p.starts[i];
  const int64_t c1 = std::min(d.chunk, d.in_features - s);  // chunk columns before the wrap
  const T* dzi = dz + r0 * lw + i * w;
  const S* wxi = p.wx_slot(i);
  T* dxt = dx + r0 * d.in_features;
  auto product = [&](int64_t a, int64_t b, T* out, bool add) {  // chunk columns [a, b) into out
    if constexpr (kPairTypes<T, S>) {
      if (p.wxr) return pair_product(m, b - a, w, dz16, w, p.wxr_slot(i) + a, p.ldwxr, out, d.in_features, add);
    }
    nn_gemm<T>(false, m, b - a, w, dzi, lw, wxi + a, d.chunk, add, out, d.in_features, stream && !add);
  };
  auto segment = [&](int64_t a, int64_t b, int64_t col) {  // chunk columns [a, b), from column col of x on
    if (first == nullptr) return product(a, b, dxt + col, true);
    while (a < b) {  // runs of columns written / added into
      const bool add = first[col] != i;
      int64_t e = a + 1;
      while (e < b && (first[col + (e - a)] != i) == add) ++e;
      product(a, e, dxt + col, add);
      col += e - a, a = e;
    }
  };
  if (j0 < c1) segment(j0, std::min(j1, c1), s + j0);
  if (j1 > c1) {
    const int64_t b0 = std::max(j0, c1);
    segment(b0, j1, b0 - c1);
  }
}

// The weight-gradient jobs: a product over all rows for output rows [j0, j1) of one sub-layer's dWx_i or dWh_i, or
// of the head's block of dWo that H_i feeds (kHead: rows of out); or the bias gradients' column sums of dZ over
// columns [j0, j1) of L*w (kBias: see bias_gradient).
enum class WeightKind : int { kInput, kRecurrent, kHead, kBias };

struct WeightJob {
  WeightKind kind;
  int64_t layer, j0, j1;
};

// Whether a weight gradient of `elements` per slot is written with streaming stores (kernels::Out::kStream): when
// it is larger than a core's L2 cache, so that it would be written back to memory anyway. Measured on an AMD EPYC
// (Zen 5, 2 threads), wide-resnet-head at B = 1 (2 MB per weight_x slot), training steps of forward + backward,
// three runs each: backward 251 / 271 / 287 us with streaming stores, 404 / 309 / 399 us without.
inline constexpr int64_t kStreamBytes = int64_t(1) << 20;

// Output rows per weight-gradient job: enough jobs to spread one wide sub-layer's gradient over the threads, each
// still a product of >= 64 rows of the gradient.
inline constexpr int64_t kWeightRows = 64;

// Column sums of a (rows x n, ld) block, accumulated into out (n), rows in order: in blocks of NB columns whose
// sums stay in registers over all rows (each column is out[j] + a[0][j] + a[1][j] + ..., in that order, whatever
// the block).
template <int64_t NB, typename T>
[[gnu::always_inline]] inline void add_block_sums(const T* __restrict a, int64_t rows, int64_t ld, T* __restrict out) {
  T acc[NB];
#pragma omp simd
  for (int64_t j = 0; j < NB; ++j) acc[j] = out[j];
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < NB; ++j) acc[j] += a[r * ld + j];
  }
#pragma omp simd
  for (int64_t j = 0; j < NB; ++j) out[j] = acc[j];
}

template <typename T>
SPINAL_CLONES void add_column_sums(const T* a, int64_t rows, int64_t n, int64_t ld, T* out) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) add_block_sums<64>(a + j, rows, ld, out + j);
  for (; j + 16 <= n; j += 16) add_block_sums<16>(a + j, rows, ld, out + j);
  for (; j + 8 <= n; j += 8) add_block_sums<8>(a + j, rows, ld, out + j);
  for (; j + 4 <= n; j += 4) add_block_sums<4>(a + j, rows, ld, out + j);
  for (; j < n; ++j) add_block_sums<1>(a + j, rows, ld, out + j);
}

// Whether the sub-layers use consecutive weight_x / bias slots, one each (no slot tied).
inline bool consecutive_slots(const SpinalDims& d) {
  for (int64_t i = 0; i < d.layers; ++i)
    if (d.x_slot(i) != d.x_slot(0) + i) return false;
  return true;
}

// Columns per job of bias_gradient: add_column_sums' widest block (64 sums in registers).
inline constexpr int64_t kSumColumns = 64;

// The bias gradients db (x_slots x w) from dZ (rows x L*w): column sums, rows in order; a slot that serves several
// sub-layers adds theirs in sub-layer order. Sub-layers on consecutive slots (no slot tied) are one block of
// independent columns, summed in blocks of kSumColumns columns as parallel jobs: each column is summed whole by one
// job, so the result does not depend on the blocks or the threads.
template <typename T>
void bias_gradient(const SpinalDims& d, const T* dz, T* db) {
  const int64_t lw = d.hidden(), w = d.width;
  if (!consecutive_slots(d)) {
    for (int64_t i = 0; i < d.layers; ++i) add_column_sums(dz + i * w, d.rows, w, lw, db + d.x_slot(i) * w);
    return;
  }
  T* out = db + d.x_slot(0) * w;
  run_jobs((lw + kSumColumns - 1) / kSumColumns, d.rows * lw, [&](int64_t job) {
    const int64_t j0 = job * kSumColumns, j1 = std::min(lw, j0 + kSumColumns);
    add_column_sums(dz + j0, d.rows, j1 - j0, lw, out + j0);
  });
}

// The operands of the weight gradients dZ_i^T x_chunk and dZ_i^T H_{i-1} of a bfloat16 call on AVX512_BF16, packed
// in pairs of rows (pack_row_pairs): dZ rounded to bfloat16 (as the reference, computing in bfloat16, rounds it), x
// as stored and H rounded (as the call returned it), so that those products run on pairs (pair_tn_product) at twice
// the float32 rate. Several row tiles: dZ of every sub-layer, packed once the chain is done; one tile: dZ_i of the
// sub-layer whose round it is (Backward::by_sub_layer). (The chain itself, and the carry, keep float32 dZ; dx takes
// dZ_i rounded, Problem::wxr.)
struct WeightPairs {
  at::Tensor z, h, x;  // (rows + 1) / 2 x ldz, ldh and ldx 32-bit words
  int64_t ldz = 0, ldh = 0, ldx = 0;
  bool one_layer = false;  // z holds dZ_i of one sub-layer (w columns), else all L*w
  const uint32_t* z_at(int64_t i, int64_t w, int64_t j0) const {
    return reinterpret_cast<const uint32_t*>(z.const_data_ptr()) + (one_layer ? 0 : i * w) + j0;
  }
  const uint32_t* hp() const { return reinterpret_cast<const uint32_t*>(h.const_data_ptr()); }
  const uint32_t* xp() const { return reinterpret_cast<const uint32_t*>(x.const_data_ptr()); }
};

// Whether the backward of a call runs its weight gradients on pairs (WeightPairs): bfloat16 calls whose input products
// do (x as stored: pairs_run) of at least kPairRows rows; and dx (Problem::wxr), which packs every Wx slot in pairs of
// rows per call, where that costs little next to the product: kPackRows rows (as the forward's W^T), or weights that
// fit the L2 cache (kTileWeightBytes). Measured with bfloat16 fwd+bwd steps of SpinalLinear (AMD EPYC Zen 5, one
// thread, minimum of 7 blocks, three alternating processes each, milliseconds; float32 products / pairs):
// wide-resnet-head B = 16 1.49-1.61 / 1.12-1.25, 32 2.64-2.72 / 2.23-2.33, 64 5.0-5.3 / 4.3-4.5, 256 18.7-20.6 /
// 14.6-16.0; wide-resnet-custom (10 Wx slots, 10 MB) B = 16 4.8-5.9 / 4.4-6.3, 32 8.3-8.9 / 7.6-8.6, 64 15.3-15.7 /
// 12.5-14.1, where with dx on pairs at every batch it was B = 16 4.6-5.5 / 5.9-8.1 and 32 7.4-8.1 / 7.7-10.4.
inline constexpr int64_t kPairRows = 16;
inline bool backward_pairs(int64_t rows, bool x_stored) { return x_stored && rows >= kPairRows; }
inline bool input_gradient_pairs(const SpinalDims& d, bool x_stored) {
  const int64_t wx_bytes = d.x_slots * d.width * d.chunk * 2;
  return backward_pairs(d.rows, x_stored) && (d.rows >= kPackRows || wx_bytes <= kTileWeightBytes);
}

// G: the type the untied weight gradients are written in (T, or bfloat16 for a bfloat16 call without tied slots:
// rounded once from the float32 sums, as the narrowing on exit would).
template <Activation A, typename T, typename S, typename G>
struct Backward {
  const Problem<T, S>& p;
  const T* h_all;        // (B, L*w)
  const T* gy;           // (B, out) (null when B = 0)
  bool has_gy;           // grad_y given (hidden mode: never)
  T* dz;                 // (B, L*w) scratch: dH, then dZ
  T* dx;                 // (B, D) or nullptr; zeroed, or uninitialised when dx_first is set
  G* dwx;                // (Lx, w, c) or nullptr
  G* dwh;                // (Lh, w, w) or nullptr
  G* dwo;                // (out, L*w) or nullptr (also without grad_y)
  std::vector<T>& xpart;  // per sub-layer partials of tied slots
  std::vector<T>& hpart;
  const std::vector<char>& tied;
  const T* zero_bias;
  WeightPairs* pairs = nullptr;  // set (backward_pairs): dWx and dWh on bfloat16 pairs (pack_weight_pairs)
  // Several row tiles: per column of x, the sub-layer that writes it first (input_gradient's `first`), and whether
  // some column has none (chain_tile zeroes those of its rows); else null, and dx is zero-filled.
  const int32_t* dx_first = nullptr;
  bool dx_unread = false;
  // ... and, where each column of x is read by one sub-layer at most and dx is larger than a core's L2 cache, its
  // columns are written once each, with streaming stores (input_gradient's `stream`; kStreamBytes).
  bool dx_stream = false;
  // Several row tiles and consecutive_slots: the bias gradients of the sub-layers' slots (db + x_slot(0) * w),
  // column sums of dZ run as jobs of the weight-gradient round (WeightKind::kBias); else null.
  T* db = nullptr;

  const SpinalDims& d() const { return p.d; }
  static bool streams(int64_t elements) { return elements * static_cast<int64_t>(sizeof(T)) > kStreamBytes; }

  // Packs into *pairs, in jobs of kPackPairs pairs of rows: dZ rounded (every sub-layer's when layer < 0, else dZ_layer
  // alone), and with it, the first time, H rounded (for dWh) and x as stored (for dWx) where those are wanted.
  void pack_weight_pairs(int64_t layer) const {
    if constexpr (kPairTypes<T, S>) {
      constexpr int64_t kPackPairs = 32;
      const SpinalDims& dd = d();
      const int64_t rows = dd.rows, lw = dd.hidden(), w = dd.width, D = dd.in_features, qn = (rows + 1) / 2;
      WeightPairs& wp = *pairs;
      const bool first = !wp.z.defined();
      const bool pack_h = first && dwh && dd.layers > 1, pack_x = first && dwx;
      const auto words = at::TensorOptions().dtype(at::kInt);
      const int64_t zcols = layer < 0 ? lw : w;
      if (first) {
        wp.one_layer = layer >= 0;
        wp.ldz = pair_ld(zcols);
        wp.ldh = pair_ld(lw);
        wp.ldx = pair_ld(D);
        wp.z = at::empty({qn * wp.ldz}, words);
      }
      if (pack_h) wp.h = at::empty({qn * wp.ldh}, words);
      if (pack_x) wp.x = at::empty({qn * wp.ldx}, words);
      auto* z = reinterpret_cast<uint32_t*>(wp.z.mutable_data_ptr());
      const T* zsrc = dz + (layer < 0 ? 0 : layer * w);
      const int64_t blocks = (qn + kPackPairs - 1) / kPackPairs;
      const int64_t kinds = 1 + pack_h + pack_x;  // dZ, then H, then x
      run_jobs(kinds * blocks, rows * (zcols + (pack_h ? lw : 0) + (pack_x ? D : 0)), [&](int64_t job) {
        const int64_t q0 = job % blocks * kPackPairs, q1 = std::min(qn, q0 + kPackPairs);
        const int64_t kind = job / blocks;
        if (kind == 0) return pack_row_pairs<float>(q0, q1, rows, zcols, zsrc, lw, z, wp.ldz);
        if (kind == 1 && pack_h) {
          return pack_row_pairs<float>(q0, q1, rows, lw, h_all, lw,
                                       reinterpret_cast<uint32_t*>(wp.h.mutable_data_ptr()), wp.ldh);
        }
        pack_row_pairs<c10::BFloat16>(q0, q1, rows, D, p.xs, D, reinterpret_cast<uint32_t*>(wp.x.mutable_data_ptr()),
                                      wp.ldx);
      });
    }
  }

  // dH of rows [r0, r0+m) into dz: G @ Wo (+ grad_H), or grad_H alone (no head gradient), or zeros.
  void head_gradient(int64_t r0, int64_t m, const T* gh) const {
    const int64_t lw = d().hidden();
    T* dzt = dz + r0 * lw;
    if (has_gy) {
      nn_gemm<T>(false, m, lw, d().out, gy + r0 * d().out, d().out, p.wo, lw, false, dzt, lw);
    } else {
      std::fill(dzt, dzt + m * lw, T(0));
    }
    if (gh) {
      const T* ght = gh + r0 * lw;
      for (int64_t k = 0; k < m * lw; ++k) dzt[k] += ght[k];
    }
  }

  // The weight-gradient jobs of sub-layer i: dWx_i and dWh_i (layer), the block of dWo that H_i feeds (head).
  void add_jobs(int64_t i, bool layer, bool head, std::vector<WeightJob>& jobs, int64_t& work) const {
    const int64_t w = d().width, rows = d().rows;
    auto add = [&](WeightKind kind, int64_t n_out, int64_t per_row) {
      for (int64_t j0 = 0; j0 < n_out; j0 += kWeightRows) {
        const int64_t j1 = std::min(n_out, j0 + kWeightRows);
        jobs.push_back({kind, i, j0, j1});
        work += (j1 - j0) * per_row * rows;
      }
    };
    if (layer && dwx) add(WeightKind::kInput, w, d().chunk);
    if (layer && dwh && i > 0) add(WeightKind::kRecurrent, w, w);
    if (head && dwo && has_gy) add(WeightKind::kHead, d().out, w);
  }

  void run(const WeightJob& job) const {
    const SpinalDims& dd = d();
    const int64_t lw = dd.hidden(), w = dd.width, rows = dd.rows, i = job.layer;
    const int64_t mj = job.j1 - job.j0;
    switch (job.kind) {
      case WeightKind::kInput: {  // dWx_i[j0:j1] = dZ_i[:, j0:j1].T @ x_chunk
        const int64_t s = p.starts[i];
        const int64_t c1 = std::min(dd.chunk, dd.in_features - s), c2 = dd.chunk - c1;
        const int64_t xsize = w * dd.chunk;
        const T* dzi = dz + i * w + job.j0;
        auto product = [&](auto* g, bool stream) {
          if (pairs) {
            if constexpr (kPairTypes<T, S>) {
              const uint32_t* zi = pairs->z_at(i, w, job.j0);
              pair_tn_product(mj, c1, rows, zi, pairs->ldz, pairs->xp() + s, pairs->ldx, g, dd.chunk);
              if (c2 > 0) pair_tn_product(mj, c2, rows, zi, pairs->ldz, pairs->xp(), pairs->ldx, g + c1, dd.chunk);
              return;
            }
          }
          nn_gemm<T>(true, mj, c1, rows, dzi, lw, p.x + s, dd.in_features, false, g, dd.chunk, stream);
          if (c2 > 0) nn_gemm<T>(true, mj, c2, rows, dzi, lw, p.x, dd.in_features, false, g + c1, dd.chunk, stream);
        };
        if (tied[i]) {
          product(xpart.data() + i * xsize + job.j0 * dd.chunk, false);
        } else {
          product(dwx + dd.x_slot(i) * xsize + job.j0 * dd.chunk, streams(xsize));
        }
        break;
      }
      case WeightKind::kRecurrent: {  // dWh_i[j0:j1] = dZ_i[:, j0:j1].T @ H_{i-1}
        const int64_t hsize = w * w;
        auto product = [&](auto* g, bool stream) {
          if (pairs) {
            if constexpr (kPairTypes<T, S>) {
              return pair_tn_product(mj, w, rows, pairs->z_at(i, w, job.j0), pairs->ldz, pairs->hp() + (i - 1) * w,
                                     pairs->ldh, g, w);
            }
          }
          nn_gemm<T>(true, mj, w, rows, dz + i * w + job.j0, lw, h_all + (i - 1) * w, lw, false, g, w, stream);
        };
        if (tied[i]) {
          product(hpart.data() + i * hsize + job.j0 * w, false);
        } else {
          product(dwh + dd.h_slot(i) * hsize + job.j0 * w, streams(hsize));
        }
        break;
      }
      case WeightKind::kHead:  // dWo[j0:j1, block i] = G[:, j0:j1].T @ H_i
        nn_gemm<T>(true, mj, w, rows, gy + job.j0, dd.out, h_all + i * w, lw, false, dwo + job.j0 * lw + i * w, lw);
        break;
      case WeightKind::kBias:  // db[columns j0:j1 of L*w] = column sums of dZ[:, j0:j1], rows in order
        add_column_sums(dz + job.j0, rows, mj, lw, db + job.j0);
        break;
    }
  }

  // The chain of rows [r0, r0+m), one job (several tiles): every sub-layer, no column split.
  void chain_tile(int64_t r0, int64_t m, const T* gh) const {
    const int64_t w = d().width;
    std::vector<T> carry(static_cast<size_t>(m * w), T(0));
    std::vector<T> zbuf(needs_preactivation(d().activation, d().negative_slope) ? static_cast<size_t>(m * w) : 0);
    std::vector<c10::BFloat16> dz16(p.wxr && dx ? static_cast<size_t>(m * w) : 0);  // dZ_i rounded: dx on pairs
    head_gradient(r0, m, gh);
    if (dx && dx_unread) {  // the columns of x that no chunk reads: their gradient is 0
      const int64_t D = d().in_features;
      for (int64_t r = r0; r < r0 + m; ++r)
        for (int64_t col = 0; col < D; ++col)
          if (dx_first[col] < 0) dx[r * D + col] = T(0);
    }
    for (int64_t i = d().layers - 1; i >= 0; --i) {
      chain_columns<A>(p, i, r0, m, 0, w, h_all, dz, carry.data(), zbuf.data(), zero_bias);
      if (i > 0) {
        nn_gemm<T>(false, m, w, w, dz + r0 * d().hidden() + i * w, d().hidden(), p.wh_slot(i), w, false,
                   carry.data(), w);
      }
      if (!dz16.empty()) {
        if constexpr (kPairTypes<T, S>) round_rows_bf16(m, w, dz + r0 * d().hidden() + i * w, d().hidden(), dz16.data(), w);
      }
      if (dx) input_gradient(p, i, r0, m, 0, d().chunk, dz, dx, dz16.data(), dx_first, dx_stream);
    }
  }

  // Several tiles (or no chain): every tile's chain, then every weight gradient.
  void tiles_then_weights(const RowTiles& tiles, const T* gh, bool need_chain) const {
    if (need_chain) {
      for_each_tile(tiles, d().rows * row_work(d()), [&](int64_t r0, int64_t m, bool) { chain_tile(r0, m, gh); });
    }
    if (pairs) pack_weight_pairs(-1);
    std::vector<WeightJob> jobs;
    int64_t work = 0;
    for (int64_t i = 0; i < d().layers; ++i) add_jobs(i, /*layer=*/true, /*head=*/true, jobs, work);
    const int64_t lw = d().hidden();
    for (int64_t j0 = 0; db && j0 < lw; j0 += kSumColumns) {  // last: they fill the threads' gaps
      jobs.push_back({WeightKind::kBias, 0, j0, std::min(lw, j0 + kSumColumns)});
      work += d().rows * (jobs.back().j1 - j0);
    }
    run_jobs(static_cast<int64_t>(jobs.size()), work, [&](int64_t j) { run(jobs[j]); });
  }

  // One tile (all B rows): per sub-layer, dZ_i in column blocks, then carry, dx and the weight gradients of
  // sub-layer i (and, in the first round, the head's) as one round of jobs.
  void by_sub_layer(const T* gh) const {
    const SpinalDims& dd = d();
    const int64_t m = dd.rows, w = dd.width, lw = dd.hidden();
    std::vector<T> carry(static_cast<size_t>(m * w), T(0));
    const bool from_input = needs_preactivation(dd.activation, dd.negative_slope);
    std::vector<T> zbuf(from_input ? static_cast<size_t>(m * w) : 0);
    head_gradient(0, m, gh);
    const int64_t z_work = from_input ? m * w * (dd.chunk + w) : m * w;
    const ColumnSplit zsplit = ColumnSplit::make(w, z_work, true);
    const ColumnSplit hsplit = ColumnSplit::make(w, m * w * w, true);
    const ColumnSplit xsplit = ColumnSplit::make(dd.chunk, m * w * dd.chunk, true);
    std::vector<WeightJob> jobs;
    std::vector<c10::BFloat16> dz16(p.wxr && dx ? static_cast<size_t>(m * w) : 0);  // dZ_i rounded: dx on pairs
    for (int64_t i = dd.layers - 1; i >= 0; --i) {
      run_jobs(zsplit.blocks, z_work, [&](int64_t blk) {
        chain_columns<A>(p, i, 0, m, zsplit.begin(blk), zsplit.end(blk) - zsplit.begin(blk), h_all, dz,
                         carry.data(), zbuf.data(), zero_bias);
      });
      if (pairs) pack_weight_pairs(i);
      if (!dz16.empty()) {  // dZ_i rounded, in jobs of 64 rows
        if constexpr (kPairTypes<T, S>) {
          run_jobs((m + 63) / 64, m * w, [&](int64_t job) {
            const int64_t r0 = job * 64, r1 = std::min(m, r0 + 64);
            round_rows_bf16(r1 - r0, w, dz + r0 * lw + i * w, lw, dz16.data() + r0 * w, w);
          });
        }
      }
      jobs.clear();
      int64_t work = m * w * ((i > 0 ? w : 0) + (dx ? dd.chunk : 0));
      add_jobs(i, /*layer=*/true, /*head=*/false, jobs, work);
      if (i == dd.layers - 1) {
        for (int64_t l = 0; l < dd.layers; ++l) add_jobs(l, /*layer=*/false, /*head=*/true, jobs, work);
      }
      const int64_t hjobs = i > 0 ? hsplit.blocks : 0;
      const int64_t xjobs = dx ? xsplit.blocks : 0;
      const T* dzi = dz + i * w;
      run_jobs(hjobs + xjobs + static_cast<int64_t>(jobs.size()), work, [&](int64_t job) {
        if (job < hjobs) {  // carry[:, n0:n1] = dZ_i @ Wh_i[:, n0:n1]
          const int64_t n0 = hsplit.begin(job), n1 = hsplit.end(job);
          nn_gemm<T>(false, m, n1 - n0, w, dzi, lw, p.wh_slot(i) + n0, w, false, carry.data() + n0, w);
        } else if (job < hjobs + xjobs) {
          const int64_t blk = job - hjobs;
          input_gradient(p, i, 0, m, xsplit.begin(blk), xsplit.end(blk), dz, dx, dz16.data());
        } else {
          run(jobs[job - hjobs - xjobs]);
        }
      });
    }
  }
};

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A zero-filled tensor. Up to kSmallFillBytes the fill is a memset here: at::zeros fills through a TensorIterator,
// ~0.2 us a call (AMD EPYC Zen 5), as much as a B = 1 backward's products over a narrow layer's dx or bias; larger
// ones keep at::zeros' parallel fill.
inline constexpr int64_t kSmallFillBytes = int64_t(1) << 16;
at::Tensor zeros(c10::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes > kSmallFillBytes) return t.zero_();
  if (bytes > 0) std::memset(t.mutable_data_ptr(), 0, static_cast<size_t>(bytes));
  return t;
}

// The gradients of one call, as T tensors (the weight gradients as G tensors: see Backward): grad_y, grad_h, x,
// h_all and the bias are T, the weights S (see Problem).
template <typename T, typename S, typename G>
Grads backward_grads(const SpinalDims& d, c10::IntArrayRef starts, const std::array<bool, 6>& mask,
                      const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h,
                      const at::Tensor& x, const at::Tensor& h_all, const at::Tensor& weight_x,
                      const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& head_weight, const at::Tensor* x_stored) {
  const bool want_dx = mask[kGradX];
  const bool want_wx = mask[kGradWeightX];
  const bool want_wh = mask[kGradWeightH];
  const bool want_b = mask[kGradBias];
  const bool want_wo = mask[kGradHeadWeight];
  const bool want_bo = mask[kGradHeadBias];
  const bool need_chain = needs_chain(mask);
  const bool has_gy = grad_y.has_value();

  // Gradients nobody asked for come back as distinct empty tensors (outputs must not alias).
  auto empty = [&] { return x.new_empty({0}); };
  // Sub-layers whose weight slot serves other sub-layers too (tied weights): their gradient terms go to
  // per-sub-layer partials, added into the slot in sub-layer order after the jobs (a fixed order: deterministic).
  std::vector<char> tied(static_cast<size_t>(d.layers));
  bool any_tied = false;
  for (int64_t i = 0; i < d.layers; ++i) any_tied |= (tied[i] = d.slot_uses(d.x_slot(i)) > 1);
  // Weight gradients that jobs write whole (beta = 0) need no zero fill: tied slots (sums of partials), a head
  // without grad_y and the accumulated dx and bias gradients do.
  const auto g_options = x.options().dtype(c10::CppTypeToScalarType<G>());
  auto grad_like = [&](const at::Tensor& t, bool written_whole) {
    return written_whole ? at::empty(t.sizes(), g_options) : zeros(t.sizes(), g_options);
  };
  // Several row tiles: each tile's chain writes the first sub-layer's share of every column of its rows of dx and adds
  // the others' (input_gradient's `first`), instead of a zero fill of the whole of dx and a pass that reads it back.
  // Measured with fwd+bwd steps of SpinalLinear (AMD EPYC Zen 1, 2 threads): each tile zeroing its rows in its job
  // against the whole fill first (the two in one process, 11 alternating blocks, median microseconds): vit-custom
  // B = 1024 (4 MB of dx) 4666 / 4891, resnet-head B = 1024 3513 / 3603, vgg-head B = 1024 19352 / 19765, vit-custom
  // B = 64 569 / 577; then writing against zeroing the rows (alternating builds, three rounds, minimum of 7 blocks):
  // vit-custom B = 1024 3915-4041 / 4262-4389, resnet-head B = 1024 2744-2816 / 2853-3090; vgg-head, wide-resnet-head
  // B = 1024 and vit-custom B = 64 within the noise.
  const RowTiles tiles = RowTiles::make(d, sizeof(T));
  std::vector<int32_t> dx_first;
  bool dx_unread = false, dx_stream = false;
  if (want_dx && need_chain && tiles.count > 1) {
    dx_first.assign(static_cast<size_t>(d.in_features), -1);
    bool reread = false;  // some column of x is read more than once
    for (int64_t i = 0; i < d.layers; ++i) {  // the last sub-layer that reads a column is the chain's first there
      for (int64_t j = 0; j < d.chunk; ++j) {
        const int64_t col = (starts[i] + j) % d.in_features;
        reread |= dx_first[col] >= 0;
        dx_first[col] = static_cast<int32_t>(i);
      }
    }
    dx_unread = std::find(dx_first.begin(), dx_first.end(), -1) != dx_first.end();
    dx_stream = x.numel() * static_cast<int64_t>(sizeof(T)) > kStreamBytes && !reread;
  }
  at::Tensor dx = !want_dx            ? empty()
                  : !dx_first.empty() ? at::empty(x.sizes(), x.options())
                                      : zeros(x.sizes(), x.options());
  at::Tensor dwx = want_wx ? grad_like(weight_x, !any_tied) : empty();
  at::Tensor dwh = want_wh ? grad_like(weight_h, !any_tied) : empty();
  at::Tensor db = want_b ? zeros(bias->sizes(), x.options()) : empty();
  at::Tensor dwo = want_wo ? grad_like(*head_weight, has_gy) : empty();
  at::Tensor dbo = want_bo ? zeros({d.out}, x.options()) : empty();
  const int64_t lw = d.hidden();

  {
    auto p = make_problem<T, S>(d, starts, x, weight_x, weight_h, bias, head_weight, std::nullopt);
    if (x_stored) p.xs = x_stored->const_data_ptr<S>();
    at::Tensor wx_rows;  // Wx packed in pairs of rows, for dx on pairs (input_gradient)
    if constexpr (kPairTypes<T, S>) {
      if (want_dx && input_gradient_pairs(d, x_stored != nullptr)) {
        const int64_t ld = pair_ld(d.chunk), slot = (d.width + 1) / 2 * ld;
        wx_rows = at::empty({d.x_slots * slot}, at::TensorOptions().dtype(at::kInt));
        auto* out = reinterpret_cast<uint32_t*>(wx_rows.mutable_data_ptr());
        run_jobs(d.x_slots, d.x_slots * d.width * d.chunk, [&](int64_t s) {
          pack_row_pairs<c10::BFloat16>(0, (d.width + 1) / 2, d.width, d.chunk, p.wx + s * d.width * d.chunk, d.chunk,
                                        out + s * slot, ld);
        });
        p.wxr = out;
        p.ldwxr = ld;
      }
    }
    at::Tensor packed, pairs;  // Z is recomputed for act' of some activations: the forward's products
    if (need_chain && needs_preactivation(d.activation, d.negative_slope)) {
      pack_weights(p, std::min(tiles.size, d.rows), /*with_head=*/false, packed, pairs);
    }
    const T* gy = has_gy ? grad_y->const_data_ptr<T>() : nullptr;
    const T* gh = grad_h ? grad_h->const_data_ptr<T>() : nullptr;
    at::Tensor dz_t = need_chain ? at::empty({d.rows, lw}, x.options()) : at::Tensor();
    const int64_t xsize = d.width * d.chunk, hsize = d.width * d.width;
    std::vector<T> xpart(any_tied && want_wx ? static_cast<size_t>(d.layers * xsize) : 0);
    std::vector<T> hpart(any_tied && want_wh ? static_cast<size_t>(d.layers * hsize) : 0);
    const std::vector<T> zero_bias(static_cast<size_t>(d.width), T(0));
    WeightPairs weight_operands;
    const bool one_tile_chain = tiles.count == 1 && need_chain;
    const bool bias_jobs = want_b && !one_tile_chain && consecutive_slots(d);
    T* db_jobs = bias_jobs ? db.mutable_data_ptr<T>() + d.x_slot(0) * d.width : nullptr;  // Backward::db
    with_activation(d.activation, [&](auto act) {
      const Backward<decltype(act)::value, T, S, G> bw{p,
                                                 h_all.const_data_ptr<T>(),
                                                 gy,
                                                 has_gy,
                                                 need_chain ? dz_t.mutable_data_ptr<T>() : nullptr,
                                                 want_dx ? dx.mutable_data_ptr<T>() : nullptr,
                                                 want_wx ? dwx.mutable_data_ptr<G>() : nullptr,
                                                 want_wh ? dwh.mutable_data_ptr<G>() : nullptr,
                                                 want_wo ? dwo.mutable_data_ptr<G>() : nullptr,
                                                 xpart,
                                                 hpart,
                                                 tied,
                                                 zero_bias.data(),
                                                 backward_pairs(d.rows, x_stored != nullptr) && (want_wx || want_wh)
                                                     ? &weight_operands
                                                     : nullptr,
                                                 dx_first.empty() ? nullptr : dx_first.data(),
                                                 dx_unread,
                                                 dx_stream,
                                                 db_jobs};
      if (one_tile_chain) {
        bw.by_sub_layer(gh);
      } else {
        bw.tiles_then_weights(tiles, gh, need_chain);
      }
    });
    if (want_b && !bias_jobs) bias_gradient(d, dz_t.const_data_ptr<T>(), db.mutable_data_ptr<T>());
    if (has_gy && want_bo) add_column_sums(gy, d.rows, d.out, d.out, dbo.mutable_data_ptr<T>());
    for (int64_t i = 1; i < d.layers; ++i) {  // partials of the tied slots, added in sub-layer order
      if (!tied[i]) continue;
      if (want_wx) {
        T* g = dwx.mutable_data_ptr<T>() + d.x_slot(i) * xsize;
        const T* part = xpart.data() + i * xsize;
        for (int64_t k = 0; k < xsize; ++k) g[k] += part[k];
      }
      if (want_wh) {
        T* g = dwh.mutable_data_ptr<T>() + d.h_slot(i) * hsize;
        const T* part = hpart.data() + i * hsize;
        for (int64_t k = 0; k < hsize; ++k) g[k] += part[k];
      }
    }
  }
  return {dx, dwx, dwh, db, dwo, dbo};
}

// backward_grads, with the weight gradients of a bfloat16 call without tied slots written in bfloat16 directly (no
// float32 gradient to narrow on exit; a tied slot's gradient is a float32 sum of partials).
template <typename T, typename S>
Grads backward_kernel(const SpinalDims& d, c10::IntArrayRef starts, const std::array<bool, 6>& mask,
                      const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h,
                      const at::Tensor& x, const at::Tensor& h_all, const at::Tensor& weight_x,
                      const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& head_weight, const at::Tensor* x_stored) {
  if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float>) {
    bool any_tied = false;
    for (int64_t i = 0; i < d.layers; ++i) any_tied |= d.slot_uses(d.x_slot(i)) > 1;
    if (!any_tied) {
      return backward_grads<T, S, S>(d, starts, mask, grad_y, grad_h, x, h_all, weight_x, weight_h, bias, head_weight,
                                     x_stored);
    }
  }
  return backward_grads<T, S, T>(d, starts, mask, grad_y, grad_h, x, h_all, weight_x, weight_h, bias, head_weight,
                                 x_stored);
}

Grads spinal_backward_cpu(const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h,
                          const at::Tensor& x, const at::Tensor& h_all, const at::Tensor& weight_x,
                          const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& head_weight, c10::IntArrayRef starts,
                          c10::IntArrayRef slots, c10::string_view activation, double negative_slope,
                          std::array<bool, 6> output_mask) {
  const SpinalDims d = check_forward_args("cpu", x, weight_x, weight_h, bias, head_weight, std::nullopt, starts,
                                          slots, activation, negative_slope);
  const std::array<bool, 6> mask = check_backward_args("cpu", d, x, grad_y, grad_h, h_all, output_mask);
  check_cpu_args(d, x);
  if (is_reduced(x)) {
    // act' of gelu, silu and leaky_relu with a negative slope comes from Z, recomputed from H_{i-1}: from the
    // float32 H the forward kernel computed (run again, bit for bit), not from the rounded H it returned, whose
    // rounding can move Z across a kink of leaky_relu and so change act'.
    SpinalDims chain = d;  // H only: the recomputation runs without the head
    chain.out = 0;
    chain.has_head = chain.has_head_bias = false;
    const at::Tensor h32 = needs_preactivation(d.activation, d.negative_slope) && needs_chain(mask)
                               ? std::get<0>(reduced_forward(chain, starts, x, weight_x, weight_h, bias, std::nullopt,
                                                             std::nullopt))
                               : widen(h_all);
    Grads grads;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "spinal_backward_cpu", [&] {
      grads = backward_kernel<float, scalar_t>(d, starts, mask, widen(grad_y), widen(grad_h), widen(x), h32,
                                               weight_x, weight_h, widen(bias), head_weight,
                                               pairs_run(x) ? &x : nullptr);
    });
    auto narrow = [&](const at::Tensor& g) { return g.to(x.scalar_type()); };
    return {narrow(std::get<0>(grads)), narrow(std::get<1>(grads)), narrow(std::get<2>(grads)),
            narrow(std::get<3>(grads)), narrow(std::get<4>(grads)), narrow(std::get<5>(grads))};
  }
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spinal_backward_cpu", [&] {
    return backward_kernel<scalar_t, scalar_t>(d, starts, mask, grad_y, grad_h, x, h_all, weight_x, weight_h, bias,
                                               head_weight, nullptr);
  });
}

// Blocks of rows per matrix, at most, of the column scaling's backward (scale_rows_backward_cpu).
inline constexpr int64_t kColumnJobs = 8;

// One row of a column scaling's backward: acc[j] += g[j] * w[j] (acc null: none) and g[j] *= s[j].
template <typename T>
void scale_columns_row(int64_t k, T* __restrict g, const T* __restrict w, const T* __restrict s, T* __restrict acc) {
  if (acc != nullptr) {
    for (int64_t j = 0; j < k; ++j) acc[j] += g[j] * w[j];
  }
  for (int64_t j = 0; j < k; ++j) g[j] *= s[j];
}

// The _scale_rows_backward_inplace op: the backward of weight * scale[..., None] (an eval-mode batch norm folded into
// the weights, spinal_ops/ops.py _fold_rows) from grad, the gradient of that product: returns grad_scale[r] = the dot
// product of rows r of grad and weight (when asked for, else an empty tensor; weight is then not read) and scales
// grad in place into the weight's gradient, grad[r, :] *= scale[r]: one pass over grad and weight, and no new
// weight-sized tensor (each fresh one page-faults in on every training step). With `columns`, the same for
// weight * scale[..., None, :] (a batch norm folded into the columns of weight_h, spinal_ops/reference.py
// fold_batch_norm_columns): grad_scale[..., j] sums column j of grad * weight over the rows, and grad[..., :, j] *=
// scale[..., j]. Rows (columns: blocks of rows of one matrix, their partial sums added in block order) are
// independent jobs, each element of grad_scale summed in a fixed order: bitwise the same on any thread count.
at::Tensor scale_rows_backward_cpu(at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scale,
                                   bool scale_grad, bool columns) {
  const int64_t dims = weight.dim();
  TORCH_CHECK(dims >= (columns ? 2 : 1) && grad.sizes() == weight.sizes(),
              "spinal_ops cpu backend: _scale_rows_backward_inplace: expected grad of weight's shape",
              columns ? " (weight of at least 2 dimensions)" : "", ", got grad ", grad.sizes(), " and weight ",
              weight.sizes());
  std::vector<int64_t> scale_shape(weight.sizes().begin(), weight.sizes().end());
  scale_shape.erase(scale_shape.end() - (columns ? 2 : 1));
  TORCH_CHECK(scale.sizes() == c10::IntArrayRef(scale_shape), "spinal_ops cpu backend: _scale_rows_backward_inplace: "
              "expected scale of weight's shape without its ", columns ? "second-to-last" : "last", " dimension, ",
              c10::IntArrayRef(scale_shape), ", got scale ", scale.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type() && scale.scalar_type() == weight.scalar_type() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble),
              "spinal_ops cpu backend: _scale_rows_backward_inplace takes float32 or float64 tensors of one dtype, got "
              "grad ", grad.scalar_type(), ", weight ", weight.scalar_type(), " and scale ", scale.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), "spinal_ops cpu backend: _scale_rows_backward_inplace writes grad in place: it "
              "must be contiguous, got strides ", grad.strides());
  const at::Tensor w = weight.contiguous(), s = scale.contiguous();
  at::Tensor grad_scale = scale_grad ? at::empty_like(s) : at::empty({0}, s.options());
  const int64_t k = w.size(-1), rows = columns ? w.size(-2) : 1, mats = columns ? s.numel() / std::max<int64_t>(k, 1)
                                                                                : s.numel();
  if (w.numel() == 0) {
    if (scale_grad) grad_scale.zero_();
    return grad_scale;
  }
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "_scale_rows_backward_inplace", [&] {
    using T = scalar_t;
    T* gp = grad.mutable_data_ptr<T>();
    const T* wp = w.const_data_ptr<T>();
    const T* sp = s.const_data_ptr<T>();
    T* gsp = scale_grad ? grad_scale.mutable_data_ptr<T>() : nullptr;
    if (columns) {
      // Jobs of whole rows (a block of columns per job reads each row in pieces, which ran 2-3x slower than whole
      // rows): up to kColumnJobs blocks of rows per matrix, each summing its rows in order into partial sums, added
      // block after block at the end.
      const int64_t blocks = std::clamp<int64_t>(rows * k / (kParallelWork / 8), 1, kColumnJobs);
      const int64_t job_rows = (rows + blocks - 1) / blocks, jobs = (rows + job_rows - 1) / job_rows;
      std::vector<T> partial(gsp != nullptr ? static_cast<size_t>(mats * jobs * k) : 0);
      run_jobs(mats * jobs, w.numel(), [&](int64_t job) {
        const int64_t b = job / jobs, r0 = job % jobs * job_rows, r1 = std::min(rows, r0 + job_rows);
        for (int64_t r = r0; r < r1; ++r) {
          scale_columns_row(k, gp + (b * rows + r) * k, wp + (b * rows + r) * k, sp + b * k,
                            gsp != nullptr ? partial.data() + job * k : nullptr);
        }
      });
      if (gsp != nullptr) {  // per matrix, the column sums of its jobs x k partial sums, in block order
        std::fill_n(gsp, mats * k, T(0));
        for (int64_t b = 0; b < mats; ++b) add_column_sums(partial.data() + b * jobs * k, jobs, k, k, gsp + b * k);
      }
      return;
    }
    // Jobs of about kParallelWork / 8 elements: several per thread for a wide layer's weights, one for a small one.
    const int64_t job_rows = std::max<int64_t>(1, kParallelWork / 8 / k);
    run_jobs((mats + job_rows - 1) / job_rows, mats * k, [&](int64_t job) {
      const int64_t r1 = std::min(mats, (job + 1) * job_rows);
      for (int64_t r = job * job_rows; r < r1; ++r) {
        T* gr = gp + r * k;
        const T* wr = wp + r * k;
        const T sr = sp[r];
        if (gsp == nullptr) {  // the weights' gradient alone: weight is not read
          for (int64_t q = 0; q < k; ++q) gr[q] *= sr;
          continue;
        }
        // kLanes independent partial sums (vectorised, no dependent chain), added in a fixed order at the end.
        constexpr int kLanes = 16;
        T acc[kLanes] = {};
        int64_t q = 0;
        for (; q + kLanes <= k; q += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            acc[l] += gr[q + l] * wr[q + l];
            gr[q + l] *= sr;
          }
        }
        T sum = 0;
        for (; q < k; ++q) {
          sum += gr[q] * wr[q];
          gr[q] *= sr;
        }
        for (int l = 0; l < kLanes; ++l) sum += acc[l];
        gsp[r] = sum;
      }
    });
  });
  return grad_scale;
}

// The _cpu_gemm op: op(a) @ op(b) through gemm's routes (nt_gemm for trans_b, else nn_gemm), in row blocks of
// kMaxRowTile as parallel jobs.
at::Tensor cpu_gemm(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "spinal_ops cpu backend: _cpu_gemm takes 2-D a and b, got shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "spinal_ops cpu backend: _cpu_gemm takes float32 or float64 CPU tensors of one dtype, got ",
              a.scalar_type(), " on ", a.device(), " and ", b.scalar_type(), " on ", b.device());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t n = trans_b ? b.size(0) : b.size(1), kb = trans_b ? b.size(1) : b.size(0);
  TORCH_CHECK(k == kb, "spinal_ops cpu backend: _cpu_gemm: op(a) is ", m, " x ", k, " but op(b) is ", kb, " x ", n);
  TORCH_CHECK(std::max({m, n, k}) <= std::numeric_limits<int>::max(), "spinal_ops cpu backend: _cpu_gemm sizes ",
              "must be at most 2^31 - 1 (the BLAS interface)");
  at::Tensor c = at::empty({m, n}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "_cpu_gemm", [&] {
    using T = scalar_t;
    const T* ap = ac.const_data_ptr<T>();
    const T* bp = bc.const_data_ptr<T>();
    T* cp = c.mutable_data_ptr<T>();
    const int64_t lda = ac.size(1), ldb = bc.size(1);
    const int64_t blocks = (m + kMaxRowTile - 1) / kMaxRowTile;
    run_jobs(blocks, m * n * k, [&](int64_t blk) {
      const int64_t r0 = blk * kMaxRowTile, rows = std::min(kMaxRowTile, m - r0);
      const T* a0 = trans_a ? ap + r0 : ap + r0 * lda;
      if (trans_b) {
        nt_gemm<T>(rows, n, k, a0, lda, NtOperand<T>{bp, ldb, nullptr, 0}, false, cp + r0 * n, n);
      } else {
        nn_gemm<T>(trans_a, rows, n, k, a0, lda, bp, ldb, false, cp + r0 * n, n);
      }
    });
  });
  return c;
}

}  // namespace
}  // namespace spinal_ops::cpu

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) {
  m.impl("spinal_forward", &spinal_ops::cpu::spinal_forward_cpu);
  m.impl("_spinal_backward", &spinal_ops::cpu::spinal_backward_cpu);
  m.impl("_cpu_gemm", &spinal_ops::cpu::cpu_gemm);
  m.impl("_scale_rows_backward_inplace", &spinal_ops::cpu::scale_rows_backward_cpu);
}
