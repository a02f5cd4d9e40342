// Launchers of the spinal kernels on raw pointers: grid, block and shared memory of each launch, and the
// choice of kernel instantiation (through spinal_switch.h). No torch types here, so the same launchers serve
// the CUDA binding, the emulated binding and the standalone sanitizer driver.
//
// Every launch goes through simt::launch; `check(status, name)` is called after each one.
#pragma once

#include <cstdint>

#include "spinal_bwd_kernel.cuh"
#include "spinal_fwd_kernel.cuh"
#include "spinal_switch.h"

namespace spinal_ops::cuda {

// Width path of the forward: automatic (fast when w <= 64), or forced (tests cover both on the same shapes).
enum class WidthPath : int { kAuto = 0, kFast, kGeneral };

struct LaunchOptions {
  bool allow_tf32 = false;  // fp32 forward on tf32 tensor cores (torch.backends.cuda.matmul.allow_tf32)
  WidthPath width_path = WidthPath::kAuto;
};

inline bool use_fast_path(int width, WidthPath path) {
  if (path == WidthPath::kGeneral) return false;
  return width <= BN;  // the fast path needs one column tile; kFast on a wider layer falls back
}

// Whether the forward needs the (B, out) head workspace in global memory (the accumulator is too big for
// shared memory); the caller allocates it before launch_forward.
template <typename T>
bool forward_needs_y_workspace(int out, bool head) {
  return head && !FwdSmem<T, 0, Mma::kNone>::yacc_on_chip(out);
}

// One launch: the forward kernel over ceil(B / 16) row tiles.
template <typename T, typename Check>
void launch_forward(const FwdParams<T>& p, Activation act, LaunchOptions opt, simt::Stream stream, Check&& check) {
  if (p.rows == 0) return;
  const dim3 grid(static_cast<unsigned>((p.rows + BM - 1) / BM)), block(kThreads);
  const bool head = p.wo != nullptr;
  with_activation(act, [&](auto A) {
    with_width_path(use_fast_path(p.width, opt.width_path), [&](auto WF) {
      with_mma<T>(opt.allow_tf32, [&](auto M) {
        using Smem = FwdSmem<T, decltype(WF)::value, decltype(M)::value>;
        auto kernel = spinal_fwd_kernel<T, decltype(A)::value, decltype(WF)::value, decltype(M)::value>;
        check(simt::launch(kernel, grid, block, Smem::bytes(p.out, head), stream, p), "spinal_fwd_kernel");
      });
    });
  });
}

// Elements of the weights launch's partial tiles (BwdParams::wpart; accumulation type) that the caller allocates
// before launch_backward: none unless the batch is split into pieces (weight_pieces).
template <typename T>
int64_t weight_partial_elements(const BwdParams<T>& p) {
  const int pieces = weight_pieces(p.rows);
  return pieces > 1 ? static_cast<int64_t>(pieces) * weight_jobs(p).total() * BM * BN : 0;
}

// At most three launches: the chain (dZ, dx) when dx or an input-side weight gradient is wanted, then the
// weight gradients when any is wanted, in pieces of the batch and their sum when it is split.
template <typename T, typename Check>
void launch_backward(const BwdParams<T>& p, Activation act, simt::Stream stream, Check&& check) {
  const bool chain = p.dx || p.dwx || p.dwh || p.db;
  if (chain && p.rows > 0) {
    const dim3 grid(static_cast<unsigned>((p.rows + BM - 1) / BM)), block(kThreads);
    with_activation(act, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      with_recompute<kA>(p.slope < 0, [&](auto R) {
        auto kernel = spinal_bwd_chain_kernel<T, kA, decltype(R)::value>;
        check(simt::launch(kernel, grid, block, BwdSmem<T>::bytes, stream, p), "spinal_bwd_chain_kernel");
      });
    });
  }
  const int jobs = weight_jobs(p).total();
  const int pieces = weight_pieces(p.rows);
  if (jobs > 0) {
    check(simt::launch(spinal_bwd_weights_kernel<T>, dim3(static_cast<unsigned>(jobs * pieces)), dim3(kThreads),
                       BwdSmem<T>::bytes, stream, p),
          "spinal_bwd_weights_kernel");
  }
  if (jobs > 0 && pieces > 1) {
    check(simt::launch(spinal_bwd_reduce_kernel<T>, dim3(static_cast<unsigned>(jobs)), dim3(kThreads), 0, stream, p),
          "spinal_bwd_reduce_kernel");
  }
}

}  // namespace spinal_ops::cuda
