// The sub-layer activations of every native kernel: one enum, one name table, one forward function and one
// derivative function, compiled as plain C++ by the CPU kernel (csrc/cpu/spinal_cpu.cpp) and the emulated CUDA
// build (tests/cuda_emulated/build.py), and as __host__ __device__ code by nvcc for the CUDA kernels
// (csrc/cuda/spinal_common.cuh). The math is spinal_ops/reference.py's.
//
// The functions are templates on the activation, so every kernel loop is instantiated per activation and
// carries no branch on it; F is float or double (the CPU element type, the CUDA accumulation type).
#pragma once

#include <math.h>

#include <cstddef>
#include <string_view>
#include <type_traits>

#if defined(__CUDACC__)
#define SPINAL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPINAL_HOST_DEVICE inline
#endif

namespace spinal_ops {

// Sub-layer activations, in the order of reference.ACTIVATIONS and of kActivationNames.
enum class Activation : int { kRelu = 0, kLeakyRelu, kTanh, kSigmoid, kIdentity, kGelu, kSilu };

// The `activation` argument's names, indexed by Activation.
inline constexpr std::string_view kActivationNames[] = {"relu", "leaky_relu", "tanh", "sigmoid",
                                                        "identity", "gelu", "silu"};
inline constexpr int kNumActivations = static_cast<int>(sizeof(kActivationNames) / sizeof(kActivationNames[0]));
static_assert(static_cast<int>(Activation::kSilu) + 1 == kNumActivations, "one name per activation");

// True when act'(Z) cannot be computed from h = act(Z) alone (the kernels then recompute Z).
SPINAL_HOST_DEVICE bool needs_preactivation(Activation a, double negative_slope) {
  return a == Activation::kGelu || a == Activation::kSilu || (a == Activation::kLeakyRelu && negative_slope < 0.0);
}

// Where act'(Z) of A can come from (the kernels instantiate only those): h = act(Z) for every activation but
// gelu and silu; Z for gelu, silu and leaky_relu (whose negative slope makes h ambiguous at the sign).
template <Activation A>
inline constexpr bool kDerivativeFromH = A != Activation::kGelu && A != Activation::kSilu;
template <Activation A>
inline constexpr bool kDerivativeFromZ =
    A == Activation::kGelu || A == Activation::kSilu || A == Activation::kLeakyRelu;

// Calls fn(std::integral_constant<Activation, A>{}) for the runtime activation a (host code).
template <typename F>
void with_activation(Activation a, F&& fn) {
  using A = Activation;
  switch (a) {
    case A::kRelu: fn(std::integral_constant<A, A::kRelu>{}); break;
    case A::kLeakyRelu: fn(std::integral_constant<A, A::kLeakyRelu>{}); break;
    case A::kTanh: fn(std::integral_constant<A, A::kTanh>{}); break;
    case A::kSigmoid: fn(std::integral_constant<A, A::kSigmoid>{}); break;
    case A::kIdentity: fn(std::integral_constant<A, A::kIdentity>{}); break;
    case A::kGelu: fn(std::integral_constant<A, A::kGelu>{}); break;
    case A::kSilu: fn(std::integral_constant<A, A::kSilu>{}); break;
  }
}

namespace act_math {
// The C math functions by type (host and device).
SPINAL_HOST_DEVICE float exp(float v) { return ::expf(v); }
SPINAL_HOST_DEVICE double exp(double v) { return ::exp(v); }
SPINAL_HOST_DEVICE float tanh(float v) { return ::tanhf(v); }
SPINAL_HOST_DEVICE double tanh(double v) { return ::tanh(v); }
SPINAL_HOST_DEVICE float erf(float v) { return ::erff(v); }
SPINAL_HOST_DEVICE double erf(double v) { return ::erf(v); }
}  // namespace act_math

// act(z). Written as selects (no branch on the sign: the CPU loops vectorize); NaN propagates, as in torch.relu.
// gelu is the exact erf form of nn.GELU(): 0.7071... is 1 / sqrt(2); in act' below, 0.3989... is 1 / sqrt(2 pi).
template <Activation A, typename F>
SPINAL_HOST_DEVICE F activation_forward(F z, F slope) {
  if constexpr (A == Activation::kRelu) return z < F(0) ? F(0) : z;
  if constexpr (A == Activation::kLeakyRelu) return z * (z < F(0) ? slope : F(1));
  if constexpr (A == Activation::kTanh) return act_math::tanh(z);
  if constexpr (A == Activation::kSigmoid) return F(1) / (F(1) + act_math::exp(-z));
  if constexpr (A == Activation::kIdentity) return z;
  if constexpr (A == Activation::kGelu) return F(0.5) * z * (F(1) + act_math::erf(z * F(0.70710678118654752440)));
  if constexpr (A == Activation::kSilu) return z / (F(1) + act_math::exp(-z));
}

// act'(Z) from v: the pre-activation Z itself when kFromZ, else the output h = act(Z). Which one a call needs
// is needs_preactivation(): from h for relu, leaky_relu with slope >= 0, tanh, sigmoid and identity; from Z for
// gelu, silu and leaky_relu with a negative slope (leaky_relu works from either).
template <Activation A, bool kFromZ, typename F>
SPINAL_HOST_DEVICE F activation_derivative(F v, F slope) {
  static_assert(kFromZ ? kDerivativeFromZ<A> : kDerivativeFromH<A>, "act' of A is not computed from this value");
  if constexpr (A == Activation::kRelu) return v > F(0) ? F(1) : F(0);
  if constexpr (A == Activation::kLeakyRelu) return v > F(0) ? F(1) : slope;
  if constexpr (A == Activation::kTanh) return F(1) - v * v;
  if constexpr (A == Activation::kSigmoid) return v * (F(1) - v);
  if constexpr (A == Activation::kIdentity) return F(1);
  if constexpr (A == Activation::kGelu) {
    const F cdf = F(0.5) * (F(1) + act_math::erf(v * F(0.70710678118654752440)));
    const F pdf = act_math::exp(F(-0.5) * v * v) * F(0.39894228040143267794);
    return cdf + v * pdf;
  }
  if constexpr (A == Activation::kSilu) {
    const F s = F(1) / (F(1) + act_math::exp(-v));
    return s * (F(1) + v * (F(1) - s));
  }
}

}  // namespace spinal_ops
