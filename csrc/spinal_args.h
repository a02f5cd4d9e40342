// Argument contract of the spinal ops, shared by every native kernel (CPU and CUDA).
//
// The schemas live in spinal_ops.cpp; this header turns the op arguments into the problem sizes and
// validates them once, with messages that name the argument, the expected and the actual value. It also holds
// the two rules every backend applies the same way: the 32-bit index limits (check_index_limits) and the
// gradients a backward computes (effective_output_mask). The activations are spinal_activation.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <string_view>

#include "spinal_activation.h"

namespace spinal_ops {

// Parses the `activation` argument (a name of kActivationNames); throws naming the allowed values.
Activation parse_activation(std::string_view name, std::string_view backend);

// Problem sizes of one call, derived from validated arguments.
struct SpinalDims {
  int64_t rows = 0;         // B
  int64_t in_features = 0;  // D
  int64_t layers = 0;       // L
  int64_t width = 0;        // w
  int64_t chunk = 0;        // c
  int64_t out = 0;          // head outputs (0 in hidden mode)
  int64_t x_slots = 0;      // S: weight slots (weight_x.size(0))
  int64_t h_slots = 0;      // S - 1 (weight_h.size(0))
  c10::IntArrayRef slots;   // L entries: the weight slot of each sub-layer (the op's argument; valid for the call)
  bool has_bias = false;
  bool has_head = false;
  bool has_head_bias = false;
  Activation activation = Activation::kRelu;
  double negative_slope = 0.01;

  int64_t x_slot(int64_t i) const { return slots[i]; }      // weight_x / bias slot of sub-layer i
  int64_t h_slot(int64_t i) const { return slots[i] - 1; }  // weight_h slot of sub-layer i >= 1
  // Number of sub-layers using weight_x slot s (> 1: its gradient sums several sub-layers' terms).
  int64_t slot_uses(int64_t s) const {
    int64_t n = 0;
    for (int64_t v : slots) n += v == s;
    return n;
  }
  int64_t hidden() const { return layers * width; }  // L * w, the width of H
};

// `backend` ("cpu", "cuda") names the caller in every message.
// Validates the forward arguments (see the schema in spinal_ops.cpp) and returns the sizes.
SpinalDims check_forward_args(std::string_view backend, const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight,
                              const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts,
                              c10::IntArrayRef slots, std::string_view activation, double negative_slope);

// Validates the extra backward arguments (grad_y, grad_H, H) against sizes from check_forward_args and returns
// the effective output mask of the call (effective_output_mask).
std::array<bool, 6> check_backward_args(std::string_view backend, const SpinalDims& dims, const at::Tensor& x,
                                        const std::optional<at::Tensor>& grad_y,
                                        const std::optional<at::Tensor>& grad_h, const at::Tensor& h_all,
                                        std::array<bool, 6> output_mask);

// What a backend's kernels hold in 32-bit integers, and where a caller past that can go instead.
struct IndexLimits {
  std::string_view arithmetic;  // what is 32-bit, e.g. "the kernels' 32-bit index arithmetic"
  std::string_view supported;   // the supported sizes, in words
  std::string_view fallback;    // e.g. "use the reference backend (spinal_ops.use_backend('reference'))"
  bool weight_x_slot = false;   // also one weight_x slot, w * c elements (the CUDA kernels' slot offsets)
};

// Refuses (ValueError) sizes past 2^31 - 1 that a kernel indexes with 32-bit integers: the rows B, D, L*w and
// out, and w * c when limits.weight_x_slot. The message names the backend, the size, the tensor, the supported
// sizes and the fallback, in the shape of triton_kernels/settings.py's check_index_limits.
void check_index_limits(const SpinalDims& dims, std::string_view backend, const IndexLimits& limits);

// The `_check_args` op: check_forward_args for callers outside C++ (the Triton ops), raising the same errors.
void check_args_op(c10::string_view backend, const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight,
                   const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts, c10::IntArrayRef slots,
                   c10::string_view activation, double negative_slope);

// Index of each gradient in the backward op's output tuple and output mask.
enum GradIndex : int { kGradX = 0, kGradWeightX, kGradWeightH, kGradBias, kGradHeadWeight, kGradHeadBias };

// Which of the six differentiable inputs a call has, in GradIndex order: x, weight_x and weight_h always, bias,
// head_weight and head_bias when given.
inline std::array<bool, 6> grad_inputs(bool has_bias, bool has_head, bool has_head_bias) {
  return {true, true, true, has_bias, has_head, has_head_bias};
}

// The gradients a backward computes: those asked for (mask) whose input exists (inputs, from grad_inputs).
inline std::array<bool, 6> effective_output_mask(const std::array<bool, 6>& inputs, const std::array<bool, 6>& mask) {
  std::array<bool, 6> m{};
  for (size_t i = 0; i < m.size(); ++i) m[i] = inputs[i] && mask[i];
  return m;
}

// The same for the backward op, which has no head_bias argument: with a head it computes dhead_bias (the
// autograd drops it when the forward had no head bias); dbias needs a bias, the head gradients a head.
inline std::array<bool, 6> effective_output_mask(const SpinalDims& dims, const std::array<bool, 6>& mask) {
  return effective_output_mask(grad_inputs(dims.has_bias, dims.has_head, dims.has_head), mask);
}

// Whether a backward with the effective mask m runs the chain over the sub-layers (dZ): every gradient but the
// head's needs it.
inline bool needs_chain(const std::array<bool, 6>& m) {
  return m[kGradX] || m[kGradWeightX] || m[kGradWeightH] || m[kGradBias];
}

}  // namespace spinal_ops
