// The _dropout_noise_ op: the noise of PyTorch's CPU dropout, drawn faster from the same generator.
//
// `F.dropout(x, p, training=True)` on a CPU tensor is, in ATen (`_dropout_impl`): noise = empty_like(x);
// noise.bernoulli_(1 - p); noise.div_(1 - p); return x * noise. Except on Intel CPUs with an MKL build of PyTorch
// (there ATen draws with MKL's own generator, seeded from torch's, another stream), its bernoulli_ takes ATen's serial
// path: for each element in memory order, two 32-bit draws hi, lo of the generator's mt19937 make a 64-bit word whose
// low 53 bits u give the element 1 when u * 2^-53 < 1 - p, else 0. That path makes one generator call per draw through
// the TensorIterator machinery (~20 ns an element on the benchmark machines): a third to a half of a train-mode head's
// step (README, "Dropout / batch-norm heads").
//
// This op writes the same values, noise[i] = bernoulli(1 - p) / (1 - p), consuming the generator's state exactly as
// bernoulli_ does (the same words, the same state after it), from a copy of the state: the state is regenerated 624
// words at a time in vectorised loops, and eight elements a step are tempered and compared from the state's words in
// vector registers. u * 2^-53 < 1 - p is compared as the integer u < ceil((1 - p) * 2^53) (the same test: u * 2^-53 and
// (1 - p) * 2^53 are exact in double). spinal_ops uses it only where a probe has shown it to match this PyTorch's own
// bernoulli_ (spinal_ops/ops.py, `dropout`): where bernoulli_ draws otherwise, F.dropout runs.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "spinal_gemm.h"  // SPINAL_CLONES

namespace spinal_ops::cpu {
namespace {

constexpr int kStateWords = at::MERSENNE_STATE_N;  // 624
constexpr int kShift = at::MERSENNE_STATE_M;       // 397
constexpr uint32_t kMatrixA = 0x9908b0df, kUpperBit = 0x80000000, kLowerBits = 0x7fffffff;

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & kUpperBit) | (v & kLowerBits)) >> 1) ^ ((v & 1) ? kMatrixA : 0u);
}

// mt19937_engine::next_state: s[i] = s[i + 397 mod 624] ^ twist(s[i], s[i + 1 mod 624]), i = 0 .. 623 in order, in
// place. Split where the word 397 ahead has already been replaced (i >= 227), so that no loop reads what it writes:
// each vectorises.
SPINAL_CLONES void regenerate(uint32_t* s) {
  constexpr int kHead = kStateWords - kShift;  // 227: s[i + 397] still old
  for (int i = 0; i < kHead; ++i) s[i] = s[i + kShift] ^ twist(s[i], s[i + 1]);
  for (int i = kHead; i < 2 * kHead; ++i) s[i] = s[i - kHead] ^ twist(s[i], s[i + 1]);  // reads new s[0 .. 227)
  for (int i = 2 * kHead; i < kStateWords - 1; ++i) s[i] = s[i - kHead] ^ twist(s[i], s[i + 1]);
  s[kStateWords - 1] = s[kShift - 1] ^ twist(s[kStateWords - 1], s[0]);
}

// mt19937's tempering of a state word: of one (uint32_t) or of a vector of them, lane by lane.
template <typename U>
inline U temper(U y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  return y ^ (y >> 18);
}

constexpr int64_t kLow53 = (int64_t{1} << 53) - 1;

// One element from its two tempered words: scale when the 53 low bits of hi << 32 | lo are below `below`, else 0.
template <typename T>
inline T keep_or_drop_one(uint32_t hi, uint32_t lo, int64_t below, T scale) {
  const int64_t u = ((static_cast<int64_t>(hi) << 32) | lo) & kLow53;
  return u < below ? scale : T(0);
}

// One element from its two words, drawn one at a time as mt19937_engine::operator() draws them: decrement left_,
// regenerate when it reaches 0 (left_ = 624, next_ = 0), return state_[next_++] tempered. For an element whose words
// straddle a regeneration.
template <typename T>
T draw_one(at::mt19937_data_pod& d, int64_t below, T scale) {
  uint32_t w[2];
  for (uint32_t& word : w) {
    if (--d.left_ == 0) {
      regenerate(d.state_.data());
      d.left_ = kStateWords;
      d.next_ = 0;
    }
    word = temper(d.state_[d.next_++]);
  }
  return keep_or_drop_one(w[0], w[1], below, scale);
}

#if defined(__GNUC__)
#define SPINAL_VECTOR_WORDS 1
using U32x8 = uint32_t __attribute__((vector_size(32)));
using U64x4 = uint64_t __attribute__((vector_size(32)));
using I64x4 = int64_t __attribute__((vector_size(32)));
using I32x8 = int32_t __attribute__((vector_size(32)));
#endif

// Element i's mask from its two state words, s[2i] (hi) and s[2i + 1] (lo), tempered: all ones when the 53 low bits of
// hi << 32 | lo are below `below` (kept), else zero. Four elements a vector: their eight words loaded as four 64-bit
// lanes (s[2i] in a lane's low half: x86 and aarch64 are little-endian), tempered as eight 32-bit lanes, each lane's
// halves swapped into hi << 32 | lo and compared.
#if SPINAL_VECTOR_WORDS
inline I64x4 kept_lanes(const uint32_t* s, int64_t below) {
  U32x8 words;
  std::memcpy(&words, s, sizeof(words));
  const U64x4 pair = reinterpret_cast<U64x4>(temper(words));
  return (reinterpret_cast<I64x4>((pair << 32) | (pair >> 32)) & kLow53) < below;
}
#endif

// out[i] for i < n from the ready words s[0 .. 2n) of the state: scale where element i is kept, else 0; eight elements
// a step, the masks and-ed with scale's bits (float32: the two vectors' masks narrowed to 32-bit lanes, in order).
template <typename T>
SPINAL_CLONES void keep_or_drop(const uint32_t* __restrict s, T* __restrict out, int64_t n, int64_t below, T scale) {
  int64_t i = 0;
#if SPINAL_VECTOR_WORDS
  using Bits = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  Bits scale_bits;
  std::memcpy(&scale_bits, &scale, sizeof(T));
  for (; i + 8 <= n; i += 8) {
    const I64x4 lo = kept_lanes(s + 2 * i, below), hi = kept_lanes(s + 2 * i + 8, below);
    if constexpr (sizeof(T) == 8) {
      const I64x4 bits[2] = {lo & scale_bits, hi & scale_bits};
      std::memcpy(out + i, bits, sizeof(bits));
    } else {
      const I32x8 bits = __builtin_shufflevector(reinterpret_cast<I32x8>(lo), reinterpret_cast<I32x8>(hi), 0, 2, 4, 6,
                                                 8, 10, 12, 14) & scale_bits;
      std::memcpy(out + i, &bits, sizeof(bits));
    }
  }
#endif
  for (; i < n; ++i) out[i] = keep_or_drop_one(temper(s[2 * i]), temper(s[2 * i + 1]), below, scale);
}

void dropout_noise_cpu(at::Tensor& self, double p, const std::optional<at::Generator>& generator) {
  TORCH_CHECK(self.device().is_cpu() && (self.scalar_type() == at::kFloat || self.scalar_type() == at::kDouble),
              "spinal_ops cpu backend: _dropout_noise_ fills a float32 or float64 CPU tensor, got ",
              self.scalar_type(), " on ", self.device());
  TORCH_CHECK(self.is_non_overlapping_and_dense(), "spinal_ops cpu backend: _dropout_noise_ fills self in memory "
              "order: it must be non-overlapping and dense (as empty_like makes it), got shape ", self.sizes(),
              " and strides ", self.strides());
  TORCH_CHECK(p > 0 && p < 1, "spinal_ops cpu backend: _dropout_noise_ takes a dropout probability p with 0 < p < 1 "
              "(F.dropout handles 0 and 1 without drawing), got p = ", p);
  const double keep = 1 - p;  // as _dropout_impl computes it
  const int64_t below = static_cast<int64_t>(std::ceil(std::ldexp(keep, 53)));
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  const int64_t n = self.numel();
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod state = engine.data();
  AT_DISPATCH_FLOATING_TYPES(self.scalar_type(), "_dropout_noise_", [&] {
    using T = scalar_t;
    // bernoulli_ writes 1 or 0; div_ by the scalar 1 - p, which a T tensor's division takes as T(1 - p).
    const T scale = T(1) / static_cast<T>(keep);
    T* out = self.mutable_data_ptr<T>();  // dense: its numel elements from here, in memory order
    int64_t i = 0;
    while (i < n) {
      int64_t ready = state.left_ - 1;  // words ready from state_[next_]
      if (ready == 0) {
        regenerate(state.state_.data());
        state.left_ = kStateWords + 1;  // as if the call that regenerates had already decremented it
        state.next_ = 0;
        ready = kStateWords;
      }
      if (ready == 1) {
        out[i++] = draw_one<T>(state, below, scale);
        continue;
      }
      const int64_t m = std::min(ready / 2, n - i);
      keep_or_drop<T>(state.state_.data() + state.next_, out + i, m, below, scale);
      state.next_ += static_cast<uint32_t>(2 * m);
      state.left_ -= static_cast<int>(2 * m);
      i += m;
    }
  });
  engine.set_data(state);
  gen->set_engine(engine);
}

}  // namespace
}  // namespace spinal_ops::cpu

TORCH_LIBRARY_IMPL(spinal_ops, CPU, m) {
  m.impl("_dropout_noise_", &spinal_ops::cpu::dropout_noise_cpu);
}
