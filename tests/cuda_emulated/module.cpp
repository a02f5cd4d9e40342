// Python module of the emulated CUDA kernels, for tests/test_cuda_emulated.py: the spinal kernels through
// spinal_emulated.cpp, the emulator controls, and the planted-bug kernels of planted.h.
#include <torch/extension.h>

#include "spinal_emulated.h"
#include "planted.h"

namespace {

at::Tensor planted_block_sum(bool missing_barrier, const at::Tensor& values) {
  TORCH_CHECK(values.dtype() == at::kFloat && values.dim() == 1 && values.numel() % planted::kThreads == 0,
              "planted_block_sum: expects a float32 vector of a multiple of ", planted::kThreads, " values");
  at::Tensor in = values.contiguous();
  const int blocks = static_cast<int>(in.numel() / planted::kThreads);
  at::Tensor out = at::full({blocks}, -1.0f, in.options());
  planted::run_block_sum(missing_barrier, in.data_ptr<float>(), out.data_ptr<float>(), blocks);
  return out;
}

at::Tensor planted_early_return(int active) {
  at::Tensor out = at::zeros({planted::kThreads}, at::kFloat);
  planted::run_early_return(out.data_ptr<float>(), active);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace e = spinal_ops::emulated;
  m.def("forward", &e::forward);
  m.def("backward", &e::backward);
  m.def("set_schedule", &e::set_schedule);
  m.def("launch_count", &e::launch_count);
  m.def("launch_log", &e::launch_log);
  m.def("clear_launch_log", &e::clear_launch_log);
  m.def("layer_table_uploads", &e::layer_table_uploads);
  m.def("planted_block_sum", &planted_block_sum);
  m.def("planted_early_return", &planted_early_return);
}
