// Emulated binding of the spinal kernels (see spinal_emulated.h): CPU tensors, the SIMT emulator.
//
// The argument checks are the shared ones of csrc/spinal_args.h; csrc/spinal_args.cpp is compiled into this
// library too (tests/cuda_emulated/build.py). The schemas are not: spinal_ops._C registers them.

#include "spinal_emulated.h"
#include "cuda/spinal_torch.h"

namespace spinal_ops::emulated {

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& head_weight,
                                           const std::optional<at::Tensor>& head_bias, std::vector<int64_t> starts,
                                           std::vector<int64_t> slots, const std::string& activation,
                                           double negative_slope, int width_path, bool allow_tf32) {
  TORCH_CHECK(x.device().is_cpu(), "spinal_ops emulated kernels run on CPU tensors, got ", x.device());
  cuda::LaunchOptions opt;
  opt.allow_tf32 = allow_tf32;
  opt.width_path = static_cast<cuda::WidthPath>(width_path);
  return cuda::forward_impl(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                            negative_slope, opt, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& x,
    const at::Tensor& h_all, const at::Tensor& weight_x, const at::Tensor& weight_h,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight, std::vector<int64_t> starts,
    std::vector<int64_t> slots, const std::string& activation, double negative_slope, std::array<bool, 6> output_mask) {
  TORCH_CHECK(x.device().is_cpu(), "spinal_ops emulated kernels run on CPU tensors, got ", x.device());
  return cuda::backward_impl(grad_y, grad_h, x, h_all, weight_x, weight_h, bias, head_weight, starts, slots,
                             activation, negative_slope, output_mask, nullptr);
}

void set_schedule(int schedule, uint64_t seed) { simt::set_schedule(static_cast<simt::Schedule>(schedule), seed); }

uint64_t launch_count() { return simt::launch_count(); }

std::vector<std::array<int64_t, 7>> launch_log() {
  std::vector<std::array<int64_t, 7>> out;
  for (const auto& r : simt::launch_log()) {
    out.push_back({r.grid[0], r.grid[1], r.grid[2], r.block[0], r.block[1], r.block[2], static_cast<int64_t>(r.smem)});
  }
  return out;
}

void clear_launch_log() { simt::clear_launch_log(); }

uint64_t layer_table_uploads() { return cuda::layer_table_uploads(); }

}  // namespace spinal_ops::emulated
