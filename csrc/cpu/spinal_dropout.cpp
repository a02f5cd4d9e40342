// The _dropout_noise_ op: the noise of PyTorch's CPU dropout, drawn faster from the same generator.
//
// `F.dropout(x, p, training=True)` on a CPU tensor is, in ATen (`_dropout_impl`): noise = empty_like(x);
// noise.bernoulli_(1 - p); noise.div_(1 - p); return x * noise. Its bernoulli_ takes ATen's serial path there (the
// default CPU generator's mt19937; the MKL path of Intel builds on Intel CPUs draws another stream): for each element in
// memory order, two 32-bit draws hi, lo make a 64-bit word whose low 53 bits u give the element 1 when u * 2^-53 <
// 1 - p, else 0. That path makes one generator call per draw through the TensorIterator machinery (~20 ns an element
// on the benchmark machine, README): the masks of a train-mode head cost more than its products.
//
// This op writes the same values, noise[i] = bernoulli(1 - p) / (1 - p), consuming the generator's state exactly as
// bernoulli_ does (the same words, the same state after it), from a copy of the state: the state is regenerated
// 624 words at a time and the words tempered in vectorised loops, and u * 2^-53 < 1 - p is compared as the integer
// u < ceil((1 - p) * 2^53) (the same test: u * 2^-53 and (1 - p) * 2^53 are exact in double). spinal_ops uses it
// only where a probe has shown it to match this PyTorch's own bernoulli_ (spinal_ops/ops.py, `dropout`), so a build
// whose bernoulli_ draws otherwise falls back to F.dropout.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>

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

SPINAL_CLONES void temper(const uint32_t* __restrict s, uint32_t* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t y = s[i];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    out[i] = y;
  }
}

// The next `count` outputs of the engine whose state is `d`, as `count` calls of mt19937_engine::operator() give them,
// leaving `d` as those calls leave it. Each call decrements left_, regenerates when it reaches 0 (left_ = 624,
// next_ = 0) and returns state_[next_++]: left_ - 1 words are ready.
void draw_words(at::mt19937_data_pod& d, uint32_t* out, int64_t count) {
  while (count > 0) {
    int64_t ready = d.left_ - 1;
    if (ready == 0) {
      regenerate(d.state_.data());
      d.left_ = kStateWords + 1;  // the call that regenerates has already decremented it
      d.next_ = 0;
      ready = kStateWords;
    }
    const int64_t k = std::min(ready, count);
    temper(d.state_.data() + d.next_, out, k);
    d.next_ += static_cast<uint32_t>(k);
    d.left_ -= static_cast<int>(k);
    out += k;
    count -= k;
  }
}

// out[i] = scale if the 53 low bits of (words[2i] << 32 | words[2i + 1]) are below `below`, else 0.
template <typename T>
SPINAL_CLONES void keep_or_drop(const uint32_t* __restrict words, T* __restrict out, int64_t n, uint64_t below,
                                T scale) {
  constexpr uint64_t kLow53 = (uint64_t{1} << 53) - 1;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t pair;  // words[2i] in its low half (little-endian): swapped, one 64-bit lane per element
    std::memcpy(&pair, words + 2 * i, sizeof(pair));
    const uint64_t u = ((pair << 32) | (pair >> 32)) & kLow53;
    out[i] = u < below ? scale : T(0);
  }
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
  const uint64_t below = static_cast<uint64_t>(std::ceil(std::ldexp(keep, 53)));
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  const int64_t n = self.numel();
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod state = engine.data();
  constexpr int64_t kBlock = 1024;  // elements per block of words (8 KB on the stack)
  uint32_t words[2 * kBlock];
  AT_DISPATCH_FLOATING_TYPES(self.scalar_type(), "_dropout_noise_", [&] {
    using T = scalar_t;
    // bernoulli_ writes 1 or 0; div_ by the scalar 1 - p, which a T tensor's division takes as T(1 - p).
    const T scale = T(1) / static_cast<T>(keep);
    T* out = self.mutable_data_ptr<T>();  // dense: its numel elements from here, in memory order
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t m = std::min(kBlock, n - i);
      draw_words(state, words, 2 * m);
      keep_or_drop<T>(words, out + i, m, below, scale);
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
