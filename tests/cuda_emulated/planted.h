// Planted-bug kernels: the emulator's self-test. Each kernel is correct except for one deliberate bug.
//
// block_sum<MISSING_BARRIER>: 128 threads sum 128 values through shared memory (a tree over shared memory
//   for the first steps, then warp shuffles). With MISSING_BARRIER the __syncthreads between writing the
//   shared array and the first tree step is left out: correct under some schedules, wrong under others.
// early_return: threads of the upper half return before a __syncthreads that the lower half reaches.
// lost_update: every thread adds into one global value without an atomic (seen only by ThreadSanitizer).
#pragma once

#include "cuda/simt.h"

namespace planted {

constexpr int kThreads = 128;

template <bool MISSING_BARRIER>
__global__ void block_sum(const float* in, float* out) {
  __shared__ float partial[kThreads];
  const int t = threadIdx.x;
  partial[t] = in[blockIdx.x * kThreads + t];
  if (!MISSING_BARRIER) __syncthreads();
  // 128 -> 32 values over shared memory; each step reads what other warps wrote.
  float v = 0.0f;
  if (t < 64) v = partial[t] + partial[t + 64];
  __syncthreads();
  if (t < 64) partial[t] = v;
  __syncthreads();
  v = t < 32 ? partial[t] + partial[t + 32] : 0.0f;
  // 32 -> 1 within each warp (every warp takes part; only warp 0 holds data).
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (t == 0) out[blockIdx.x] = v;
}

__global__ void early_return(float* out, int n) {
  __shared__ float s[kThreads];
  const int t = threadIdx.x;
  if (t >= n) return;  // the bug: these threads never reach the barrier below
  s[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = s[(t + 1) % n];
}

__global__ void lost_update(float* out) {
  *out += 1.0f;  // the bug: read-modify-write from every thread without an atomic
}

inline simt::Status run_block_sum(bool missing_barrier, const float* in, float* out, int blocks) {
  if (missing_barrier) return simt::launch(block_sum<true>, dim3(blocks), dim3(kThreads), 0, nullptr, in, out);
  return simt::launch(block_sum<false>, dim3(blocks), dim3(kThreads), 0, nullptr, in, out);
}

inline simt::Status run_early_return(float* out, int n) {
  return simt::launch(early_return, dim3(1), dim3(kThreads), 0, nullptr, out, n);
}

inline simt::Status run_lost_update(float* out) {
  return simt::launch(lost_update, dim3(1), dim3(kThreads), 0, nullptr, out);
}

}  // namespace planted
