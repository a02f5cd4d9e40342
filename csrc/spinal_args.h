// Argument contract of the spinal ops, shared by every native kernel (CPU and CUDA).
//
// The schemas live in spinal_ops.cpp; this header turns the op arguments into the problem sizes and
// validates them once, with messages that name the argument, the expected and the actual value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <string_view>

namespace spinal_ops {

// Sub-layer activations, in the order of reference.ACTIVATIONS.
enum class Activation : int { kRelu = 0, kLeakyRelu, kTanh, kSigmoid, kIdentity, kGelu, kSilu };

// Parses the `activation` argument; throws naming the allowed values.
Activation parse_activation(std::string_view name, std::string_view backend);

// True when act'(Z) cannot be computed from h = act(Z) alone (the kernels then recompute Z).
inline bool needs_preactivation(Activation a, double negative_slope) {
  return a == Activation::kGelu || a == Activation::kSilu ||
         (a == Activation::kLeakyRelu && negative_slope < 0.0);
}

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

// Validates the extra backward arguments (grad_y, grad_H, H) against sizes from check_forward_args.
void check_backward_args(std::string_view backend, const SpinalDims& dims, const at::Tensor& x, const std::optional<at::Tensor>& grad_y,
                         const std::optional<at::Tensor>& grad_h, const at::Tensor& h_all);

// The `_check_args` op: check_forward_args for callers outside C++ (the Triton ops), raising the same errors.
void check_args_op(c10::string_view backend, const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight,
                   const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts, c10::IntArrayRef slots,
                   c10::string_view activation, double negative_slope);

// Index of each gradient in the backward op's output tuple and output mask.
enum GradIndex : int { kGradX = 0, kGradWeightX, kGradWeightH, kGradBias, kGradHeadWeight, kGradHeadBias };

}  // namespace spinal_ops
