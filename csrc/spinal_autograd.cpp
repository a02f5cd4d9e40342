// Autograd of the native spinal ops (CPU and CUDA kernels), in C++ so that a training step pays no Python
// overhead per call. The fake kernels and the autograd of the Triton ops live in spinal_ops/ops.py; the formula
// is the same: saved for backward are x, H and the weights, nothing else.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "spinal_args.h"

namespace spinal_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&, c10::IntArrayRef,
                                                      c10::string_view, double, bool);
using BackwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    c10::IntArrayRef, c10::string_view, double, bool, std::array<bool, 6>);

const c10::TypedOperatorHandle<ForwardOp>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("spinal_ops::spinal_forward", "").typed<ForwardOp>();
  return op;
}

const c10::TypedOperatorHandle<BackwardOp>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("spinal_ops::spinal_backward", "").typed<BackwardOp>();
  return op;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Backward of the backward: not supported, with a message that says what to do instead.
class SpinalBackwardFunction : public torch::autograd::Function<SpinalBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const std::optional<at::Tensor>& grad_y,
                               const std::optional<at::Tensor>& grad_h, const at::Tensor& x, const at::Tensor& h_all,
                               const at::Tensor& weight_x, const at::Tensor& weight_h,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight,
                               c10::IntArrayRef starts, c10::string_view activation, double negative_slope,
                               bool shared_weights, std::array<bool, 6> output_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dwx, dwh, db, dwo, dbo] = backward_op().call(grad_y, grad_h, x, h_all, weight_x, weight_h, bias,
                                                           head_weight, starts, activation, negative_slope,
                                                           shared_weights, output_mask);
    return {dx, dwx, dwh, db, dwo, dbo};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "spinal_ops: double backward (differentiating the gradient of a spinal layer, e.g. "
                "create_graph=True followed by another backward) is not supported; use the reference backend "
                "(spinal_ops.use_backend('reference')) for higher-order gradients");
  }
};

class SpinalFunction : public torch::autograd::Function<SpinalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight_x,
                               const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& head_weight,
                               const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts,
                               c10::string_view activation, double negative_slope, bool shared_weights) {
    at::Tensor h_all, y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(h_all, y) = forward_op().call(x, weight_x, weight_h, bias, head_weight, head_bias, starts,
                                             activation, negative_slope, shared_weights);
    }
    ctx->save_for_backward({x, h_all, weight_x, weight_h, bias.value_or(at::Tensor()),
                            head_weight.value_or(at::Tensor())});
    ctx->saved_data["starts"] = starts.vec();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["shared_weights"] = shared_weights;
    ctx->saved_data["has_head_bias"] = head_bias.has_value();
    ctx->set_materialize_grads(false);
    return {h_all, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& h_all = saved[1];
    const at::Tensor& bias = saved[4];
    const at::Tensor& head_weight = saved[5];
    // needs_input_grad() counts only the tensor arguments that were present (absent optionals have no edge).
    const bool present[6] = {true, true, true, bias.defined(), head_weight.defined(),
                             ctx->saved_data["has_head_bias"].toBool()};
    std::array<bool, 6> mask{};
    for (size_t i = 0, edge = 0; i < 6; ++i) mask[i] = present[i] && ctx->needs_input_grad(edge++);
    variable_list result(10);
    if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5])) return result;
    std::optional<at::Tensor> grad_h, grad_y;
    if (grads[0].defined()) grad_h = grads[0].contiguous();
    if (grads[1].defined() && head_weight.defined()) grad_y = grads[1].contiguous();
    const auto starts = ctx->saved_data["starts"].toIntVector();
    const auto activation = ctx->saved_data["activation"].toStringRef();
    auto outs = SpinalBackwardFunction::apply(grad_y, grad_h, x, h_all, saved[2], saved[3], opt(bias),
                                              opt(head_weight), starts, activation,
                                              ctx->saved_data["negative_slope"].toDouble(),
                                              ctx->saved_data["shared_weights"].toBool(), mask);
    for (int i = 0; i < 6; ++i) {
      if (mask[i]) result[i] = outs[i];
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> spinal_forward_autograd(
    const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts,
    c10::string_view activation, double negative_slope, bool shared_weights) {
  auto out = SpinalFunction::apply(x, weight_x, weight_h, bias, head_weight, head_bias, starts, activation,
                                   negative_slope, shared_weights);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spinal_backward_autograd(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& x,
    const at::Tensor& h_all, const at::Tensor& weight_x, const at::Tensor& weight_h,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight, c10::IntArrayRef starts,
    c10::string_view activation, double negative_slope, bool shared_weights, std::array<bool, 6> output_mask) {
  auto out = SpinalBackwardFunction::apply(grad_y, grad_h, x, h_all, weight_x, weight_h, bias, head_weight, starts,
                                           activation, negative_slope, shared_weights, output_mask);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace
}  // namespace spinal_ops

TORCH_LIBRARY_IMPL(spinal_ops, Autograd, m) {
  m.impl("spinal_forward", &spinal_ops::spinal_forward_autograd);
  m.impl("spinal_backward", &spinal_ops::spinal_backward_autograd);
}
