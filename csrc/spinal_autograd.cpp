// Autograd of the native spinal ops (CPU and CUDA kernels), in C++ so that a training step pays no Python
// overhead per call. The fake kernels and the autograd of the Triton ops live in spinal_ops/ops.py; the formula
// is the same: saved for backward are x, H and the weights, nothing else.
//
// Double backward: _spinal_backward is differentiable. Its autograd kernel runs the fused kernel whenever its result
// needs no graph (grad mode off, as in every first-order backward, or no input requiring grad), and otherwise
// _spinal_backward_reference: the same math in differentiable ATen ops (reference.spinal_backward), whose graph
// autograd differentiates to any order (create_graph=True: gradient penalties, Hessian-vector products).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
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
                                                      c10::IntArrayRef, c10::string_view, double);
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardOp = Grads(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef, c10::string_view,
                         double, std::array<bool, 6>);

const c10::TypedOperatorHandle<ForwardOp>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("spinal_ops::spinal_forward", "").typed<ForwardOp>();
  return op;
}

const c10::TypedOperatorHandle<BackwardOp>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("spinal_ops::_spinal_backward", "").typed<BackwardOp>();
  return op;
}

const c10::TypedOperatorHandle<BackwardOp>& reference_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinal_ops::_spinal_backward_reference", "")
                             .typed<BackwardOp>();
  return op;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// Whether autograd must see t: it requires grad, or carries a forward-mode tangent.
bool tracked(const at::Tensor& t) { return t.requires_grad() || t._fw_grad(0).defined(); }
bool tracked(const std::optional<at::Tensor>& t) { return t.has_value() && tracked(*t); }

class SpinalFunction : public torch::autograd::Function<SpinalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight_x,
                               const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& head_weight,
                               const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts,
                               c10::IntArrayRef slots, c10::string_view activation, double negative_slope) {
    at::Tensor h_all, y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(h_all, y) =
          forward_op().call(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                            negative_slope);
    }
    ctx->save_for_backward({x, h_all, weight_x, weight_h, bias.value_or(at::Tensor()),
                            head_weight.value_or(at::Tensor())});
    ctx->saved_data["starts"] = starts.vec();
    ctx->saved_data["slots"] = slots.vec();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
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
    const std::array<bool, 6> inputs =
        grad_inputs(bias.defined(), head_weight.defined(), ctx->saved_data["has_head_bias"].toBool());
    std::array<bool, 6> asked{};
    for (size_t i = 0, edge = 0; i < asked.size(); ++i) {
      if (inputs[i]) asked[i] = ctx->needs_input_grad(edge++);
    }
    const std::array<bool, 6> mask = effective_output_mask(inputs, asked);
    variable_list result(10);
    if (std::none_of(mask.begin(), mask.end(), [](bool b) { return b; })) return result;
    std::optional<at::Tensor> grad_h, grad_y;
    if (grads[0].defined()) grad_h = grads[0].contiguous();
    if (grads[1].defined() && head_weight.defined()) grad_y = grads[1].contiguous();
    const auto starts = ctx->saved_data["starts"].toIntVector();
    const auto slots = ctx->saved_data["slots"].toIntVector();
    const auto activation = ctx->saved_data["activation"].toStringRef();
    // Through the dispatcher: _spinal_backward's autograd kernel below (differentiable under create_graph=True).
    auto [dx, dwx, dwh, db, dwo, dbo] =
        backward_op().call(grad_y, grad_h, x, h_all, saved[2], saved[3], opt(bias), opt(head_weight), starts, slots,
                           activation, ctx->saved_data["negative_slope"].toDouble(), mask);
    const at::Tensor outs[6] = {dx, dwx, dwh, db, dwo, dbo};
    for (int i = 0; i < 6; ++i) {
      if (mask[i]) result[i] = outs[i];
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> spinal_forward_autograd(
    const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts,
    c10::IntArrayRef slots, c10::string_view activation, double negative_slope) {
  // Nothing to record (grad mode off, as under torch.no_grad and in inference, or no input requiring grad): the
  // kernel directly, without the autograd node and its saved state (a few microseconds per call).
  // (Dual tensors of forward-mode AD still go through the autograd function, which refuses them.)
  if (!at::GradMode::is_enabled() || !(tracked(x) || tracked(weight_x) || tracked(weight_h) || tracked(bias) ||
                                       tracked(head_weight) || tracked(head_bias))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                             negative_slope);
  }
  auto out = SpinalFunction::apply(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                                   negative_slope);
  return {out[0], out[1]};
}

Grads spinal_backward_autograd(const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h,
                               const at::Tensor& x, const at::Tensor& h_all, const at::Tensor& weight_x,
                               const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& head_weight, c10::IntArrayRef starts,
                               c10::IntArrayRef slots, c10::string_view activation, double negative_slope,
                               std::array<bool, 6> output_mask) {
  const bool differentiable =
      at::GradMode::is_enabled() &&
      (requires_grad(grad_y) || requires_grad(grad_h) || x.requires_grad() || h_all.requires_grad() ||
       weight_x.requires_grad() || weight_h.requires_grad() || requires_grad(bias) || requires_grad(head_weight));
  if (differentiable) {
    return reference_backward_op().call(grad_y, grad_h, x, h_all, weight_x, weight_h, bias, head_weight, starts,
                                        slots, activation, negative_slope, output_mask);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(grad_y, grad_h, x, h_all, weight_x, weight_h, bias, head_weight, starts, slots,
                            activation, negative_slope, output_mask);
}

}  // namespace
}  // namespace spinal_ops

TORCH_LIBRARY_IMPL(spinal_ops, Autograd, m) {
  m.impl("spinal_forward", &spinal_ops::spinal_forward_autograd);
  m.impl("_spinal_backward", &spinal_ops::spinal_backward_autograd);
}
