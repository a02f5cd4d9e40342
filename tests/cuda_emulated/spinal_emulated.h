// Emulated binding of the spinal kernels: the same kernel sources, compiled by the host compiler against
// the SIMT emulator of simt.h, run on CPU tensors. Used by the `emulated` tests; not part of spinal_ops._C.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace spinal_ops::emulated {

// width_path: 0 automatic, 1 fast (w <= 64), 2 general.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& head_weight,
                                           const std::optional<at::Tensor>& head_bias, std::vector<int64_t> starts,
                                           std::vector<int64_t> slots, const std::string& activation,
                                           double negative_slope, int width_path, bool allow_tf32);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& x,
    const at::Tensor& h_all, const at::Tensor& weight_x, const at::Tensor& weight_h,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight, std::vector<int64_t> starts,
    std::vector<int64_t> slots, const std::string& activation, double negative_slope, std::array<bool, 6> output_mask);

// Emulator schedule (0 forward, 1 reverse, 2 random with `seed`) and the number of launches so far.
void set_schedule(int schedule, uint64_t seed);
uint64_t launch_count();
// The most recent launches, oldest first, as (grid x, grid y, grid z, block x, block y, block z, shared memory
// bytes); clear_launch_log() empties the log.
std::vector<std::array<int64_t, 7>> launch_log();
void clear_launch_log();
// Layer tables (starts, slots) copied to the device so far: one per distinct table, none per call.
uint64_t layer_table_uploads();

}  // namespace spinal_ops::emulated
