// The one place where runtime choices become template parameters of the spinal kernels.
//
// Each `with_*` calls `f` with a compile-time tag for the runtime value (std::integral_constant, or a type
// tag for the dtype), so a launcher reads
//     with_activation(act, [&](auto A) { launch(spinal_fwd_kernel<T, A.value, ...>, ...); });
// and every instantiation the dispatch can reach is listed here, in one switch per choice; the activation's
// switch, with_activation, is the one of csrc/spinal_activation.h that the CPU kernel uses too.
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
// slope). Only the activations whose act' can come from Z get the `true` instantiation, and only those whose act'
// can come from h get `false` (kDerivativeFromZ / kDerivativeFromH of csrc/spinal_activation.h).
template <Activation A, typename F>
void with_recompute(bool negative_slope, F&& f) {
  if constexpr (kDerivativeFromZ<A> && kDerivativeFromH<A>) {
    if (negative_slope) {
      f(std::true_type{});
    } else {
      f(std::false_type{});
    }
  } else if constexpr (kDerivativeFromZ<A>) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace spinal_ops::cuda
