// The BLAS binding of the CPU kernels (csrc/cpu/spinal_cpu.cpp): the row-major GEMM every product of the
// forward and backward goes through, on the Fortran BLAS that libtorch_cpu exports (MKL on x86-64) or, for one
// row, on a hand-written loop; and SequentialBlas, which keeps the BLAS single-threaded while the jobs of
// csrc/cpu/spinal_parallel.h run.
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

// One row times a matrix: c (n) = alpha * a (k) @ op(B) + beta * c, where op(B) (k x n) is B stored row-major as
// n x k (trans_b: output j is the dot product of a with row j) or as k x n (a weighted sum of B's rows).
// Written by hand because MKL takes its generic code path on non-Intel CPUs: on an AMD EPYC (Zen, AVX2) these
// loops took 0.6-0.82x the time of MKL's sgemm for 1 x (20..512) x (50..1024) products (a micro-benchmark of the
// shapes of spinal_ops/configs.py, one core); in a perf profile of the vgg-head forward at B = 1 their share fell
// from 21% (MKL's generic sgemv) to 18%. The summation order is fixed: results do not depend on threads.
template <typename T>
void row_times_matrix(bool trans_b, int64_t n, int64_t k, T alpha, const T* __restrict a, const T* __restrict b,
                      int64_t ldb, T beta, T* __restrict c) {
  auto store = [&](int64_t j, T sum) { c[j] = beta == T(0) ? alpha * sum : alpha * sum + beta * c[j]; };
  if (trans_b) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {  // four rows per pass: a is loaded once for four dot products
      const T* __restrict r0 = b + j * ldb;
      const T* __restrict r1 = r0 + ldb;
      const T* __restrict r2 = r1 + ldb;
      const T* __restrict r3 = r2 + ldb;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t q = 0; q < k; ++q) {
        const T v = a[q];
        s0 += v * r0[q];
        s1 += v * r1[q];
        s2 += v * r2[q];
        s3 += v * r3[q];
      }
      store(j, s0), store(j + 1, s1), store(j + 2, s2), store(j + 3, s3);
    }
    for (; j < n; ++j) {
      const T* __restrict r = b + j * ldb;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t q = 0; q < k; ++q) sum += a[q] * r[q];
      store(j, sum);
    }
    return;
  }
  if (beta == T(0)) {
    std::fill(c, c + n, T(0));
  } else if (beta != T(1)) {
    for (int64_t j = 0; j < n; ++j) c[j] *= beta;
  }
  for (int64_t q = 0; q < k; ++q) {
    const T v = alpha * a[q];
    const T* __restrict r = b + q * ldb;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) c[j] += v * r[j];
  }
}

// Row-major GEMM: C (m x n, ldc) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C.
// trans_a / trans_b: use the transpose of the stored row-major A (k x m, lda) / B (n x k, ldb).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (m == 1 && !trans_a && k > 0) return row_times_matrix(trans_b, n, k, alpha, a, b, ldb, beta, c);
  if (k == 0) {  // BLAS would reject the leading dimensions of an empty operand
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < n; ++j) c[r * ldc + j] = beta == T(0) ? T(0) : beta * c[r * ldc + j];
    return;
  }
  // A row-major matrix is its transpose in column-major order, so C.T = op(B).T @ op(A).T in column-major.
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
}

// Keeps the BLAS single-threaded on this thread while alive: parallelism comes from our jobs only.
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_;
};

}  // namespace spinal_ops::cpu
