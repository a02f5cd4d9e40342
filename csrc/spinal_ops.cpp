// The only TORCH_LIBRARY block of spinal_ops: the op schemas. (The argument checks every kernel shares are in
// spinal_args.cpp.)
//
// spinal_forward(x, weight_x, weight_h, bias, head_weight, head_bias, starts, activation, negative_slope,
//                shared_weights) -> (H, y)
//   x (B, D) contiguous; weight_x (Lx, w, c); weight_h (Lh, w, w); bias (Lx, w)?; head_weight (out, L*w)?;
//   head_bias (out)?; starts: L first columns, chunk i reads columns (starts[i] + j) mod D, j < c.
//   H (B, L*w) is the concatenated sub-layer outputs; y (B, out) the head output, or (B, 0) in hidden mode.
//
// spinal_backward(grad_y, grad_H, x, H, weight_x, weight_h, bias, head_weight, starts, activation,
//                 negative_slope, shared_weights, output_mask) -> (dx, dweight_x, dweight_h, dbias,
//                 dhead_weight, dhead_bias)
//   grad_y (B, out)? and grad_H (B, L*w)? are the incoming gradients (either may be absent). output_mask
//   says which of the six gradients to compute; the others come back as empty tensors. dhead_bias is only
//   meaningful when the forward had a head bias (the caller masks it off otherwise).
#include <Python.h>

#include <torch/library.h>

#include "spinal_args.h"

// Importing spinal_ops._C loads this library, whose static initialisers register the ops. No Python
// bindings: everything is reached through torch.ops.spinal_ops.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(spinal_ops, m) {
  m.def(
      "spinal_forward(Tensor x, Tensor weight_x, Tensor weight_h, Tensor? bias, Tensor? head_weight, "
      "Tensor? head_bias, int[] starts, str activation, float negative_slope, bool shared_weights) "
      "-> (Tensor, Tensor)");
  m.def(
      "spinal_backward(Tensor? grad_y, Tensor? grad_H, Tensor x, Tensor H, Tensor weight_x, Tensor weight_h, "
      "Tensor? bias, Tensor? head_weight, int[] starts, str activation, float negative_slope, "
      "bool shared_weights, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The shared argument checks as an op, for the backends written in Python (Triton): raises or returns nothing.
  m.def(
      "_check_args(str backend, Tensor x, Tensor weight_x, Tensor weight_h, Tensor? bias, Tensor? head_weight, "
      "Tensor? head_bias, int[] starts, str activation, float negative_slope, bool shared_weights) -> ()",
      &spinal_ops::check_args_op);
}
