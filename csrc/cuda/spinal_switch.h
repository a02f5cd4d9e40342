// The one place where runtime choices become template parameters of the spinal kernels.
//
// Each `with_*` calls `f` with a compile-time tag for the runtime value (std::integral_constant, or a type
// tag for the dtype), so a launcher reads
//     with_activation(act, [&](auto A) { launch(spinal_fwd_kernel<T, A.value, ...>, ...); });
// and every instantiation the dispatch can reach is listed here, in one switch per choice.
#pragma once

#include <type_traits>

#include "spinal_common.cuh"

namespace spinal_ops::cuda {

// Element types, as the bindings name them.
enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(TypeTag<float>{}); break;
    case DType::kFloat64: f(TypeTag<double>{}); break;
    case DType::kFloat16: f(TypeTag<__half>{}); break;
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
  }
}

template <Act A>
using ActTag = std::integral_constant<Act, A>;

template <typename F>
void with_activation(Act a, F&& f) {
  switch (a) {
    case Act::kRelu: f(ActTag<Act::kRelu>{}); break;
    case Act::kLeakyRelu: f(ActTag<Act::kLeakyRelu>{}); break;
    case Act::kTanh: f(ActTag<Act::kTanh>{}); break;
    case Act::kSigmoid: f(ActTag<Act::kSigmoid>{}); break;
    case Act::kIdentity: f(ActTag<Act::kIdentity>{}); break;
    case Act::kGelu: f(ActTag<Act::kGelu>{}); break;
    case Act::kSilu: f(ActTag<Act::kSilu>{}); break;
  }
}

// Forward width path: the fast path (w <= 64, h in shared memory) or the general one (any w).
template <typename F>
void with_width_path(bool fast, F&& f) {
  if (fast) {
    f(std::integral_constant<int, BN>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

// Tile product of the forward: tensor cores for fp16/bf16, tf32 tensor cores for fp32 when allowed, FMA
// otherwise (fp64 always).
template <typename T, typename F>
void with_mma(bool allow_tf32, F&& f) {
  if constexpr (is_16bit<T>) {
    f(std::integral_constant<Mma, Mma::kHalf>{});
  } else if constexpr (std::is_same_v<T, float>) {
    if (allow_tf32) {
      f(std::integral_constant<Mma, Mma::kTf32>{});
    } else {
      f(std::integral_constant<Mma, Mma::kNone>{});
    }
  } else {
    f(std::integral_constant<Mma, Mma::kNone>{});
  }
}

// Backward: whether act' needs the recomputed pre-activation (gelu, silu; leaky_relu with a negative
// slope). Only the activations that can need it get the `true` instantiation, and only those that can do
// without it get `false`.
template <Act A, typename F>
void with_recompute(bool negative_slope, F&& f) {
  if constexpr (A == Act::kGelu || A == Act::kSilu) {
    f(std::true_type{});
  } else if constexpr (A == Act::kLeakyRelu) {
    if (negative_slope) {
      f(std::true_type{});
    } else {
      f(std::false_type{});
    }
  } else {
    f(std::false_type{});
  }
}

}  // namespace spinal_ops::cuda
