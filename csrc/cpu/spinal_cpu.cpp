// Fused C++ CPU kernels of the spinal ops (backend `cpu`): forward and backward, float32 and float64, and
// bfloat16 / float16 with float32 arithmetic (see "Reduced precision" below).
//
// Layout: x (B, D) and H (B, L*w) row-major; sub-layer i owns columns [i*w, (i+1)*w) of H.
//
// Forward, per tile of kRowTile rows (tiles are independent jobs, run in parallel):
//   for i = 0 .. L-1:  H_i  = x[:, s_i : s_i+c1] @ Wx_i[:, :c1].T          (one GEMM)
//                      H_i += x[:, 0 : c2]      @ Wx_i[:, c1:].T          (only when the chunk wraps)
//                      H_i += H_{i-1} @ Wh_i.T                            (i >= 1: the recurrence)
//                      H_i  = act(H_i + b_i)                              (in place, one pass)
//   y = H @ Wo.T + bo                                                     (head mode)
// The tile of H is written and read back while it is still in cache; nothing else is allocated.
//
// Backward, with G = dL/dy and dH = G @ Wo (+ grad_H), in two phases:
//   1. per row tile (parallel jobs): dZ_i = (dH_i + carry) * act'(.) for i = L-1 .. 0, written over dH in one
//      (B, L*w) scratch tensor; carry = dZ_i @ Wh_i; dx[:, chunk_i] += dZ_i @ Wx_i (scatter with wrap, in
//      sub-layer order, so the sum order is fixed). act' comes from H, or from Z recomputed from x and H
//      for gelu, silu and leaky_relu with a negative slope.
//   2. weight gradients, one job per sub-layer and kind, each a GEMM over all rows (dWx_i = dZ_i.T @ x_chunk,
//      dWh_i = dZ_i.T @ H_{i-1}, dWo[:, block i] = G.T @ H_i); a slot that serves several sub-layers (tied
//      weights) gets per-sub-layer partials that are added in sub-layer order afterwards; bias gradients are
//      column sums in row order.
// The products go through csrc/cpu/spinal_blas.h, the jobs through csrc/cpu/spinal_parallel.h, the activations
// through csrc/spinal_activation.h (shared with the CUDA kernels).
//
// Reduced precision: bfloat16 and float16 tensors are widened to float32 on entry (x, parameters, incoming
// gradients), the float32 kernels run, and the results (H, y, the gradients) are rounded back to the input dtype
// once, on exit. Every product and sum is float32 and the chain keeps float32 between sub-layers, so the error
// is that of one rounding of each result (the reference rounds after every op). This is the fast way on CPUs
// without bfloat16/float16 GEMMs (AVX2: torch's bfloat16 GEMM runs ~15x slower than its float32 one).
//
// Determinism: every GEMM runs with sequential BLAS (csrc/cpu/spinal_blas.h) and the split into jobs depends only
// on the problem sizes (csrc/cpu/spinal_parallel.h), so outputs and gradients are bitwise identical across runs
// and across thread counts.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../spinal_args.h"
#include "spinal_blas.h"
#include "spinal_parallel.h"

namespace spinal_ops::cpu {
namespace {

// Raw pointers and sizes of one call.
template <typename T>
struct Problem {
  SpinalDims d;
  const int64_t* starts;
  const T* x;    // (B, D)
  const T* wx;   // (Lx, w, c)
  const T* wh;   // (Lh, w, w)
  const T* b;    // (Lx, w) or nullptr
  const T* wo;   // (out, L*w) or nullptr
  const T* bo;   // (out) or nullptr

  const T* wx_slot(int64_t i) const { return wx + d.x_slot(i) * d.width * d.chunk; }
  const T* wh_slot(int64_t i) const { return wh + d.h_slot(i) * d.width * d.width; }
  const T* b_slot(int64_t i) const { return b ? b + d.x_slot(i) * d.width : nullptr; }
};

// Columns [n0, n1) of Z_i (rows [r0, r0+m), sub-layer i) into z (ldz; z points at column n0), from x and
// H_{i-1}; the bias is NOT added. Output column n of Z_i reads row n of Wx_i and of Wh_i.
template <typename T>
void input_and_recurrent_product(const Problem<T>& p, int64_t i, int64_t r0, int64_t m, int64_t n0, int64_t n1,
                                 const T* h_all, T* z, int64_t ldz) {
  const SpinalDims& d = p.d;
  const int64_t s = p.starts[i];
  const int64_t c1 = std::min(d.chunk, d.in_features - s);
  const int64_t c2 = d.chunk - c1;
  const int64_t lw = d.hidden();
  const int64_t n = n1 - n0;
  const T* wxi = p.wx_slot(i) + n0 * d.chunk;
  gemm<T>(false, true, m, n, c1, T(1), p.x + r0 * d.in_features + s, d.in_features, wxi, d.chunk, T(0), z, ldz);
  if (c2 > 0) {
    gemm<T>(false, true, m, n, c2, T(1), p.x + r0 * d.in_features, d.in_features, wxi + c1, d.chunk, T(1), z, ldz);
  }
  if (i > 0) {
    gemm<T>(false, true, m, n, d.width, T(1), h_all + r0 * lw + (i - 1) * d.width, lw, p.wh_slot(i) + n0 * d.width,
            d.width, T(1), z, ldz);
  }
}

// row = act(row + bias), one row of one sub-layer (locals and __restrict let the loop vectorize).
template <Activation A, typename T>
void bias_activation(T* __restrict row, const T* __restrict bias, int64_t n, T slope) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = activation_forward<A>(row[j] + bias[j], slope);
}

// dz = (dz + carry) * act'(.), one row of one sub-layer: act' from z + bias (kFromZ, hz holds Z without the
// bias) or from h (hz holds H; bias unused).
template <Activation A, bool kFromZ, typename T>
void chain_rule(T* __restrict dz, const T* __restrict carry, const T* __restrict hz, const T* __restrict bias,
                int64_t n, T slope) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T g = activation_derivative<A, kFromZ>(kFromZ ? hz[j] + bias[j] : hz[j], slope);
    dz[j] = (dz[j] + carry[j]) * g;
  }
}

template <Activation A, typename T>
void forward_tile(const Problem<T>& p, int64_t r0, int64_t m, T* h_all, T* y, const T* zero_bias, bool one_tile) {
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
      for (int64_t r = 0; r < m; ++r) bias_activation<A>(hi + r * lw + n0, bi + n0, n1 - n0, slope);
    });
  }
  if (d.has_head) {
    T* yt = y + r0 * d.out;
    gemm<T>(false, true, m, d.out, lw, T(1), h_all + r0 * lw, lw, p.wo, lw, T(0), yt, d.out);
    if (p.bo) {
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < d.out; ++j) yt[r * d.out + j] += p.bo[j];
    }
  }
}

template <typename T>
Problem<T> make_problem(const SpinalDims& d, c10::IntArrayRef starts, const at::Tensor& x, const at::Tensor& wx,
                        const at::Tensor& wh, const std::optional<at::Tensor>& b,
                        const std::optional<at::Tensor>& wo, const std::optional<at::Tensor>& bo) {
  return Problem<T>{d,
                    starts.data(),
                    x.const_data_ptr<T>(),
                    wx.const_data_ptr<T>(),
                    wh.const_data_ptr<T>(),
                    b ? b->const_data_ptr<T>() : nullptr,
                    wo ? wo->const_data_ptr<T>() : nullptr,
                    bo ? bo->const_data_ptr<T>() : nullptr};
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
    auto [h32, y32] = spinal_forward_cpu(widen(x), widen(weight_x), widen(weight_h), widen(bias), widen(head_weight),
                                         widen(head_bias), starts, slots, activation, negative_slope);
    return {h32.to(x.scalar_type()), y32.to(x.scalar_type())};
  }
  at::Tensor h_all = at::empty({d.rows, d.hidden()}, x.options());
  at::Tensor y = at::empty({d.rows, d.out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spinal_forward_cpu", [&] {
    const auto p = make_problem<scalar_t>(d, starts, x, weight_x, weight_h, bias, head_weight, head_bias);
    scalar_t* hp = h_all.mutable_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const std::vector<scalar_t> zero_bias(static_cast<size_t>(d.width), scalar_t(0));
    with_activation(d.activation, [&](auto act) {
      for_each_tile(d, [&](int64_t r0, int64_t m, bool one_tile) {
        forward_tile<decltype(act)::value>(p, r0, m, hp, yp, zero_bias.data(), one_tile);
      });
    });
  });
  return {h_all, y};
}

// Phase 1 of the backward for one row tile: dz (B, L*w) holds dH on entry and dZ on exit; dx rows written.
// Per sub-layer two rounds of jobs (one job each unless the batch is one tile, see ColumnSplit): dZ_i by column
// blocks of w (with Z_i recomputed for those columns when act' needs it), then carry = dZ_i @ Wh_i by column
// blocks of w together with dx[:, chunk_i] += dZ_i @ Wx_i by blocks of the chunk's c columns (disjoint dx columns
// within one sub-layer, since c <= D; sub-layers add into dx in order, so the sum order is fixed).
template <Activation A, typename T>
void backward_chain_tile(const Problem<T>& p, int64_t r0, int64_t m, const T* h_all, T* dz, T* dx,
                         std::vector<T>& carry, std::vector<T>& zbuf, const T* zero_bias, bool one_tile) {
  const SpinalDims& d = p.d;
  const int64_t lw = d.hidden();
  const int64_t w = d.width;
  const T slope = static_cast<T>(d.negative_slope);
  const bool from_input = needs_preactivation(d.activation, d.negative_slope);
  carry.assign(static_cast<size_t>(m * w), T(0));
  if (from_input) zbuf.resize(static_cast<size_t>(m * w));
  const int64_t z_work = from_input ? m * w * (d.chunk + w) : m * w;
  const ColumnSplit zsplit = ColumnSplit::make(w, z_work, one_tile);
  const ColumnSplit hsplit = ColumnSplit::make(w, m * w * w, one_tile);
  const ColumnSplit xsplit = ColumnSplit::make(d.chunk, m * w * d.chunk, one_tile);
  for (int64_t i = d.layers - 1; i >= 0; --i) {
    T* dzi = dz + r0 * lw + i * w;
    const T* hi = h_all + r0 * lw + i * w;
    const T* bi = p.b ? p.b_slot(i) : zero_bias;
    run_jobs(zsplit.blocks, z_work, [&](int64_t blk) {
      const int64_t n0 = zsplit.begin(blk), n = zsplit.end(blk) - n0;
      if constexpr (kDerivativeFromZ<A>) {
        if (from_input) {
          input_and_recurrent_product(p, i, r0, m, n0, n0 + n, h_all, zbuf.data() + n0, w);
          for (int64_t r = 0; r < m; ++r)
            chain_rule<A, true>(dzi + r * lw + n0, carry.data() + r * w + n0, zbuf.data() + r * w + n0, bi + n0, n,
                                slope);
          return;
        }
      }
      if constexpr (kDerivativeFromH<A>) {
        for (int64_t r = 0; r < m; ++r)
          chain_rule<A, false>(dzi + r * lw + n0, carry.data() + r * w + n0, hi + r * lw + n0, zero_bias, n, slope);
      }
    });
    const int64_t hjobs = i > 0 ? hsplit.blocks : 0;
    const int64_t xjobs = dx ? xsplit.blocks : 0;
    run_jobs(hjobs + xjobs, m * w * ((i > 0 ? w : 0) + (dx ? d.chunk : 0)), [&](int64_t job) {
      if (job < hjobs) {  // carry[:, n0:n1] = dZ_i @ Wh_i[:, n0:n1]
        const int64_t n0 = hsplit.begin(job), n1 = hsplit.end(job);
        gemm<T>(false, false, m, n1 - n0, w, T(1), dzi, lw, p.wh_slot(i) + n0, w, T(0), carry.data() + n0, w);
        return;
      }
      // dx[:, (s + j) mod D] += dZ_i @ Wx_i[:, j] for the chunk columns j in [j0, j1), split where the chunk wraps
      const int64_t blk = job - hjobs;
      const int64_t j0 = xsplit.begin(blk), j1 = xsplit.end(blk);
      const int64_t s = p.starts[i];
      const int64_t c1 = std::min(d.chunk, d.in_features - s);  // chunk columns before the wrap
      const T* wxi = p.wx_slot(i);
      T* dxt = dx + r0 * d.in_features;
      if (j0 < c1) {
        const int64_t e = std::min(j1, c1);
        gemm<T>(false, false, m, e - j0, w, T(1), dzi, lw, wxi + j0, d.chunk, T(1), dxt + s + j0, d.in_features);
      }
      if (j1 > c1) {
        const int64_t b0 = std::max(j0, c1);
        gemm<T>(false, false, m, j1 - b0, w, T(1), dzi, lw, wxi + b0, d.chunk, T(1), dxt + (b0 - c1), d.in_features);
      }
    });
  }
}

// Column sums of a (rows x n, ld) block, accumulated into out (n), rows in order.
template <typename T>
void add_column_sums(const T* a, int64_t rows, int64_t n, int64_t ld, T* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) out[j] += a[r * ld + j];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spinal_backward_cpu(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& x,
    const at::Tensor& h_all, const at::Tensor& weight_x, const at::Tensor& weight_h,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight, c10::IntArrayRef starts,
    c10::IntArrayRef slots, c10::string_view activation, double negative_slope, std::array<bool, 6> output_mask) {
  const SpinalDims d = check_forward_args("cpu", x, weight_x, weight_h, bias, head_weight, std::nullopt, starts,
                                          slots, activation, negative_slope);
  const std::array<bool, 6> mask = check_backward_args("cpu", d, x, grad_y, grad_h, h_all, output_mask);
  check_cpu_args(d, x);
  if (is_reduced(x)) {
    auto grads = spinal_backward_cpu(widen(grad_y), widen(grad_h), widen(x), widen(h_all), widen(weight_x),
                                     widen(weight_h), widen(bias), widen(head_weight), starts, slots, activation,
                                     negative_slope, mask);
    auto narrow = [&](const at::Tensor& g) { return g.to(x.scalar_type()); };
    return {narrow(std::get<0>(grads)), narrow(std::get<1>(grads)), narrow(std::get<2>(grads)),
            narrow(std::get<3>(grads)), narrow(std::get<4>(grads)), narrow(std::get<5>(grads))};
  }
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
  // Weight gradients that one job writes whole (beta = 0) need no zero fill: tied slots (sums of partials), a
  // head without grad_y and the accumulated dx and bias gradients do.
  auto grad_like = [&](const at::Tensor& t, bool written_whole) {
    return written_whole ? at::empty_like(t) : at::zeros_like(t);
  };
  at::Tensor dx = want_dx ? at::zeros_like(x) : empty();
  at::Tensor dwx = want_wx ? grad_like(weight_x, !any_tied) : empty();
  at::Tensor dwh = want_wh ? grad_like(weight_h, !any_tied) : empty();
  at::Tensor db = want_b ? at::zeros_like(*bias) : empty();
  at::Tensor dwo = want_wo ? grad_like(*head_weight, has_gy) : empty();
  at::Tensor dbo = want_bo ? at::zeros({d.out}, x.options()) : empty();
  const int64_t lw = d.hidden();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spinal_backward_cpu", [&] {
    using T = scalar_t;
    const auto p = make_problem<T>(d, starts, x, weight_x, weight_h, bias, head_weight, std::nullopt);
    const T* hp = h_all.const_data_ptr<T>();
    const T* gy = has_gy ? grad_y->const_data_ptr<T>() : nullptr;
    const T* gh = grad_h ? grad_h->const_data_ptr<T>() : nullptr;
    T* dz = nullptr;
    at::Tensor dz_t;
    if (need_chain) {
      dz_t = at::empty({d.rows, lw}, x.options());
      dz = dz_t.mutable_data_ptr<T>();
      const std::vector<T> zero_bias(static_cast<size_t>(d.width), T(0));
      T* dxp = want_dx ? dx.mutable_data_ptr<T>() : nullptr;
      for_each_tile(d, [&](int64_t r0, int64_t m, bool one_tile) {
        T* dzt = dz + r0 * lw;
        if (has_gy) {
          gemm<T>(false, false, m, lw, d.out, T(1), gy + r0 * d.out, d.out, p.wo, lw, T(0), dzt, lw);
        } else {
          std::fill(dzt, dzt + m * lw, T(0));
        }
        if (gh) {
          const T* ght = gh + r0 * lw;
          for (int64_t k = 0; k < m * lw; ++k) dzt[k] += ght[k];
        }
        std::vector<T> carry, zbuf;
        with_activation(d.activation, [&](auto act) {
          backward_chain_tile<decltype(act)::value>(p, r0, m, hp, dz, dxp, carry, zbuf, zero_bias.data(), one_tile);
        });
      });
    }

    // Phase 2: weight gradients. Jobs [0, L): dWx_i; [L, 2L): dWh_i; [2L, 3L): dWo block i; 3L: biases.
    // A tied slot receives per-sub-layer partials, summed below.
    const int64_t xsize = d.width * d.chunk, hsize = d.width * d.width;
    std::vector<T> xpart(any_tied && want_wx ? static_cast<size_t>(d.layers * xsize) : 0);
    std::vector<T> hpart(any_tied && want_wh ? static_cast<size_t>(d.layers * hsize) : 0);
    const bool bias_job = want_b || (has_gy && want_bo);
    const int64_t weight_work = d.rows * (d.layers * d.width * (d.chunk + d.width) + d.hidden() * d.out);
    run_jobs(3 * d.layers + 1, weight_work, [&](int64_t job) {
      const int64_t i = job % d.layers;
      const T* dzi = dz ? dz + i * d.width : nullptr;
      if (job < d.layers) {
        if (!want_wx) return;
        const int64_t s = starts[i];
        const int64_t c1 = std::min(d.chunk, d.in_features - s);
        const int64_t c2 = d.chunk - c1;
        T* g = tied[i] ? xpart.data() + i * xsize : dwx.mutable_data_ptr<T>() + d.x_slot(i) * xsize;
        gemm<T>(true, false, d.width, c1, d.rows, T(1), dzi, lw, p.x + s, d.in_features, T(0), g, d.chunk);
        if (c2 > 0) gemm<T>(true, false, d.width, c2, d.rows, T(1), dzi, lw, p.x, d.in_features, T(0), g + c1, d.chunk);
      } else if (job < 2 * d.layers) {
        if (!want_wh || i == 0) return;
        T* g = tied[i] ? hpart.data() + i * hsize : dwh.mutable_data_ptr<T>() + d.h_slot(i) * hsize;
        gemm<T>(true, false, d.width, d.width, d.rows, T(1), dzi, lw, hp + (i - 1) * d.width, lw, T(0), g, d.width);
      } else if (job < 3 * d.layers) {
        if (!(has_gy && want_wo)) return;
        gemm<T>(true, false, d.out, d.width, d.rows, T(1), gy, d.out, hp + i * d.width, lw, T(0),
                dwo.mutable_data_ptr<T>() + i * d.width, lw);
      } else if (bias_job) {
        if (want_b) {
          for (int64_t l = 0; l < d.layers; ++l)
            add_column_sums(dz + l * d.width, d.rows, d.width, lw, db.mutable_data_ptr<T>() + d.x_slot(l) * d.width);
        }
        if (has_gy && want_bo) add_column_sums(gy, d.rows, d.out, d.out, dbo.mutable_data_ptr<T>());
      }
    });
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
  });
  return {dx, dwx, dwh, db, dwo, dbo};
}

}  // namespace
}  // namespace spinal_ops::cpu

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) {
  m.impl("spinal_forward", &spinal_ops::cpu::spinal_forward_cpu);
  m.impl("_spinal_backward", &spinal_ops::cpu::spinal_backward_cpu);
}