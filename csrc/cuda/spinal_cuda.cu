// CUDA binding of the spinal kernels: device guard, current stream, launch checks (inside the launchers,
// after every launch), and the registration for the CUDA dispatch key. Schemas: csrc/spinal_ops.cpp.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "spinal_torch.h"

namespace spinal_ops::cuda {
namespace {

// Launch errors as c10 CUDA errors (C10_CUDA_KERNEL_LAUNCH_CHECK's semantics), naming the kernel.
void check_cuda_launch(simt::Status s, const char* name) {
  if (s != cudaSuccess) {
    TORCH_CHECK(false, "spinal_ops cuda backend: launch of ", name, " failed: ", cudaGetErrorString(s),
                " (CUDA kernel errors may be reported asynchronously; CUDA_LAUNCH_BLOCKING=1 makes them synchronous)");
  }
}

std::tuple<at::Tensor, at::Tensor> spinal_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts,
    c10::IntArrayRef slots, c10::string_view activation, double negative_slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  LaunchOptions opt;
  opt.allow_tf32 = at::globalContext().allowTF32CuBLAS();
  return forward_impl(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots,
                      std::string_view(activation.data(), activation.size()), negative_slope, opt,
                      at::cuda::getCurrentCUDAStream().stream(), check_cuda_launch);
}

std::tuple<at::Tensor, at::Tensor> spinal_forward_cuda_options(
    const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts,
    c10::IntArrayRef slots, c10::string_view activation, double negative_slope, int64_t width_path, bool allow_tf32) {
  TORCH_CHECK(width_path >= 0 && width_path <= 2, "spinal_ops cuda backend: width_path must be 0 (automatic), 1 "
              "(fast) or 2 (general), got ", width_path);
  const c10::cuda::CUDAGuard guard(x.device());
  LaunchOptions opt;
  opt.allow_tf32 = allow_tf32;
  opt.width_path = static_cast<WidthPath>(width_path);
  return forward_impl(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots,
                      std::string_view(activation.data(), activation.size()), negative_slope, opt,
                      at::cuda::getCurrentCUDAStream().stream(), check_cuda_launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spinal_backward_cuda(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& x,
    const at::Tensor& h_all, const at::Tensor& weight_x, const at::Tensor& weight_h,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight, c10::IntArrayRef starts,
    c10::IntArrayRef slots, c10::string_view activation, double negative_slope, std::array<bool, 6> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return backward_impl(grad_y, grad_h, x, h_all, weight_x, weight_h, bias, head_weight, starts, slots,
                       std::string_view(activation.data(), activation.size()), negative_slope, output_mask,
                       at::cuda::getCurrentCUDAStream().stream(), check_cuda_launch);
}

}  // namespace
}  // namespace spinal_ops::cuda

TORCH_LIBRARY_IMPL(spinal_ops, CUDA, m) {
  m.impl("spinal_forward", &spinal_ops::cuda::spinal_forward_cuda);
  m.impl("_spinal_backward", &spinal_ops::cuda::spinal_backward_cuda);
  m.impl("_spinal_forward_cuda_options", &spinal_ops::cuda::spinal_forward_cuda_options);
}
