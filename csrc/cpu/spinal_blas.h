// The BLAS binding of the CPU kernels (csrc/cpu/spinal_cpu.cpp): the row-major GEMM on the Fortran BLAS that
// libtorch_cpu exports (MKL on x86-64), which csrc/cpu/spinal_gemm.h uses for the large products; and
// SequentialBlas, which keeps the BLAS single-threaded while the jobs of csrc/cpu/spinal_parallel.h run.
//
// Determinism: BLAS threading is switched off for every call (MKL_Set_Num_Threads_Local), so a GEMM's result
// does not depend on the thread count. (With a BLAS other than MKL the switch is absent and the BLAS's own
// threading may change the last bits.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

extern "C" {
// MKL's per-thread switch of its own threading (weak: absent when PyTorch links another BLAS).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // the C interface
// Fortran BLAS, exported by libtorch_cpu (column-major, 32-bit integers).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace spinal_ops::cpu {

// Row-major GEMM on the BLAS: C (m x n, ldc) (=|+= when accumulate) op(A) (m x k) @ op(B) (k x n), with m, n, k >= 1.
// trans_a / trans_b: use the transpose of the stored row-major A (k x m, lda) / B (n x k, ldb).
template <typename T>
void blas_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
               int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  // A row-major matrix is its transpose in column-major order, so C.T = op(B).T @ op(A).T in column-major.
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T alpha = 1, beta = accumulate ? 1 : 0;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
}

// Keeps the BLAS single-threaded on this thread while alive (when `active`: some product may run on the BLAS):
// parallelism comes from our jobs only.
class SequentialBlas {
 public:
  explicit SequentialBlas(bool active)
      : active_(active && MKL_Set_Num_Threads_Local), previous_(active_ ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  bool active_;
  int previous_;
};

}  // namespace spinal_ops::cpu
