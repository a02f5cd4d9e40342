// Tensor-level entry points of the spinal kernels: argument checks, index limits and the backward's effective
// output mask (csrc/spinal_args.h), output and workspace allocation, and the launchers of spinal_launch.h. Shared
// by the CUDA binding (spinal_cuda.cu, CUDA tensors on the current stream) and the emulated binding
// (tests/cuda_emulated/spinal_emulated.cpp, CPU tensors).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <list>
#include <mutex>
#include <optional>
#include <utility>
#include <string_view>
#include <tuple>
#include <vector>

#include "../spinal_args.h"
#include "spinal_launch.h"

namespace spinal_ops::cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "spinal_ops (cuda backend): unsupported dtype ", t.scalar_type(),
                         "; expected float32, float64, float16 or bfloat16");
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
const T* cptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? cptr<T>(*t) : nullptr;
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return t.numel() > 0 ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// The kernels index rows, columns and weight slots with 32-bit integers (per dimension; offsets are 64-bit).
inline void check_int32_indices(const SpinalDims& d) {
  check_index_limits(d, "cuda",
                     {"the kernels' 32-bit index arithmetic",
                      "fewer than 2^31 rows, in_features, L*w, out_features and w*c (offsets are 64-bit)",
                      "split the batch, or use the triton or reference backend (spinal_ops.use_backend(...))",
                      /*weight_x_slot=*/true});
}

// starts then slots (2L entries) as one int32 tensor on the device of x (kernel arguments), uploaded once per
// distinct table and device and then reused: a call makes no host-to-device copy and no stream synchronisation
// once its table is cached (warm up before capturing a CUDA graph). The upload is a blocking copy from pageable
// memory, complete before any stream uses the tensor. At most kMaxTables are kept (least recently used go).
struct LayerTableCache {
  static constexpr size_t kMaxTables = 256;
  std::mutex mutex;
  std::list<std::pair<std::vector<int64_t>, at::Tensor>> entries;  // most recent first; key: device, then table
  uint64_t uploads = 0;
};

inline LayerTableCache& layer_table_cache() {
  static LayerTableCache cache;
  return cache;
}

// Tables uploaded so far in this process (cache misses); the emulated tests assert none on repeated calls.
inline uint64_t layer_table_uploads() {
  LayerTableCache& cache = layer_table_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return cache.uploads;
}

inline at::Tensor device_layer_table(const SpinalDims& d, c10::IntArrayRef starts, const at::Tensor& x) {
  std::vector<int64_t> key;
  key.reserve(2 + starts.size() + d.slots.size());
  key.push_back(static_cast<int64_t>(x.device().type()));
  key.push_back(x.device().index());
  key.insert(key.end(), starts.begin(), starts.end());
  key.insert(key.end(), d.slots.begin(), d.slots.end());
  LayerTableCache& cache = layer_table_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
    if (it->first == key) {
      cache.entries.splice(cache.entries.begin(), cache.entries, it);
      return it->second;
    }
  }
  std::vector<int> v(starts.begin(), starts.end());
  v.insert(v.end(), d.slots.begin(), d.slots.end());
  at::Tensor table = at::tensor(v, at::TensorOptions().dtype(at::kInt)).to(x.device());
  ++cache.uploads;
  cache.entries.emplace_front(std::move(key), table);
  if (cache.entries.size() > LayerTableCache::kMaxTables) cache.entries.pop_back();
  return table;
}

using LaunchCheck = void (*)(simt::Status, const char*);

// The emulated binding's launch check (the CUDA binding passes its own, raising c10 CUDA errors).
inline void check_launch(simt::Status s, const char* name) {
  TORCH_CHECK(simt::ok(s), "spinal_ops: launch of ", name, " failed: ", simt::error_string(s));
}

// The problem sizes and the slope every kernel parameter block carries (FwdParams, BwdParams), in the kernels'
// 32-bit ints (check_int32_indices has bounded them).
template <typename Params>
void set_sizes(Params& p, const SpinalDims& d) {
  p.rows = static_cast<int>(d.rows);
  p.in_features = static_cast<int>(d.in_features);
  p.layers = static_cast<int>(d.layers);
  p.width = static_cast<int>(d.width);
  p.chunk = static_cast<int>(d.chunk);
  p.out = static_cast<int>(d.out);
  p.slope = static_cast<decltype(p.slope)>(d.negative_slope);
}

inline std::tuple<at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& weight_x, const at::Tensor& weight_h,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight,
    const std::optional<at::Tensor>& head_bias, c10::IntArrayRef starts, c10::IntArrayRef slots,
    std::string_view activation, double negative_slope, LaunchOptions opt, simt::Stream stream,
    LaunchCheck check = check_launch) {
  const SpinalDims d = check_forward_args("cuda", x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots,
                                          activation, negative_slope);
  check_int32_indices(d);
  at::Tensor h_all = at::empty({d.rows, d.hidden()}, x.options());
  at::Tensor y = at::empty({d.rows, d.has_head ? d.out : 0}, x.options());
  if (d.rows == 0) return {h_all, y};
  at::Tensor table = device_layer_table(d, starts, x);
  with_dtype(dtype_of(x), [&](auto tag) {
    using T = typename decltype(tag)::type;
    at::Tensor y_ws;
    if (forward_needs_y_workspace<T>(static_cast<int>(d.out), d.has_head)) {
      y_ws = at::empty({d.rows, d.out}, x.options().dtype(std::is_same_v<T, double> ? at::kDouble : at::kFloat));
    }
    FwdParams<T> p{};
    p.x = cptr<T>(x);
    p.wx = cptr<T>(weight_x);
    p.wh = weight_h.numel() ? cptr<T>(weight_h) : nullptr;
    p.bias = cptr<T>(bias);
    p.wo = cptr<T>(head_weight);
    p.bo = cptr<T>(head_bias);
    p.starts = table.data_ptr<int>();
    p.slots = p.starts + d.layers;
    p.h_all = mptr<T>(h_all);
    p.y = d.has_head ? mptr<T>(y) : nullptr;
    p.y_ws = y_ws.defined() ? reinterpret_cast<acc_t<T>*>(y_ws.data_ptr()) : nullptr;
    set_sizes(p, d);
    launch_forward(p, d.activation, opt, stream, check);
  });
  return {h_all, y};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& x,
    const at::Tensor& h_all, const at::Tensor& weight_x, const at::Tensor& weight_h,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& head_weight, c10::IntArrayRef starts,
    c10::IntArrayRef slots, std::string_view activation, double negative_slope, std::array<bool, 6> mask,
    simt::Stream stream, LaunchCheck check = check_launch) {
  const SpinalDims d = check_forward_args("cuda", x, weight_x, weight_h, bias, head_weight, std::nullopt, starts,
                                          slots, activation, negative_slope);
  const std::array<bool, 6> m = check_backward_args("cuda", d, x, grad_y, grad_h, h_all, mask);
  check_int32_indices(d);
  auto none = [&] { return x.new_empty({0}); };
  at::Tensor dx = m[kGradX] ? at::empty_like(x) : none();
  at::Tensor dwx = m[kGradWeightX] ? at::empty_like(weight_x) : none();
  at::Tensor dwh = m[kGradWeightH] ? at::empty_like(weight_h) : none();
  at::Tensor db = m[kGradBias] ? at::empty_like(*bias) : none();
  at::Tensor dwo = m[kGradHeadWeight] ? at::empty_like(*head_weight) : none();
  at::Tensor dbo = m[kGradHeadBias] ? at::empty({d.out}, x.options()) : none();
  const bool chain = needs_chain(m);
  at::Tensor table = device_layer_table(d, starts, x);
  with_dtype(dtype_of(x), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    const auto acc_options = x.options().dtype(std::is_same_v<Acc, double> ? at::kDouble : at::kFloat);
    at::Tensor dz = chain ? at::empty({d.rows, d.layers, d.width}, acc_options) : at::Tensor();
    at::Tensor dx_acc = (m[kGradX] && !std::is_same_v<T, Acc>) ? at::empty({d.rows, d.in_features}, acc_options) : dx;
    BwdParams<T> p{};
    p.gy = d.has_head ? cptr<T>(grad_y) : nullptr;
    p.gh = cptr<T>(grad_h);
    p.x = cptr<T>(x);
    p.h_all = cptr<T>(h_all);
    p.wx = cptr<T>(weight_x);
    p.wh = weight_h.numel() ? cptr<T>(weight_h) : nullptr;
    p.bias = cptr<T>(bias);
    p.wo = cptr<T>(head_weight);
    p.starts = table.data_ptr<int>();
    p.slots = p.starts + d.layers;
    p.dz = dz.defined() ? reinterpret_cast<Acc*>(dz.data_ptr()) : nullptr;
    p.dx_acc = m[kGradX] && dx_acc.numel() ? reinterpret_cast<Acc*>(dx_acc.data_ptr()) : nullptr;
    p.dx = m[kGradX] ? mptr<T>(dx) : nullptr;
    p.dwx = m[kGradWeightX] ? mptr<T>(dwx) : nullptr;
    p.dwh = m[kGradWeightH] ? mptr<T>(dwh) : nullptr;
    p.db = m[kGradBias] ? mptr<T>(db) : nullptr;
    p.dwo = m[kGradHeadWeight] ? mptr<T>(dwo) : nullptr;
    p.dbo = m[kGradHeadBias] ? mptr<T>(dbo) : nullptr;
    set_sizes(p, d);
    p.x_slots = static_cast<int>(d.x_slots);
    p.h_slots = static_cast<int>(d.h_slots);
    const int64_t partials = weight_partial_elements(p);
    at::Tensor wpart = partials ? at::empty({partials}, acc_options) : at::Tensor();
    p.wpart = wpart.defined() ? reinterpret_cast<Acc*>(wpart.data_ptr()) : nullptr;
    launch_backward(p, d.activation, stream, check);
  });
  return {dx, dwx, dwh, db, dwo, dbo};
}

}  // namespace spinal_ops::cuda
