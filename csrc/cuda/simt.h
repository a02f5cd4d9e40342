// simt.h: the one platform header of the spinal CUDA kernels.
//
// Kernel sources include this header and nothing CUDA-specific, so the same source compiles two ways:
//
// * with nvcc (the CUDA branch below): plain CUDA. `simt::launch` is `<<<grid, block, smem, stream>>>`
//   followed by `cudaGetLastError()`; `simt::dynamic_shared<T>()` is the block's `extern __shared__` buffer.
// * with a host C++20 compiler (the emulator branch): every CUDA thread of a block becomes a user-space
//   fiber; blocks run one after another on the calling OS thread. `__syncthreads()`, `__syncwarp()`,
//   `__shfl_xor_sync` and the part of `nvcuda::wmma` the kernels use (fill, load of A/B fragments, mma, store
//   of the accumulator) are emulated. `__shared__` becomes `static`, which is one copy per
//   kernel instantiation: correct because only one block runs at a time.
//
// Emulator backends (chosen by a macro of the host build):
//   default                 fibers switched by a small x86-64 assembly routine (about 60 ns per switch)
//   SIMT_FIBER_UCONTEXT     fibers switched by swapcontext (slower; AddressSanitizer understands it)
//   SIMT_OS_THREADS         one OS thread per CUDA thread with std::barrier (for ThreadSanitizer)
//
// Emulator checks (each raises simt::Error naming the source lines involved):
//   * threads of a block that executed different numbers of __syncthreads (an early return before a
//     barrier), or wait at different __syncthreads call sites;
//   * warp collectives without every lane of the warp, or with a mask other than the full mask;
//   * deadlocks (lists every waiting thread's call site).
// Dynamic shared memory is filled with 0xFF bytes before each block (reads of unwritten values give NaN).
// Schedules: the order in which runnable threads resume after each barrier is forward, reverse or random,
// so a missing barrier shows up as a schedule-dependent result (fibers never interleave between barriers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#ifdef __CUDACC__
// ================================================================================================ CUDA
#include <atomic>
#include <mutex>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

namespace simt {

using Stream = cudaStream_t;
using Status = cudaError_t;
inline bool ok(Status s) { return s == cudaSuccess; }
inline const char* error_string(Status s) { return cudaGetErrorString(s); }

// The block's dynamic shared memory (the size is the launch's `smem` argument). 128-byte aligned, enough
// for wmma's 256-bit pointer alignment.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(128) unsigned char simt_dynamic_smem[];
  return reinterpret_cast<T*>(simt_dynamic_smem);
}

// Lets `kernel` use the device's whole opt-in dynamic shared memory: set once per kernel instantiation and device
// (not per launch, so concurrent launches with different sizes never race on the attribute).
template <typename Kernel>
Status allow_large_dynamic_shared(Kernel kernel) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices] = {};
  static std::mutex mutex;
  int device = 0;
  Status s = cudaGetDevice(&device);
  if (s != cudaSuccess) return s;
  if (device < kMaxDevices && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mutex);
  if (device < kMaxDevices && done[device].load(std::memory_order_relaxed)) return cudaSuccess;
  int optin = 0;
  s = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (s == cudaSuccess) s = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (s == cudaSuccess && device < kMaxDevices) done[device].store(true, std::memory_order_release);
  return s;
}

// The one launcher: launch, then return the launch's error status (cudaGetLastError, what
// C10_CUDA_KERNEL_LAUNCH_CHECK reads); the CUDA binding turns a failure into a c10 CUDA error.
template <typename... KArgs, typename... Args>
Status launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Stream stream, Args&&... args) {
  if (smem > 48 * 1024) {
    Status s = allow_large_dynamic_shared(kernel);
    if (s != cudaSuccess) return s;
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace simt

#else
// ============================================================================================ emulator
#include <algorithm>
#include <atomic>
#include <barrier>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// cuda_fp16.h / cuda_bf16.h work as host headers (host-side __half and __nv_bfloat16 with conversions and
// arithmetic); they also bring dim3 / uint3 and define the execution-space keywords as empty.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#if defined(SIMT_FIBER_UCONTEXT)
#include <ucontext.h>
#endif

#undef __host__
#undef __device__
#undef __global__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace simt {

using Stream = void*;
using Status = int;
inline bool ok(Status s) { return s == 0; }
inline const char* error_string(Status) { return "emulated launch failed"; }

// A bug found by the emulator in kernel code (message names the source lines).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };

namespace host {

inline std::string where(const std::source_location& loc) {
  std::ostringstream os;
  const char* file = loc.file_name();
  const char* slash = std::strrchr(file, '/');
  os << (slash ? slash + 1 : file) << ":" << loc.line();
  return os.str();
}

// ------------------------------------------------------------------------------------- context switch
#if !defined(SIMT_FIBER_UCONTEXT) && !defined(SIMT_OS_THREADS)
// simt_switch(save, next): pushes the callee-saved registers and the SSE/x87 control words, stores the
// stack pointer in *save, loads `next` and pops the same frame from it. A new fiber's stack is prepared
// so that the first switch "returns" into simt_fiber_start, which calls simt_fiber_main(r12).
extern "C" void simt_switch(void** save, void* next);
extern "C" void simt_fiber_start();
asm(R"(
    .text
    .weak simt_switch
    .hidden simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch

    .weak simt_fiber_start
    .hidden simt_fiber_start
    .type simt_fiber_start, @function
simt_fiber_start:
    movq %r12, %rdi
    andq $-16, %rsp
    call simt_fiber_main@PLT
    ud2
    .size simt_fiber_start, .-simt_fiber_start
)");
#endif

struct Fiber;

enum class State : int { kReady, kWaitBlock, kWaitWarp, kDone };

struct Fiber {
  uint3 tid{};
  int linear = 0;  // linear thread index in the block
  int lane = 0;
  int warp = 0;
  State state = State::kReady;
  std::source_location site{};  // where it waits
  uint64_t block_barriers = 0;
  uint64_t warp_ops = 0;  // parity of the shuffle slots
  void* sp = nullptr;     // saved stack pointer (assembly backend)
#if defined(SIMT_FIBER_UCONTEXT)
  ucontext_t uc{};
#endif
};

struct Warp {
  uint64_t slots[2][32] = {};  // shuffle exchange, double-buffered by operation parity
};

struct Run {
  uint3 block_idx{};
  std::function<void()> body;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<std::unique_ptr<char[]>> stacks;
  size_t stack_size = 0;
  Fiber* current = nullptr;
  void* sched_sp = nullptr;
#if defined(SIMT_FIBER_UCONTEXT)
  ucontext_t sched_uc{};
#endif
  std::exception_ptr error;
  // OS-thread backend
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
};

// One launch as the kernel saw it: grid and block sizes, dynamic shared memory in bytes.
struct LaunchRecord {
  unsigned grid[3];
  unsigned block[3];
  size_t smem;
};

struct Global {
  static constexpr size_t kLogSize = 64;  // the most recent launches are kept
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  std::atomic<uint64_t> launches{0};
  std::vector<LaunchRecord> log;  // guarded by `mutex`
  std::vector<unsigned char> dynamic_smem;  // 128-byte aligned view inside
  unsigned char* smem_base = nullptr;
  Run* run = nullptr;
  std::mutex mutex;  // one emulated launch at a time per process
};

inline Global& global() {
  static Global g;
  return g;
}

#if defined(SIMT_OS_THREADS)
inline thread_local Fiber* tls_current = nullptr;
inline Fiber& current() { return *tls_current; }
#else
inline Fiber& current() { return *global().run->current; }
#endif

inline Run& run() { return *global().run; }

#if !defined(SIMT_OS_THREADS)
// Switch from the running fiber back to the scheduler.
inline void yield_to_scheduler() {
  Run& r = run();
  Fiber* f = r.current;
#if defined(SIMT_FIBER_UCONTEXT)
  swapcontext(&f->uc, &r.sched_uc);
#else
  simt_switch(&f->sp, r.sched_sp);
#endif
}

inline void resume(Fiber& f) {
  Run& r = run();
  r.current = &f;
#if defined(SIMT_FIBER_UCONTEXT)
  swapcontext(&r.sched_uc, &f.uc);
#else
  simt_switch(&r.sched_sp, f.sp);
#endif
  r.current = nullptr;
}
#endif

inline std::mutex& error_mutex() {
  static std::mutex m;
  return m;
}

inline void fiber_body(Fiber* f) {
  Run& r = run();
  try {
    r.body();
  } catch (...) {
    std::lock_guard<std::mutex> lock(error_mutex());
    if (!r.error) r.error = std::current_exception();
  }
  f->state = State::kDone;
}

#if !defined(SIMT_OS_THREADS)
#if !defined(SIMT_FIBER_UCONTEXT)
// Entry of a new fiber (called by simt_fiber_start); never returns.
extern "C" [[gnu::weak, gnu::visibility("hidden"), gnu::used]] void simt_fiber_main(Fiber* f) {
  fiber_body(f);
  yield_to_scheduler();
  __builtin_trap();
}
#endif
#if defined(SIMT_FIBER_UCONTEXT)
inline void ucontext_entry(unsigned hi, unsigned lo) {
  Fiber* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
  fiber_body(f);
  yield_to_scheduler();
}
#endif

inline void prepare(Fiber& f, char* stack, size_t size) {
#if defined(SIMT_FIBER_UCONTEXT)
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack;
  f.uc.uc_stack.ss_size = size;
  f.uc.uc_link = nullptr;
  uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xffffffffu));
#else
  // Frame popped by simt_switch: control words, r15, r14, r13, r12 (= fiber), rbx, rbp, return address.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = 0;                                       // r15
  sp[2] = 0;                                       // r14
  sp[3] = 0;                                       // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);          // r12
  sp[5] = 0;                                       // rbx
  sp[6] = 0;                                       // rbp
  sp[7] = reinterpret_cast<uint64_t>(&simt_fiber_start);  // return address
  f.sp = sp;
#endif
}
#endif

// ------------------------------------------------------------------------------------------ scheduler
#if !defined(SIMT_OS_THREADS)
inline void reorder(std::vector<int>& order, std::mt19937_64& rng) {
  if (global().schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), rng);
}

[[noreturn]] inline void fail_block(const std::string& what) {
  Run& r = run();
  std::ostringstream os;
  os << "simt: " << what << " (block " << r.block_idx.x << "," << r.block_idx.y << "," << r.block_idx.z << ")";
  throw Error(os.str());
}

inline std::string list_waiters(State s) {
  std::ostringstream os;
  int shown = 0;
  for (const Fiber& f : run().fibers) {
    if (f.state != s) continue;
    if (shown++ < 8) os << " thread " << f.linear << " at " << where(f.site) << ";";
  }
  if (shown > 8) os << " ... (" << shown << " threads)";
  return os.str();
}

inline void run_block(std::mt19937_64& rng) {
  Run& r = run();
  const int n = static_cast<int>(r.fibers.size());
  for (int t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f.state = State::kReady;
    f.block_barriers = 0;
    f.warp_ops = 0;
    prepare(f, r.stacks[t].get(), r.stack_size);
  }
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = global().schedule == Schedule::kReverse ? n - 1 - t : t;
  reorder(order, rng);
  for (;;) {
    for (int t : order) {
      while (r.fibers[t].state == State::kReady) resume(r.fibers[t]);
    }
    if (r.error) std::rethrow_exception(r.error);
    // Warps whose lanes all wait at a warp barrier move on.
    bool progress = false;
    const int warps = (n + 31) / 32;
    for (int w = 0; w < warps; ++w) {
      const int lo = w * 32, hi = std::min(n, lo + 32);
      bool all = true;
      for (int t = lo; t < hi && all; ++t) all = r.fibers[t].state == State::kWaitWarp;
      if (!all) continue;
      for (int t = lo + 1; t < hi; ++t) {
        if (r.fibers[t].site.line() != r.fibers[lo].site.line() ||
            std::strcmp(r.fibers[t].site.file_name(), r.fibers[lo].site.file_name()) != 0) {
          fail_block("lanes of warp " + std::to_string(w) + " are at different warp-synchronous call sites: lane 0 at " +
                     where(r.fibers[lo].site) + ", lane " + std::to_string(t - lo) + " at " + where(r.fibers[t].site));
        }
      }
      for (int t = lo; t < hi; ++t) r.fibers[t].state = State::kReady;
      progress = true;
    }
    if (progress) {
      reorder(order, rng);
      continue;
    }
    int done = 0, at_block = 0, at_warp = 0;
    for (const Fiber& f : r.fibers) {
      done += f.state == State::kDone;
      at_block += f.state == State::kWaitBlock;
      at_warp += f.state == State::kWaitWarp;
    }
    if (done == n) return;
    if (at_warp > 0) {
      fail_block("deadlock: a warp-synchronous operation (__syncwarp, shuffle) is missing lanes that exited or "
                 "wait at __syncthreads. Warp waiters:" + list_waiters(State::kWaitWarp) +
                 " block waiters:" + list_waiters(State::kWaitBlock));
    }
    if (done > 0) {
      fail_block("threads executed different numbers of __syncthreads (early return before a barrier?): " +
                 std::to_string(done) + " threads exited while " + std::to_string(at_block) +
                 " wait at __syncthreads:" + list_waiters(State::kWaitBlock));
    }
    const Fiber& first = r.fibers[0];
    for (const Fiber& f : r.fibers) {
      if (f.site.line() != first.site.line() || std::strcmp(f.site.file_name(), first.site.file_name()) != 0) {
        fail_block("threads wait at different __syncthreads call sites: thread 0 at " + where(first.site) +
                   ", thread " + std::to_string(f.linear) + " at " + where(f.site));
      }
    }
    for (Fiber& f : r.fibers) f.state = State::kReady;
    reorder(order, rng);
  }
}
#endif

inline void block_barrier(const std::source_location& loc) {
  Fiber& f = current();
  ++f.block_barriers;
#if defined(SIMT_OS_THREADS)
  (void)loc;
  run().block_barrier->arrive_and_wait();
#else
  f.site = loc;
  f.state = State::kWaitBlock;
  yield_to_scheduler();
#endif
}

inline void warp_barrier(const std::source_location& loc) {
  Fiber& f = current();
#if defined(SIMT_OS_THREADS)
  (void)loc;
  run().warp_barriers[f.warp]->arrive_and_wait();
#else
  f.site = loc;
  f.state = State::kWaitWarp;
  yield_to_scheduler();
#endif
}

inline void check_full_mask(unsigned mask, const std::source_location& loc) {
  if (mask != 0xffffffffu) {
    throw Error("simt: warp operation at " + where(loc) + " uses mask " + std::to_string(mask) +
                "; kernels must use the full mask from convergent code");
  }
  if (run().fibers.size() % 32 != 0) {
    throw Error("simt: warp operation at " + where(loc) + " in a block whose size is not a multiple of 32");
  }
}

// Runs `body` for every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  Global& g = global();
  std::lock_guard<std::mutex> lock(g.mutex);
  Run r;
  r.body = std::move(body);
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) throw Error("simt: block size must be in [1, 1024], got " + std::to_string(n));
  r.fibers.resize(n);
  r.warps.resize((n + 31) / 32);
  for (int t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f.linear = t;
    f.tid = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
                  static_cast<unsigned>(t / (block.x * block.y))};
    f.lane = t % 32;
    f.warp = t / 32;
  }
  g.dynamic_smem.assign(smem + 128, 0);
  g.smem_base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(g.dynamic_smem.data()) + 127) &
                                                 ~uintptr_t(127));
  g.run = &r;
  g.launches.fetch_add(1);
  if (g.log.size() == Global::kLogSize) g.log.erase(g.log.begin());
  g.log.push_back(LaunchRecord{{grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem});
  struct Reset {
    ~Reset() { global().run = nullptr; }
  } reset;
  std::mt19937_64 rng(g.seed);
#if !defined(SIMT_OS_THREADS)
  r.stack_size = 256 * 1024;
  r.stacks.resize(n);
  for (auto& s : r.stacks) s.reset(new char[r.stack_size]);
#endif
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        r.block_idx = uint3{bx, by, bz};
        std::memset(g.smem_base, 0xFF, smem);
#if defined(SIMT_OS_THREADS)
        r.block_barrier = std::make_unique<std::barrier<>>(n);
        r.warp_barriers.clear();
        for (int w = 0; w < (n + 31) / 32; ++w)
          r.warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32, n - w * 32)));
        {
          std::vector<std::jthread> threads;
          threads.reserve(n);
          for (int t = 0; t < n; ++t) {
            threads.emplace_back([&r, t] {
              Fiber& f = r.fibers[t];
              tls_current = &f;
              fiber_body(&f);
              // Let the others finish instead of deadlocking when this thread exits early.
              r.block_barrier->arrive_and_drop();
              r.warp_barriers[f.warp]->arrive_and_drop();
            });
          }
        }
        if (r.error) std::rethrow_exception(r.error);
#else
        run_block(rng);
#endif
      }
    }
  }
}

}  // namespace host

// Emulator settings and counters, for tests.
inline void set_schedule(Schedule s, uint64_t seed = 0) {
  host::global().schedule = s;
  host::global().seed = seed;
}
inline uint64_t launch_count() { return host::global().launches.load(); }
// The most recent launches (at most Global::kLogSize), oldest first; clear_launch_log empties it.
inline std::vector<host::LaunchRecord> launch_log() {
  std::lock_guard<std::mutex> lock(host::global().mutex);
  return host::global().log;
}
inline void clear_launch_log() {
  std::lock_guard<std::mutex> lock(host::global().mutex);
  host::global().log.clear();
}

template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(host::global().smem_base);
}

inline int lane_id() { return host::current().lane; }

// The one launcher: runs the kernel on every thread of every block, under the current schedule.
template <typename... KArgs, typename... Args>
Status launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Stream, Args&&... args) {
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  host::run_grid(grid, block, smem, [&] { std::apply(kernel, params); });
  return 0;
}

}  // namespace simt

// ------------------------------------------------------------------------------------- CUDA built-ins
#define threadIdx (::simt::host::current().tid)
#define blockIdx (::simt::host::run().block_idx)

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::simt::host::block_barrier(loc);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  ::simt::host::check_full_mask(mask, loc);
  ::simt::host::warp_barrier(loc);
}

namespace simt::host {
template <typename T>
T shuffle(unsigned mask, T v, int (*src_of)(int lane, int arg, int width), int arg, int width,
          const std::source_location& loc) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  check_full_mask(mask, loc);
  Fiber& f = current();
  Warp& w = run().warps[f.warp];
  const int parity = static_cast<int>(f.warp_ops++ & 1);
  std::memcpy(&w.slots[parity][f.lane], &v, sizeof(T));
  warp_barrier(loc);
  T out;
  std::memcpy(&out, &w.slots[parity][src_of(f.lane, arg, width)], sizeof(T));
  return out;
}
}  // namespace simt::host

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  std::source_location loc = std::source_location::current()) {
  return ::simt::host::shuffle<T>(
      mask, v,
      [](int lane, int m, int wd) {
        int src = lane ^ m;
        return (src / wd == lane / wd) ? src : lane;
      },
      lane_mask, width, loc);
}
// ------------------------------------------------------------------------------------- nvcuda::wmma
// Every lane holds the whole tile (the CUDA element-to-lane mapping is opaque, so any mapping is legal).
// mma_sync accumulates in fp32; tf32 operands are rounded as the hardware does. store_matrix_sync has lane
// i write elements i, i + 32, ... so that reading another lane's part without __syncwarp stays a race.
namespace nvcuda::wmma {
// Round to the tensor-float-32 format like cvt.rna.tf32.f32 (nearest, ties away from zero).
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = typename storage<T>::type;
  element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(v);
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  for (int e = ::simt::lane_id(); e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[e];
  }
}

template <typename E>
inline float operand(E v) {
  if constexpr (std::is_same_v<E, float>) {
    return __float_to_tf32(v);
  } else {
    return static_cast<float>(v);
  }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float s = c.x[m * N + n];
      for (int k = 0; k < K; ++k) s += operand(a.x[m * K + k]) * operand(b.x[k * N + n]);
      out[m * N + n] = s;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace nvcuda::wmma

#endif  // __CUDACC__
