// The only TORCH_LIBRARY block of spinal_ops: the op schemas. (The argument checks every kernel shares are in
// spinal_args.cpp.)
//
// spinal_forward(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
//                negative_slope) -> (H, y)
//   x (B, D) contiguous; weight_x (S, w, c); weight_h (S-1, w, w); bias (S, w)?; head_weight (out, L*w)?;
//   head_bias (out)?; starts: L first columns, chunk i reads columns (starts[i] + j) mod D, j < c;
//   slots: L weight slots, sub-layer i uses weight_x[slots[i]], bias[slots[i]] and (i >= 1) weight_h[slots[i]-1]
//   (slots[0] = 0, slots[i] >= 1 for i >= 1, every slot used).
//   H (B, L*w) is the concatenated sub-layer outputs; y (B, out) the head output, or (B, 0) in hidden mode.
//
// _spinal_backward(grad_y, grad_H, x, H, weight_x, weight_h, bias, head_weight, starts, slots, activation,
//                 negative_slope, output_mask) -> (dx, dweight_x, dweight_h, dbias, dhead_weight, dhead_bias)
//   grad_y (B, out)? and grad_H (B, L*w)? are the incoming gradients (either may be absent). output_mask
//   says which of the six gradients to compute; the others come back as empty tensors. dhead_bias is only
//   meaningful when the forward had a head bias (the caller masks it off otherwise). Differentiable (double
//   backward): with grad mode on and an input that requires grad, its autograd kernel computes it as
//   _spinal_backward_reference, the same math in differentiable ATen ops (spinal_ops/reference.py).
#include <Python.h>

#include <torch/library.h>

#include "cpu/spinal_gemm.h"
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
      "Tensor? head_bias, int[] starts, int[] slots, str activation, float negative_slope) -> (Tensor, Tensor)");
  m.def(
      "_spinal_backward(Tensor? grad_y, Tensor? grad_H, Tensor x, Tensor H, Tensor weight_x, Tensor weight_h, "
      "Tensor? bias, Tensor? head_weight, int[] starts, int[] slots, str activation, float negative_slope, "
      "bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // _spinal_backward as differentiable ATen ops (CompositeImplicitAutograd, implemented in spinal_ops/ops.py by
  // reference.spinal_backward): what _spinal_backward's autograd kernel runs when its result must be
  // differentiable.
  m.def(
      "_spinal_backward_reference(Tensor? grad_y, Tensor? grad_H, Tensor x, Tensor H, Tensor weight_x, "
      "Tensor weight_h, Tensor? bias, Tensor? head_weight, int[] starts, int[] slots, str activation, "
      "float negative_slope, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The CUDA forward with its launch options forced: width path (0 automatic, 1 fast, 2 general) and tf32 tensor
  // cores for float32. CUDA kernel only; the GPU tests run every kernel path through it (tests/kernel_paths.py).
  m.def(
      "_spinal_forward_cuda_options(Tensor x, Tensor weight_x, Tensor weight_h, Tensor? bias, Tensor? head_weight, "
      "Tensor? head_bias, int[] starts, int[] slots, str activation, float negative_slope, int width_path, "
      "bool allow_tf32) -> (Tensor, Tensor)");
  // The instruction set the cpu kernels run ("avx512_bf16", "avx512", "avx2" or "baseline": csrc/cpu/spinal_gemm.h,
  // cpu_isa), for the benchmark's records, `python -m spinal_ops check` and the tests.
  m.def("_cpu_isa() -> str",
        [] { return std::string(spinal_ops::cpu::kIsaNames[static_cast<int>(spinal_ops::cpu::cpu_isa())]); });
  // op(a) @ op(b) on the cpu kernels' products (csrc/cpu/spinal_gemm.h; op = transpose when trans_*), float32 or
  // float64, in row blocks run as parallel jobs: how the tests check the products on awkward shapes and the
  // benchmark measures their rate.
  m.def("_cpu_gemm(Tensor a, Tensor b, bool trans_a, bool trans_b) -> Tensor");
  // The backward of weight * scale[..., None] (weight (..., k), scale (...)) from grad, that product's gradient:
  // returns scale's gradient, the rows' dot products of grad and weight (empty unless scale_grad), and scales grad in
  // place into weight's gradient, in one pass. With `columns`, of weight * scale[..., None, :] (weight (..., r, k),
  // scale (..., k)): the columns' dot products. What an eval-mode batch norm folded into the weights runs in training
  // (spinal_ops/ops.py, _fold_rows). CPU, float32 and float64, grad contiguous.
  m.def("_scale_rows_backward_inplace(Tensor(a!) grad, Tensor weight, Tensor scale, bool scale_grad, "
        "bool columns=False) -> Tensor");
  // The noise of F.dropout(self, p, training=True) on CPU, written into self: bernoulli(1 - p) / (1 - p) per element in
  // memory order, drawn from `generator` (default: the default CPU generator) exactly as ATen's serial bernoulli_
  // draws them, and leaving it in the same state (csrc/cpu/spinal_dropout.cpp). What the train-mode blocks of a layer
  // with dropout use where it matches this PyTorch's bernoulli_ (spinal_ops/ops.py, dropout). CPU, float32 and float64.
  m.def("_dropout_noise_(Tensor(a!) self, float p, Generator? generator=None) -> ()");
  // The shared argument checks as an op, for the backends written in Python (Triton): raises or returns nothing.
  m.def(
      "_check_args(str backend, Tensor x, Tensor weight_x, Tensor weight_h, Tensor? bias, Tensor? head_weight, "
      "Tensor? head_bias, int[] starts, int[] slots, str activation, float negative_slope) -> ()",
      &spinal_ops::check_args_op);
}
