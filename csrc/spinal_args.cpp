// Argument checks shared by every native kernel (CPU, CUDA and the emulated CUDA build): the op arguments, the
// backward's output mask and the 32-bit index limits; see spinal_args.h.
#include "spinal_args.h"

#include <c10/util/Exception.h>

#include <array>
#include <limits>
#include <sstream>
#include <string>

// Every message starts by naming the backend whose kernel refused the arguments.
#define SPINAL_PREFIX "spinal_ops ", std::string(backend), " backend: "

namespace spinal_ops {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_tensor(std::string_view backend, const at::Tensor& t, const char* name, const at::Tensor& x,
                  c10::IntArrayRef expected) {
  TORCH_CHECK(t.device() == x.device(), SPINAL_PREFIX, name, " must be on the device of x (", x.device(),
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), SPINAL_PREFIX, name, " must have the dtype of x (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, SPINAL_PREFIX, name, " must have shape ", expected, ", got ",
              shape_str(t));
  TORCH_CHECK(t.is_contiguous(), SPINAL_PREFIX, name, " must be contiguous");
}

}  // namespace

Activation parse_activation(std::string_view name, std::string_view backend) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
  }
  std::string allowed;
  for (std::string_view n : kActivationNames) allowed.append(allowed.empty() ? "" : ", ").append(n);
  TORCH_CHECK(false, SPINAL_PREFIX, "activation must be one of ", allowed, "; got '", std::string(name), "'");
}

SpinalDims check_forward_args(std::string_view backend, const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight,
                              const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts,
                              c10::IntArrayRef slots, std::string_view activation, double negative_slope) {
  SpinalDims d;
  d.activation = parse_activation(activation, backend);
  d.negative_slope = negative_slope;
  TORCH_CHECK(x.dim() == 2, SPINAL_PREFIX, "x must be 2-D (B, D), got shape ", shape_str(x));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), SPINAL_PREFIX, "x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), SPINAL_PREFIX, "x must be contiguous");
  d.rows = x.size(0);
  d.in_features = x.size(1);
  d.layers = static_cast<int64_t>(starts.size());
  TORCH_CHECK(d.layers >= 1, SPINAL_PREFIX, "starts must hold one entry per sub-layer (>= 1), got 0");
  TORCH_CHECK(d.in_features >= 1, SPINAL_PREFIX, "x must have at least one column, got shape ", shape_str(x));
  TORCH_CHECK(weight_x.dim() == 3, SPINAL_PREFIX, "weight_x must be 3-D (S, w, c), got shape ", shape_str(weight_x));
  d.width = weight_x.size(1);
  d.chunk = weight_x.size(2);
  TORCH_CHECK(weight_x.size(0) >= 1 && d.width >= 1 && d.chunk >= 1, SPINAL_PREFIX,
              "weight_x must have S >= 1 slots, w >= 1 and c >= 1, got shape ",
              shape_str(weight_x));
  TORCH_CHECK(d.chunk <= d.in_features, SPINAL_PREFIX, "chunk size c = weight_x.size(2) = ", d.chunk,
              " must be at most D = ", d.in_features);
  for (int64_t i = 0; i < d.layers; ++i) {
    TORCH_CHECK(starts[i] >= 0 && starts[i] < d.in_features, SPINAL_PREFIX, "starts[", i, "] must be in [0, ",
                d.in_features, "), got ", starts[i]);
  }
  d.slots = slots;
  d.x_slots = weight_x.size(0);
  d.h_slots = d.x_slots - 1;
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == d.layers, SPINAL_PREFIX, "slots must hold one entry per ",
              "sub-layer (", d.layers, ", as starts), got ", slots.size());
  TORCH_CHECK(slots[0] == 0, SPINAL_PREFIX, "slots[0] must be 0 (sub-layer 0 has its own slot), got ", slots[0]);
  for (int64_t i = 1; i < d.layers; ++i) {
    TORCH_CHECK(slots[i] >= 1 && slots[i] < d.x_slots, SPINAL_PREFIX, "slots[", i, "] must be in [1, ", d.x_slots,
                ") (weight_x has ", d.x_slots, " slots; slot 0 belongs to sub-layer 0 alone), got ", slots[i]);
  }
  for (int64_t s = 0; s < d.x_slots; ++s) {
    TORCH_CHECK(d.slot_uses(s) > 0, SPINAL_PREFIX, "weight slot ", s, " is used by no sub-layer (slots = ", slots,
                "); weight_x must have exactly max(slots) + 1 slots");
  }
  check_tensor(backend, weight_x, "weight_x", x, {d.x_slots, d.width, d.chunk});
  check_tensor(backend, weight_h, "weight_h", x, {d.h_slots, d.width, d.width});
  d.has_bias = bias.has_value();
  if (d.has_bias) check_tensor(backend, *bias, "bias", x, {d.x_slots, d.width});
  d.has_head = head_weight.has_value();
  if (d.has_head) {
    TORCH_CHECK(head_weight->dim() == 2, SPINAL_PREFIX, "head_weight must be 2-D (out, L*w), got shape ",
                shape_str(*head_weight));
    d.out = head_weight->size(0);
    check_tensor(backend, *head_weight, "head_weight", x, {d.out, d.hidden()});
  }
  d.has_head_bias = head_bias.has_value();
  if (d.has_head_bias) {
    TORCH_CHECK(d.has_head, SPINAL_PREFIX, "head_bias given without head_weight (hidden mode has no head)");
    check_tensor(backend, *head_bias, "head_bias", x, {d.out});
  }
  return d;
}

std::array<bool, 6> check_backward_args(std::string_view backend, const SpinalDims& dims, const at::Tensor& x,
                                        const std::optional<at::Tensor>& grad_y,
                                        const std::optional<at::Tensor>& grad_h, const at::Tensor& h_all,
                                        std::array<bool, 6> output_mask) {
  check_tensor(backend, h_all, "H", x, {dims.rows, dims.hidden()});
  if (grad_y.has_value()) {
    TORCH_CHECK(dims.has_head, SPINAL_PREFIX, "grad_y given in hidden mode (no head_weight)");
    check_tensor(backend, *grad_y, "grad_y", x, {dims.rows, dims.out});
  }
  if (grad_h.has_value()) check_tensor(backend, *grad_h, "grad_H", x, {dims.rows, dims.hidden()});
  return effective_output_mask(dims, output_mask);
}

void check_index_limits(const SpinalDims& d, std::string_view backend, const IndexLimits& limits) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  struct Size {
    const char* argument;
    int64_t value;
    const char* tensor;               // the tensor whose size it is, and its shape (formatted only on failure)
    std::array<int64_t, 3> shape;
    size_t dims;
    const char* unit;                 // what of that tensor the size counts
  };
  const int64_t lw = d.hidden();
  const Size sizes[] = {
      {"the number of rows of x (B)", d.rows, "x", {d.rows, d.in_features}, 2, "rows"},
      {"in_features (D)", d.in_features, "x", {d.rows, d.in_features}, 2, "columns"},
      {"num_layers * layer_width (L*w)", lw, "H", {d.rows, lw}, 2, "columns"},
      {"out_features", d.out, "head_weight", {d.out, lw}, 2, "rows"},
      {"layer_width * chunk (w*c)", limits.weight_x_slot ? d.width * d.chunk : 0, "weight_x",
       {d.x_slots, d.width, d.chunk}, 3, "elements per slot"}};
  for (const Size& s : sizes) {
    TORCH_CHECK_VALUE(s.value <= kMax, SPINAL_PREFIX, s.argument, " must be at most 2^31 - 1, got ", s.value, ": ",
                      s.tensor, " ", c10::IntArrayRef(s.shape.data(), s.dims), " has ", s.value, " ", s.unit,
                      ", past ", std::string(limits.arithmetic), "; supported: ", std::string(limits.supported),
                      "; ", std::string(limits.fallback));
  }
}

void check_args_op(c10::string_view backend, const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight,
                   const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts, c10::IntArrayRef slots,
                   c10::string_view activation, double negative_slope) {
  check_forward_args(backend, x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                     negative_slope);
}

}  // namespace spinal_ops
