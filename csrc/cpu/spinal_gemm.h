// The products of the CPU kernels (csrc/cpu/spinal_cpu.cpp): row-major entries per form (`nt_gemm`, `nn_gemm`, and
// `pair_product` / `pair_dot_product` for bfloat16 pairs), which run the small and narrow products on the
// hand-written kernels below and the large ones on the BLAS (csrc/cpu/spinal_blas.h).
//
// Why hand-written kernels: the layers' products are narrow (w = 20..512 columns, out = 1..10, chunks of c = 4..1024)
// and the batches small (B = 1..256 rows per tile). There the BLAS pays a per-call cost and takes its generic code
// path on CPUs it does not recognise (MKL on AMD: `mkl_blas_def_*`, no AVX-512), while these kernels keep a whole
// MR x (NV vectors) block of the output in registers for the full k loop. Which product goes where is `use_blas`
// (and `use_blas_tn` for the TN products), set by measurement (their comments).
//
// Instruction sets: every kernel is compiled three times, for AVX-512 (64-byte vectors), AVX2 + FMA (32 bytes) and
// the baseline (16 bytes: SSE2 on x86-64, NEON on aarch64), and the widest the CPU supports runs (`cpu_isa`, chosen
// once per process; SPINAL_OPS_CPU_ISA=avx512 / avx2 / baseline caps it, for tests). The extension itself is built
// for the baseline, so it loads on any x86-64 CPU.
//
// Stored types: the float32 kernels also read B (and W) stored as bfloat16 or float16, widened in the registers as
// they are loaded (`load_wide`), so that the cpu backend runs reduced-precision weights without a float32 copy.
//
// Kernels, for C (m x n) = A (m x k) @ B (k x n), row-major (every product of the layer has one of these forms):
// - axpy tile (m >= 2): an MR x NV-vector block of C in registers; for each q, NV vectors of row q of B are loaded
//   and every A(r, q) is broadcast against them. A is read through strides (ars, aqs), so the same kernel serves
//   A (NN: dH = G Wo, carry = dZ Wh, dx += dZ Wx) and A^T (TN: the weight gradients dZ^T x, dZ^T H, G^T H); and
//   the NT products on a packed W^T where that is faster (`packs_transposed`). A TN product narrower than one
//   vector (dZ^T x_chunk for chunks of c = 4) runs transposed, C^T = B^T A, its vectors along m (`narrow_tn_product`).
// - dot tile (NT: the forward's x Wx^T, h Wh^T, H Wo^T): DOT_MR rows x NR outputs of vector accumulators along k,
//   then the lanes summed; W is read as stored (no transpose per call), in L2-sized blocks (`dot_gemm`).
// - one row, NN (m = 1): a weighted sum of B's rows, blocks of up to 8 vectors of C in registers over all of k (C
//   read and written once).
// - bfloat16 pairs (NT, AVX512_BF16, set avx512_bf16): x Wx^T of bfloat16 calls, one vdpbf16ps per 32 products
//   (twice a float32 FMA's): on W packed in pairs where the float32 products would pack W^T (`pair_gemm`), else
//   in the dot form on W as stored (`pair_dot_gemm`); and TN, the weight gradients dZ^T x and dZ^T H, over the rows
//   of both operands packed in pairs of rows (`pack_row_pairs`, `pair_tn_product`).
//
// Determinism: every element of C is a sum over q = 0 .. k-1 in that order (the axpy tile and the NN row), a fixed
// lane-wise order (the dot tile), or pair by pair (the bfloat16 pairs), whatever the tile, the job split or the thread
// count; so results depend only on the sizes, the instruction set and, for the BLAS products, the BLAS.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "spinal_blas.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SPINAL_X86_DISPATCH 1
#include <immintrin.h>  // _mm_sfence
#define SPINAL_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")))
#define SPINAL_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
// The element-wise loops of the kernels (bias and activation, chain rule, column sums): compiled for the same three
// instruction sets by the compiler (function multi-versioning), the widest the CPU supports chosen at load time
// (SPINAL_OPS_CPU_ISA does not cap these; their results do not depend on the set).
#define SPINAL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPINAL_X86_DISPATCH 0
#define SPINAL_CLONES
#endif

namespace spinal_ops::cpu {

// The instruction sets the kernels are compiled for, widest last. kAvx512Bf16: the AVX-512 kernels, plus the
// AVX512_BF16 dot products of bfloat16 pairs (kernels::pair_gemm) for the bfloat16 products that can use them.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline constexpr std::string_view kIsaNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};

// What the CPU supports (x86-64: checked with cpuid and the OS's saved register state, by the compiler's runtime).
inline Isa supported_isa() {
#if SPINAL_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// The instruction set the kernels run: the widest supported, capped by SPINAL_OPS_CPU_ISA (read once; an unknown
// value is ignored).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = supported_isa();
    if (const char* cap = std::getenv("SPINAL_OPS_CPU_ISA")) {
      for (int i = 0; i < 4; ++i) {
        if (kIsaNames[i] == cap) best = std::min(best, static_cast<Isa>(i));
      }
    }
    return best;
  }();
  return isa;
}

// The vector kernels' set (the AVX-512 kernels also run under kAvx512Bf16).
inline Isa vector_isa() { return std::min(cpu_isa(), Isa::kAvx512); }

// Whether the bfloat16 pair products (kernels::pair_gemm) run.
inline bool bf16_pairs() { return cpu_isa() == Isa::kAvx512Bf16; }

namespace kernels {

// The vector helpers below pass vectors wider than the baseline's registers by value; they are always inlined into
// a kernel compiled for that width, so the ABI GCC warns about (-Wpsabi) is never used. (Not popped: GCC reports
// the warning where the templates are instantiated, at the end of the including file.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// A vector of VB bytes of T (GCC/Clang vector extensions: lowered to the instruction set of the function they are
// inlined into).
template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};
template <typename T, int VB>
using Vec = typename VecOf<T, VB>::type;

template <typename V, typename T>
[[gnu::always_inline]] inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
[[gnu::always_inline]] inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// c + a * b in the scalar loops of the kernels of width VB: one fused multiply-add where the set has one (not the
// x86-64 baseline, SSE2), written out so that every scalar loop rounds the same way whatever GCC contracts on its
// own (it fused some iterations of a float32 loop and all of the same loop on float16 weights).
template <typename T, int VB>
[[gnu::always_inline]] inline T mul_add(T a, T b, T c) {
  if constexpr (SPINAL_X86_DISPATCH && VB == 16) {
    return c + a * b;  // no FMA instruction to contract into
  } else {
    return std::fma(a, b, c);
  }
}

// One element of T from one stored as S (see load_wide). float16 through _Float16, not c10::Half's conversion,
// whose float arithmetic keeps GCC from contracting the product it feeds into an FMA as it does for float32.
template <typename T, typename S>
[[gnu::always_inline]] inline T widen_one(const S& v) {
  if constexpr (std::is_same_v<S, c10::Half>) {
    _Float16 h;
    std::memcpy(&h, &v, sizeof(h));
    return static_cast<T>(h);
  } else {
    return static_cast<T>(v);
  }
}

// One vector of T (VB bytes) from elements stored as S: T itself, or bfloat16 / float16 widened to float32 in the
// registers (exact, as at::Tensor::to does it), so that weights kept in a reduced dtype are read as they are stored.
template <typename T, int VB, typename S>
[[gnu::always_inline]] inline Vec<T, VB> load_wide(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return load<Vec<T, VB>>(p);
  } else {
    static_assert(std::is_same_v<T, float> && (std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>),
                  "bfloat16 and float16 widen to float32");
    constexpr bool kBf16 = std::is_same_v<S, c10::BFloat16>;
    using Half = Vec<short, VB / 2>;  // the stored 16-bit elements
    using Bits = Vec<int, VB>;
    Vec<float, VB> v;
#if SPINAL_X86_DISPATCH && !defined(__clang__)
    // GCC splits a widening __builtin_convertvector of a 32-byte vector in two (three shuffles more per load) and
    // converts _Float16 vectors element by element: the builtins behind _mm512_cvtepu16_epi32 /
    // _mm256_cvtepu16_epi32 and _mm512_cvtph_ps / _mm256_cvtph_ps, checked against the target of the kernel they
    // are inlined into (as stream_store's).
    if constexpr (VB == 64 || VB == 32) {
      const Half h = load<Half>(p);
      if constexpr (kBf16) {
        Bits bits;
        if constexpr (VB == 64) {
          bits = __builtin_ia32_pmovzxwd512_mask(h, Bits{}, static_cast<unsigned short>(-1));
        } else {
          bits = __builtin_ia32_pmovzxwd256(h);
        }
        bits <<= 16;
        std::memcpy(&v, &bits, VB);
      } else if constexpr (VB == 64) {
        v = __builtin_ia32_vcvtph2ps512_mask(h, Vec<float, VB>{}, static_cast<unsigned short>(-1), 4);
      } else {
        v = __builtin_ia32_vcvtph2ps256(h);
      }
      return v;
    }
#endif
    if constexpr (kBf16) {
      const Bits bits = __builtin_convertvector(load<Vec<unsigned short, VB / 2>>(p), Bits) << 16;
      std::memcpy(&v, &bits, VB);
    } else {
      v = __builtin_convertvector(load<Vec<_Float16, VB / 2>>(p), Vec<float, VB>);
    }
    return v;
  }
}

// Block shapes per vector width (32 registers with AVX-512, 16 with AVX2 and SSE2). NN/TN (axpy) blocks: MR rows x up
// to NV vectors of C, plus the NV vectors of B they load.
template <int VB>
struct Shape;
// NT (dot) blocks: DOT_MR rows x NR outputs of vector accumulators, plus the DOT_MR + 1 vectors they load. AVX-512's
// 4 x 4, against 6 x 4 and 3 x 8 (the _cpu_gemm op, NT, one thread, AMD EPYC Zen 5, alternating builds): 190 / 197 /
// 205 GFLOP/s on 256 x 20 x 256, 64 x 512 x 1024 and 256 x 128 x 256; 6 x 4: 183 / 168 / 194; 3 x 8: 151 / 149 /
// 172.
template <>
struct Shape<64> {
  static constexpr int MR = 6, NV = 4, DOT_MR = 4, NR = 4;
};
template <>
struct Shape<32> {
  static constexpr int MR = 4, NV = 3, DOT_MR = 2, NR = 4;
};
template <>
struct Shape<16> {
  static constexpr int MR = 4, NV = 3, DOT_MR = 2, NR = 4;
};

// How a kernel writes C: overwrite, add to it, or overwrite with non-temporal (streaming) stores, which skip
// reading the destination's cache lines before writing them and keep the result out of the caches: for large
// outputs that this call does not read again (the weight gradients of a wide layer). Streamed rows that are not
// aligned to the vector width, and partial vectors, are stored normally.
enum class Out : int { kWrite, kAdd, kStream };

template <typename T, int VB>
[[gnu::always_inline]] inline void stream_store(T* p, const Vec<T, VB>& v) {
#if SPINAL_X86_DISPATCH
  if (reinterpret_cast<uintptr_t>(p) % VB == 0) {
#if defined(__clang__)
    return __builtin_nontemporal_store(v, reinterpret_cast<Vec<T, VB>*>(p));
#else  // GCC: the builtins behind _mm*_stream_p*, checked against the target of the kernel they are inlined into
    if constexpr (VB == 64 && sizeof(T) == 4) return __builtin_ia32_movntps512(p, v);
    if constexpr (VB == 64 && sizeof(T) == 8) return __builtin_ia32_movntpd512(p, v);
    if constexpr (VB == 32 && sizeof(T) == 4) return __builtin_ia32_movntps256(p, v);
    if constexpr (VB == 32 && sizeof(T) == 8) return __builtin_ia32_movntpd256(p, v);
    if constexpr (VB == 16 && sizeof(T) == 4) return __builtin_ia32_movntps(p, v);
    if constexpr (VB == 16 && sizeof(T) == 8) return __builtin_ia32_movntpd(p, v);
#endif
  }
#endif
  store(p, v);
}

// Orders the streaming stores before the stores that follow (the end of a job, which other threads then read).
[[gnu::always_inline]] inline void stream_fence() {
#if SPINAL_X86_DISPATCH
  _mm_sfence();
#endif
}

// The partial last vector of a row (its first `lanes` lanes) read and written in place with AVX-512 masked loads and
// stores, float32 / float64 (kMaskedTail): no zero-padded copy of B's last columns per product and no scalar stores
// per row of C. Masked-off lanes neither fault nor change memory, and load as zeros, as the padded copy held.
// Measured with _cpu_gemm (AMD EPYC Zen 5, one thread, float32, less the op call's 1.7 us): 256 x 20 x 20 NN 1.8 ->
// 1.45 us, 20 x 20 x 256 TN 2.4 -> 1.7 us, regression's 50 x 4 x 256 TN 3.8 -> 2.5 us; results bitwise the same.
template <typename T, int VB, typename S, typename CT>
inline constexpr bool kMaskedTail = SPINAL_X86_DISPATCH && VB == 64 && std::is_same_v<S, T> &&
                                    std::is_same_v<CT, T> && (std::is_same_v<T, float> || std::is_same_v<T, double>);

// Only where kMaskedTail holds (AVX-512, float32 / float64).
template <typename T, int VB>
[[gnu::always_inline]] inline Vec<T, VB> load_first(const T* p, int lanes) {
  static_assert(kMaskedTail<T, VB, T, T>, "masked loads: AVX-512, float32 or float64");
#if SPINAL_X86_DISPATCH
  if constexpr (std::is_same_v<T, float>) {
    return __builtin_ia32_loadups512_mask(p, Vec<T, VB>{}, static_cast<unsigned short>((1u << lanes) - 1));
  } else {
    return __builtin_ia32_loadupd512_mask(p, Vec<T, VB>{}, static_cast<unsigned char>((1u << lanes) - 1));
  }
#endif
}

template <typename T, int VB>
[[gnu::always_inline]] inline void store_first(T* p, const Vec<T, VB>& v, int lanes) {
  static_assert(kMaskedTail<T, VB, T, T>, "masked stores: AVX-512, float32 or float64");
#if SPINAL_X86_DISPATCH
  if constexpr (std::is_same_v<T, float>) {
    __builtin_ia32_storeups512_mask(p, v, static_cast<unsigned short>((1u << lanes) - 1));
  } else {
    __builtin_ia32_storeupd512_mask(p, v, static_cast<unsigned char>((1u << lanes) - 1));
  }
#endif
}

// A float32 vector stored as bfloat16: rounded to nearest even, NaN to the quiet NaN 0x7FC0 (c10::BFloat16's
// rounding, the one at::Tensor::to uses, up to NaN payloads), for kernels that write bfloat16 results directly.
template <int VB>
[[gnu::always_inline]] inline void store_bf16(c10::BFloat16* p, const Vec<float, VB>& v) {
  using U = Vec<uint32_t, VB>;
  U bits;
  std::memcpy(&bits, &v, VB);
  const U nan = (U)(v != v);
  U r = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  r = (r & ~nan) | (0x7FC0u & nan);
  store(p, __builtin_convertvector(r, Vec<uint16_t, VB / 2>));
}

// C[r, :] (=|+=, by `out`) sum_q A(r, q) B[q, :] for r < MR and NV vectors of columns; A(r, q) = a[r * ars + q * aqs]. The
// last vector of the block may be partial: its loads come from `tail` (ld `ldt`; zero-padded to whole vectors, or B
// itself read with masked loads: kMaskedTail) and only `tail_cols` of its columns are stored (kTail; masked stores
// with kMaskedTail). C is T, or bfloat16 (CT; written, rounded once: store_bf16).
template <typename T, int VB, int MR, int NV, bool kTail, typename S, typename CT>
[[gnu::always_inline]] inline void axpy_tile(int64_t k, const T* a, int64_t ars, int64_t aqs, const S* b, int64_t ldb,
                                             const T* tail, int64_t ldt, int tail_cols, CT* c, int64_t ldc,
                                             Out out) {
  using V = Vec<T, VB>;
  constexpr int kLanes = VB / sizeof(T);
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  for (int64_t q = 0; q < k; ++q) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (kTail && v == NV - 1) {
        if constexpr (kMaskedTail<T, VB, S, CT>) {
          bv[v] = load_first<T, VB>(tail + q * ldt, tail_cols);
        } else {
          bv[v] = load<V>(tail + q * ldt);
        }
      } else {
        bv[v] = load_wide<T, VB>(b + q * ldb + v * kLanes);
      }
    }
    const T* aq = a + q * aqs;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T av = aq[r * ars];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    CT* cr = c + r * ldc;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      CT* p = cr + v * kLanes;
      if constexpr (!std::is_same_v<CT, T>) {
        static_assert(std::is_same_v<CT, c10::BFloat16> && std::is_same_v<T, float>, "float32 to bfloat16 only");
        if (kTail && v == NV - 1) {
          for (int l = 0; l < tail_cols; ++l) p[l] = c10::BFloat16(acc[r][v][l]);
        } else {
          store_bf16<VB>(p, acc[r][v]);
        }
      } else if (kTail && v == NV - 1) {
        if constexpr (kMaskedTail<T, VB, S, CT>) {
          store_first<T, VB>(p, out == Out::kAdd ? load_first<T, VB>(p, tail_cols) + acc[r][v] : acc[r][v], tail_cols);
        } else {
          for (int l = 0; l < tail_cols; ++l) p[l] = out == Out::kAdd ? p[l] + acc[r][v][l] : acc[r][v][l];
        }
      } else if (out == Out::kAdd) {
        store(p, load<V>(p) + acc[r][v]);
      } else if (out == Out::kStream) {
        stream_store<T, VB>(p, acc[r][v]);
      } else {
        store(p, acc[r][v]);
      }
    }
  }
}

// Rows [0, m) of one block of NV vectors, MR rows at a time, the last rows with a narrower tile.
template <typename T, int VB, int NV, bool kTail, typename S, typename CT>
[[gnu::always_inline]] inline void axpy_rows(int64_t m, int64_t k, const T* a, int64_t ars, int64_t aqs, const S* b,
                                             int64_t ldb, const T* tail, int64_t ldt, int tail_cols, CT* c,
                                             int64_t ldc, Out out) {
  constexpr int MR = Shape<VB>::MR;
  int64_t r = 0;
  for (; r + MR <= m; r += MR) {
    axpy_tile<T, VB, MR, NV, kTail>(k, a + r * ars, ars, aqs, b, ldb, tail, ldt, tail_cols, c + r * ldc, ldc,
                                    out);
  }
  const T* ar = a + r * ars;
  CT* cr = c + r * ldc;
  switch (m - r) {  // MR <= 6
    case 5: axpy_tile<T, VB, 5, NV, kTail>(k, ar, ars, aqs, b, ldb, tail, ldt, tail_cols, cr, ldc, out); break;
    case 4: axpy_tile<T, VB, 4, NV, kTail>(k, ar, ars, aqs, b, ldb, tail, ldt, tail_cols, cr, ldc, out); break;
    case 3: axpy_tile<T, VB, 3, NV, kTail>(k, ar, ars, aqs, b, ldb, tail, ldt, tail_cols, cr, ldc, out); break;
    case 2: axpy_tile<T, VB, 2, NV, kTail>(k, ar, ars, aqs, b, ldb, tail, ldt, tail_cols, cr, ldc, out); break;
    case 1: axpy_tile<T, VB, 1, NV, kTail>(k, ar, ars, aqs, b, ldb, tail, ldt, tail_cols, cr, ldc, out); break;
    default: break;
  }
}

template <typename T, int VB, bool kTail, typename S, typename CT>
[[gnu::always_inline]] inline void axpy_block(int nv, int64_t m, int64_t k, const T* a, int64_t ars, int64_t aqs,
                                              const S* b, int64_t ldb, const T* tail, int64_t ldt, int tail_cols, CT* c,
                                              int64_t ldc, Out out) {
  static_assert(Shape<VB>::NV <= 4, "blocks of at most four vectors");
  switch (nv) {
    case 4:
      if constexpr (Shape<VB>::NV >= 4) axpy_rows<T, VB, 4, kTail>(m, k, a, ars, aqs, b, ldb, tail, ldt, tail_cols, c, ldc, out);
      break;
    case 3: axpy_rows<T, VB, 3, kTail>(m, k, a, ars, aqs, b, ldb, tail, ldt, tail_cols, c, ldc, out); break;
    case 2: axpy_rows<T, VB, 2, kTail>(m, k, a, ars, aqs, b, ldb, tail, ldt, tail_cols, c, ldc, out); break;
    case 1: axpy_rows<T, VB, 1, kTail>(m, k, a, ars, aqs, b, ldb, tail, ldt, tail_cols, c, ldc, out); break;
    default: break;
  }
}

inline constexpr int64_t kShortK = 16;

// C (m x n) (=|+=) A (m x k, strides ars / aqs) @ B (k x n, ldb; stored as S, read widened to T). `padded`: B's
// rows are readable up to a whole number of vectors past n (a packed B^T, S = T), else the partial last vector is
// read with masked loads (kMaskedTail) or copied (widened) into a zero-padded buffer first. C is T, or bfloat16 (CT,
// written: see axpy_tile).
template <typename T, int VB, typename S, typename CT>
[[gnu::always_inline]] inline void axpy_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t ars, int64_t aqs,
                                             const S* b, int64_t ldb, bool padded, CT* c, int64_t ldc,
                                             Out out) {
  constexpr int kLanes = VB / sizeof(T);
  constexpr int NV = Shape<VB>::NV;
  const int64_t full = n / kLanes;  // whole vectors
  const int tail_cols = static_cast<int>(n - full * kLanes);
  std::vector<T> tail_buffer;
  const T* tail = nullptr;
  int64_t ldt = 0;
  if (tail_cols > 0) {
    if constexpr (std::is_same_v<S, T>) {
      if (padded || kMaskedTail<T, VB, S, CT>) {  // read in place: whole vectors, or masked
        tail = b + full * kLanes;
        ldt = ldb;
      }
    }
    if (tail == nullptr) {
      tail_buffer.assign(static_cast<size_t>(k * kLanes), T(0));
      for (int64_t q = 0; q < k; ++q) {
        for (int l = 0; l < tail_cols; ++l) tail_buffer[q * kLanes + l] = widen_one<T>(b[q * ldb + full * kLanes + l]);
      }
      tail = tail_buffer.data();
      ldt = kLanes;
    }
  }
  // Vectors in blocks of NV; the partial vector joins the last block when it has room, else it is a block alone.
  // Column blocks outside and rows inside, so that a block of B (k x NV vectors) is reused by every row; but for a
  // short k (the weight gradients of a small batch: outer products) rows outside, so that C is written row after
  // row instead of in strips (measured: a 512 x 1024 outer product, AMD EPYC Zen 5, took ~3x longer in strips).
  const int64_t vectors = full + (tail_cols > 0);
  const int64_t row_step = k <= kShortK ? Shape<VB>::MR : m;
  for (int64_t r0 = 0; r0 < m; r0 += row_step) {
    const int64_t mr = std::min(row_step, m - r0);
    const T* ar = a + r0 * ars;
    CT* cr = c + r0 * ldc;
    for (int64_t v0 = 0; v0 < vectors; v0 += NV) {
      const int nv = static_cast<int>(std::min<int64_t>(NV, vectors - v0));
      const bool last = v0 + nv == vectors;
      const S* bv = b + v0 * kLanes;
      CT* cv = cr + v0 * kLanes;
      if (last && tail_cols > 0) {
        axpy_block<T, VB, true>(nv, mr, k, ar, ars, aqs, bv, ldb, tail, ldt, tail_cols, cv, ldc, out);
      } else {
        axpy_block<T, VB, false>(nv, mr, k, ar, ars, aqs, bv, ldb, nullptr, 0, 0, cv, ldc, out);
      }
    }
  }
  if (out == Out::kStream) stream_fence();
}

// Sum of the lanes of v, in a fixed order: halves added until one 16-byte vector is left, then its lanes in order.
template <typename T, int VB>
[[gnu::always_inline]] inline T lane_sum(const Vec<T, VB>& v) {
  if constexpr (VB > 16) {
    Vec<T, VB / 2> lo, hi;
    std::memcpy(&lo, &v, VB / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + VB / 2, VB / 2);
    return lane_sum<T, VB / 2>(lo + hi);
  } else {
    T s = v[0];
#pragma GCC unroll 4
    for (int l = 1; l < VB / static_cast<int>(sizeof(T)); ++l) s += v[l];
    return s;
  }
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SPINAL_HAS_SHUFFLEVECTOR 1
#endif
#endif

#ifdef SPINAL_HAS_SHUFFLEVECTOR
// The four sums of the lanes of a0 .. a3 at once (for the dot kernel's blocks of four outputs), in a fixed order:
// pairs of vectors folded into one (halves added), then pairs of those into quarters, then the groups halved until
// one lane each is left: L / 4 + log2(L / 4) vector operations instead of four lane_sums.
template <int L>
struct Fold {
  // Lane i of the first fold of (a, b): a's halves for i < L / 2, b's after (indices into the pair a|b).
  static constexpr int pair(int i, bool hi) {
    const int half = L / 2, base = i < half ? 0 : L, lane = i % half;
    return base + lane + (hi ? half : 0);
  }
  // Lane i of the second fold of (u, v), each holding two groups of L / 2: four groups of L / 4.
  static constexpr int quarter(int i, bool hi) {
    const int q = i / (L / 4), lane = i % (L / 4);
    return (q < 2 ? 0 : L) + (q % 2) * (L / 2) + lane + (hi ? L / 4 : 0);
  }
  // Lane i of a vector of four groups of g lanes halved to four groups of g / 2 (indices into the vector itself).
  static constexpr int halve(int i, int g, bool hi) {
    const int q = i / (g / 2), lane = i % (g / 2);
    return q * g + lane + (hi ? g / 2 : 0);
  }
};

template <typename V, int L, std::size_t... I>
[[gnu::always_inline]] inline auto fold_pair(const V& a, const V& b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, Fold<L>::pair(I, false)...) +
         __builtin_shufflevector(a, b, Fold<L>::pair(I, true)...);
}
template <typename V, int L, std::size_t... I>
[[gnu::always_inline]] inline auto fold_quarter(const V& u, const V& v, std::index_sequence<I...>) {
  return __builtin_shufflevector(u, v, Fold<L>::quarter(I, false)...) +
         __builtin_shufflevector(u, v, Fold<L>::quarter(I, true)...);
}
template <int L, int G, typename V, std::size_t... I>
[[gnu::always_inline]] inline auto fold_halve(const V& w, std::index_sequence<I...>) {
  return __builtin_shufflevector(w, w, Fold<L>::halve(I, G, false)...) +
         __builtin_shufflevector(w, w, Fold<L>::halve(I, G, true)...);
}
// w: four groups of G lanes -> four sums.
template <typename T, int L, int G, typename V>
[[gnu::always_inline]] inline void finish_groups(const V& w, T* out) {
  if constexpr (G == 1) {
    for (int t = 0; t < 4; ++t) out[t] = w[t];
  } else {
    finish_groups<T, L, G / 2>(fold_halve<L, G>(w, std::make_index_sequence<2 * G>{}), out);
  }
}
template <typename T, int VB>
[[gnu::always_inline]] inline void lane_sums4(const Vec<T, VB>* a, T* out) {
  constexpr int L = VB / sizeof(T);
  using V = Vec<T, VB>;
  const V u = fold_pair<V, L>(a[0], a[1], std::make_index_sequence<L>{});
  const V v = fold_pair<V, L>(a[2], a[3], std::make_index_sequence<L>{});
  finish_groups<T, L, L / 4>(fold_quarter<V, L>(u, v, std::make_index_sequence<L>{}), out);
}

// One stage of an L x L transpose in registers: rows i and i + H (i & H == 0) swap their off-diagonal H-lane blocks
// (lane c + H of row i with lane c of row i + H, for c & H == 0); the stages H = L / 2, ..., 1 transpose the block.
template <int L, int H>
struct Swap {
  static constexpr int low(int c) { return (c & H) ? L + c - H : c; }
  static constexpr int high(int c) { return (c & H) ? L + c : c + H; }
};
template <int L, int H, typename V, std::size_t... I>
[[gnu::always_inline]] inline void swap_stage(V* v, std::index_sequence<I...>) {
  for (int i = 0; i < L; ++i) {
    if (i & H) continue;
    const V a = v[i], b = v[i + H];
    v[i] = __builtin_shufflevector(a, b, Swap<L, H>::low(I)...);
    v[i + H] = __builtin_shufflevector(a, b, Swap<L, H>::high(I)...);
  }
}
template <int L, int H, typename V>
[[gnu::always_inline]] inline void transpose_stages(V* v) {
  swap_stage<L, H>(v, std::make_index_sequence<L>{});
  if constexpr (H > 1) transpose_stages<L, H / 2>(v);
}
#endif

// dst[j * ldd + r] = src[r * lds + j] for r < m, j < n: L x L blocks transposed in registers (L lanes of the set),
// the edges element by element.
template <typename T, int VB>
[[gnu::always_inline]] inline void transpose_matrix(int64_t m, int64_t n, const T* src, int64_t lds, T* dst,
                                                    int64_t ldd) {
  constexpr int L = VB / sizeof(T);
  int64_t r0 = 0;
#ifdef SPINAL_HAS_SHUFFLEVECTOR
  using V = Vec<T, VB>;
  for (; r0 + L <= m; r0 += L) {
    int64_t j0 = 0;
    for (; j0 + L <= n; j0 += L) {
      V v[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) v[i] = load<V>(src + (r0 + i) * lds + j0);
      transpose_stages<L, L / 2>(v);
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) store(dst + (j0 + i) * ldd + r0, v[i]);
    }
    for (int64_t j = j0; j < n; ++j)
      for (int64_t r = r0; r < r0 + L; ++r) dst[j * ldd + r] = src[r * lds + j];
  }
#endif
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = r0; r < m; ++r) dst[j * ldd + r] = src[r * lds + j];
}

// NT block: C[r, j] (=|+=) sum_q A[r, q] W[j, q] for r < MR, j < NR (A: lda, W: ldw, both k-contiguous; W stored as
// S, read widened to T): MR x NR vector accumulators along k, then the lanes of each summed (lane_sum) and the
// k % lanes last terms added in order.
template <typename T, int VB, int MR, int NR, typename S>
[[gnu::always_inline]] inline void dot_tile(int64_t k, const T* a, int64_t lda, const S* w, int64_t ldw, T* c,
                                            int64_t ldc, bool accumulate) {
  using V = Vec<T, VB>;
  constexpr int kLanes = VB / sizeof(T);
  const int64_t kv = k / kLanes * kLanes;
  V acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[r][j] = V{};
  }
  for (int64_t q = 0; q < kv; q += kLanes) {
    V av[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) av[r] = load<V>(a + r * lda + q);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const V wv = load_wide<T, VB>(w + j * ldw + q);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][j] += av[r] * wv;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    T sums[NR];
#ifdef SPINAL_HAS_SHUFFLEVECTOR
    if constexpr (NR % 4 == 0 && VB / sizeof(T) >= 4) {
#pragma GCC unroll 4
      for (int j = 0; j < NR; j += 4) lane_sums4<T, VB>(&acc[r][j], &sums[j]);
    } else
#endif
    {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) sums[j] = lane_sum<T, VB>(acc[r][j]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      T s = sums[j];
      for (int64_t q = kv; q < k; ++q) s = mul_add<T, VB>(a[r * lda + q], widen_one<T>(w[j * ldw + q]), s);
      T& out = c[r * ldc + j];
      out = accumulate ? out + s : s;
    }
  }
}

template <typename T, int VB, int MR, typename S>
[[gnu::always_inline]] inline void dot_rows(int64_t n, int64_t k, const T* a, int64_t lda, const S* w, int64_t ldw,
                                            T* c, int64_t ldc, bool accumulate) {
  constexpr int NR = MR == 1 ? 2 * Shape<VB>::NR : Shape<VB>::NR;  // one row: more chains of FMAs in flight
  int64_t j = 0;
  for (; j + NR <= n; j += NR) dot_tile<T, VB, MR, NR>(k, a, lda, w + j * ldw, ldw, c + j, ldc, accumulate);
  for (; j < n; ++j) dot_tile<T, VB, MR, 1>(k, a, lda, w + j * ldw, ldw, c + j, ldc, accumulate);
}

// C (m x n) (=|+=) A (m x k, lda) @ W^T (W: n x k, ldw), in blocks of kDotK terms of k and kDotN outputs, so that
// a block of W (kDotN x kDotK) and of A (m x kDotK) stay in the L2 cache while every row block reads them; the sums
// of the k blocks are added into C in order.
inline constexpr int64_t kDotK = 256, kDotN = 64;

template <typename T, int VB, typename S>
[[gnu::always_inline]] inline void dot_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const S* w,
                                            int64_t ldw, T* c, int64_t ldc, bool accumulate) {
  constexpr int MR = Shape<VB>::DOT_MR;
  for (int64_t k0 = 0; k0 < k; k0 += kDotK) {
    const int64_t kb = std::min(kDotK, k - k0);
    const bool acc = accumulate || k0 > 0;
    for (int64_t j0 = 0; j0 < n; j0 += kDotN) {
      const int64_t nb = std::min(kDotN, n - j0);
      const S* wb = w + j0 * ldw + k0;
      int64_t r = 0;
      for (; r + MR <= m; r += MR) dot_rows<T, VB, MR>(nb, kb, a + r * lda + k0, lda, wb, ldw, c + r * ldc + j0, ldc, acc);
      for (; r < m; ++r) dot_rows<T, VB, 1>(nb, kb, a + r * lda + k0, lda, wb, ldw, c + r * ldc + j0, ldc, acc);
    }
  }
}

// One row, NN: c[v-block] (=|+=) sum_q a[q] B[q, v-block] for NV whole vectors, kept in registers over all of k
// (NV independent chains of FMAs; c is read and written once).
template <typename T, int VB, int NV, typename S>
[[gnu::always_inline]] inline void axpy_row_block(int64_t k, const T* a, const S* b, int64_t ldb, T* c,
                                                  bool accumulate) {
  using V = Vec<T, VB>;
  constexpr int kLanes = VB / sizeof(T);
  V acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = V{};
  for (int64_t q = 0; q < k; ++q) {
    const T av = a[q];
    const S* bq = b + q * ldb;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] += av * load_wide<T, VB>(bq + v * kLanes);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) store(c + v * kLanes, accumulate ? load<V>(c + v * kLanes) + acc[v] : acc[v]);
}

// One row, NN: c (=|+=) sum_q a[q] B[q, :] (n columns, ldb): blocks of up to 8 whole vectors, then the last
// n % lanes columns one at a time (each a sum over q in the same order).
template <typename T, int VB, typename S>
[[gnu::always_inline]] inline void axpy_row(int64_t n, int64_t k, const T* a, const S* b, int64_t ldb, T* c,
                                            bool accumulate) {
  constexpr int kLanes = VB / sizeof(T);
  const int64_t full = n / kLanes;
  int64_t v0 = 0;
  for (; v0 + 8 <= full; v0 += 8) axpy_row_block<T, VB, 8>(k, a, b + v0 * kLanes, ldb, c + v0 * kLanes, accumulate);
  const S* bv = b + v0 * kLanes;
  T* cv = c + v0 * kLanes;
  switch (full - v0) {
    case 7: axpy_row_block<T, VB, 7>(k, a, bv, ldb, cv, accumulate); break;
    case 6: axpy_row_block<T, VB, 6>(k, a, bv, ldb, cv, accumulate); break;
    case 5: axpy_row_block<T, VB, 5>(k, a, bv, ldb, cv, accumulate); break;
    case 4: axpy_row_block<T, VB, 4>(k, a, bv, ldb, cv, accumulate); break;
    case 3: axpy_row_block<T, VB, 3>(k, a, bv, ldb, cv, accumulate); break;
    case 2: axpy_row_block<T, VB, 2>(k, a, bv, ldb, cv, accumulate); break;
    case 1: axpy_row_block<T, VB, 1>(k, a, bv, ldb, cv, accumulate); break;
    default: break;
  }
  for (int64_t j = full * kLanes; j < n; ++j) {
    T sum = 0;
    for (int64_t q = 0; q < k; ++q) sum = mul_add<T, VB>(a[q], widen_one<T>(b[q * ldb + j]), sum);
    c[j] = accumulate ? c[j] + sum : sum;
  }
}

// The kernels of one instruction set: one non-inline function per form, compiled for that set.
#define SPINAL_KERNEL_SET(ATTR, SUFFIX, VB)                                                                           \
  template <typename T, typename S, typename CT>                                                                      \
  ATTR void axpy_##SUFFIX(int64_t m, int64_t n, int64_t k, const T* a, int64_t ars, int64_t aqs, const S* b,          \
                          int64_t ldb, bool padded, CT* c, int64_t ldc, Out out) {                                    \
    axpy_gemm<T, VB>(m, n, k, a, ars, aqs, b, ldb, padded, c, ldc, out);                                              \
  }                                                                                                                   \
  template <typename T, typename S>                                                                                   \
  ATTR void dot_##SUFFIX(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const S* w, int64_t ldw, T* c,     \
                         int64_t ldc, bool acc) {                                                                     \
    dot_gemm<T, VB>(m, n, k, a, lda, w, ldw, c, ldc, acc);                                                            \
  }                                                                                                                   \
  template <typename T, typename S>                                                                                   \
  ATTR void axpy_row_##SUFFIX(int64_t n, int64_t k, const T* a, const S* b, int64_t ldb, T* c, bool acc) {            \
    axpy_row<T, VB>(n, k, a, b, ldb, c, acc);                                                                         \
  }                                                                                                                   \
  template <typename T, typename S>                                                                                   \
  ATTR void transpose_##SUFFIX(int64_t m, int64_t n, const T* src, int64_t lds, T* dst, int64_t ldd) {                \
    transpose_matrix<T, VB>(m, n, src, lds, dst, ldd);                                                                \
  }

#define SPINAL_NO_ATTR
SPINAL_KERNEL_SET(SPINAL_NO_ATTR, baseline, 16)
#if SPINAL_X86_DISPATCH
SPINAL_KERNEL_SET(SPINAL_TARGET_AVX2, avx2, 32)
SPINAL_KERNEL_SET(SPINAL_TARGET_AVX512, avx512, 64)
#endif
#undef SPINAL_KERNEL_SET
#undef SPINAL_NO_ATTR

}  // namespace kernels

// The vector width, in elements of T, of the instruction set the kernels run (the padding of packed B^T).
template <typename T>
int64_t vector_lanes() {
  switch (vector_isa()) {
    case Isa::kAvx512: return 64 / sizeof(T);
    case Isa::kAvx2: return 32 / sizeof(T);
    default: return 16 / sizeof(T);
  }
}

// Calls kernels::NAME_<set><T>(args...) for the instruction set the kernels run (cpu_isa).
#if SPINAL_X86_DISPATCH
#define SPINAL_ISA_CALL(NAME, ...)                                                           \
  switch (vector_isa()) {                                                                   \
    case Isa::kAvx512: return kernels::NAME##_avx512<T, S>(__VA_ARGS__);                    \
    case Isa::kAvx2: return kernels::NAME##_avx2<T, S>(__VA_ARGS__);                        \
    default: return kernels::NAME##_baseline<T, S>(__VA_ARGS__);                            \
  }
#else
#define SPINAL_ISA_CALL(NAME, ...) return kernels::NAME##_baseline<T, S>(__VA_ARGS__);
#endif

// C (m x n) (=|+=, by `out`) A (m x k; element (r, q) at a[r * ars + q * aqs]) @ B (k x n, ldb) on the hand-written
// kernels (B stored as S; see kernels::load_wide).
template <typename T, typename S, typename CT>
void axpy_product(int64_t m, int64_t n, int64_t k, const T* a, int64_t ars, int64_t aqs, const S* b, int64_t ldb,
                  bool padded, CT* c, int64_t ldc, kernels::Out out) {
  SPINAL_ISA_CALL(axpy, m, n, k, a, ars, aqs, b, ldb, padded, c, ldc, out)
}

// dst (n x m, ldd) = src (m x n, lds) transposed, on the kernels' vectors.
template <typename T>
void transpose(int64_t m, int64_t n, const T* src, int64_t lds, T* dst, int64_t ldd) {
  using S = T;
  SPINAL_ISA_CALL(transpose, m, n, src, lds, dst, ldd)
}

template <typename T, typename S>
void dot_product(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const S* w, int64_t ldw, T* c, int64_t ldc,
                 bool accumulate) {
  SPINAL_ISA_CALL(dot, m, n, k, a, lda, w, ldw, c, ldc, accumulate)
}

template <typename T, typename S>
void axpy_row_product(int64_t n, int64_t k, const T* a, const S* b, int64_t ldb, T* c, bool accumulate) {
  SPINAL_ISA_CALL(axpy_row, n, k, a, b, ldb, c, accumulate)
}

#undef SPINAL_ISA_CALL

// The leading dimension of a packed W^T with n columns: n rounded up to whole vectors.
template <typename T>
int64_t packed_ld(int64_t n) {
  const int64_t lanes = vector_lanes<T>();
  return (n + lanes - 1) / lanes * lanes;
}

// W^T of a row-major W (n x k, ldw; stored as S, widened to T) into out (k x ldo, ldo = packed_ld(n)), the padding
// columns zero. W stored as T: transposed in registers (`transpose`, L x L blocks). Measured against the element
// loop below on an AMD EPYC (Zen 1, AVX2, 2 threads, float32 forwards of SpinalLinear that pack W^T, minimum of 7
// blocks, three alternating rounds, microseconds, registers / elements): wide-resnet-head B = 256 23862-25795 /
// 26479-27723, vgg-head B = 256 1514-1702 / 1648-1776; vit-custom B = 1024 and the B = 64 rows within the noise.
// Widened (S a reduced type): element by element, in blocks of kTransposeBlock x kTransposeBlock, so that both the
// rows read and the rows written stay in L1 (a column walk over W touches one cache line per element).
inline constexpr int64_t kTransposeBlock = 16;
template <typename T, typename S>
void pack_transposed(int64_t n, int64_t k, const S* w, int64_t ldw, T* out, int64_t ldo) {
  if constexpr (std::is_same_v<S, T>) {
    transpose(n, k, w, ldw, out, ldo);
    for (int64_t q = 0; q < k; ++q) std::fill(out + q * ldo + n, out + (q + 1) * ldo, T(0));
  } else {
    constexpr int64_t kB = kTransposeBlock;
    for (int64_t q0 = 0; q0 < k; q0 += kB) {
      const int64_t q1 = std::min(k, q0 + kB);
      for (int64_t j0 = 0; j0 < n; j0 += kB) {
        const int64_t j1 = std::min(n, j0 + kB);
        for (int64_t q = q0; q < q1; ++q) {
          T* row = out + q * ldo;
          for (int64_t j = j0; j < j1; ++j) row[j] = kernels::widen_one<T>(w[j * ldw + q]);
        }
      }
      for (int64_t q = q0; q < q1; ++q) std::fill(out + q * ldo + n, out + (q + 1) * ldo, T(0));
    }
  }
}

// Whether the BLAS runs a product of m x n x k (the rest runs on the kernels above). Measured with
// `python -m spinal_ops bench` on an AMD EPYC (Zen 5, 2 threads), every configuration of spinal_ops/configs.py at
// B = 64 and 1024, hand-written kernels against MKL (which takes its generic path there): with AVX-512 the kernels
// were faster in every row (0.52-0.9x the time; wide-resnet-head B = 1024 forward 16.2 vs 27.7 ms); capped to AVX2
// they were faster only where the products are narrow (resnet-head: 0.68x; vgg-head fwd+bwd 1.07x, wide-resnet-head
// 1.27x and 1.54x), and to the baseline (SSE2) slower from vgg-head on (2.2-2.8x). So: AVX-512 never, else the
// products with at least 16 rows and 32 columns on both sides.
inline bool use_blas(int64_t m, int64_t n, int64_t k) {
  return vector_isa() != Isa::kAvx512 && m >= 16 && n >= 32 && k >= 32;
}

// The TN products op(A) = A^T (the weight gradients dZ^T x_chunk, dZ^T H: k is the batch) go to the BLAS only from
// kBlasMinTnRows terms on: below it MKL's packing of B costs more than its faster loop saves. Measured with the
// backward op alone (AMD EPYC Zen 1, AVX2, 2 threads, 11 alternating blocks in one process, minimum / median
// microseconds, BLAS from 32 / from 128 terms): vit-custom B = 64 188 / 191, 170 / 184; resnet-head B = 64 144 / 159,
// 146 / 148; vgg-head B = 64 775 / 789, 731 / 749; wide-resnet-head B = 64 11643 / 11692, 11449 / 11590; from 128
// rows on (B = 128 .. 512) within the noise, but vgg-head B = 256 took 2672 / 2716 against 2823 / 2900 with the
// threshold at 512, and vit-custom B = 1024 2585 / 2653 with the BLAS against 2746 / 2785 without it.
inline constexpr int64_t kBlasMinTnRows = 128;
inline bool use_blas_tn(int64_t m, int64_t n, int64_t k) { return k >= kBlasMinTnRows && use_blas(m, n, k); }

// The NN products op(A) = A (the backward's carry dZ_i Wh_i and dx += dZ_i Wx_i: k is the width) go to the BLAS only
// from kBlasMinNnTerms terms on: the axpy kernel reads a strip of k rows x NV vectors of B for every MR rows of C,
// which stays in a 32 KB L1 cache up to k ~ 340 with AVX2 (3 vectors of 32 bytes), and below that it ran faster than
// MKL's generic path. Measured with the _cpu_gemm op (AMD EPYC Zen 1, AVX2, one thread, one or two alternating rounds,
// microseconds a call, BLAS / kernel): 128 x 50 x 50 33.5 / 30.3, 128 x 128 x 128 130 / 125, 128 x 256 x 256 417-421 /
// 394-400, 256 x 512 x 128 990-993 / 948-960, 256 x 300 x 300 1266-1351 / 1237-1286, but 128 x 512 x 512 1986 / 2300
// and 256 x 1024 x 512 7568-7628 / 8404-9242; and the backward op alone (2 threads, 7 alternating blocks in one
// process, minimum / median, BLAS from 32 terms / never): vgg-head (w = 128) B = 64 850 / 873, 760 / 784, B = 256
// 3388 / 3446, 3060 / 3161, B = 1024 13414 / 13633, 12831 / 13163; regression (w = 50) B = 1024 1643 / 1657, 1533 /
// 1629, B = 256 437 / 441, 423 / 427; wide-resnet-head (w = 512) B = 64 13320 / 13697, 14260 / 14538.
inline constexpr int64_t kBlasMinNnTerms = 512;
inline bool use_blas_nn(int64_t m, int64_t n, int64_t k) { return k >= kBlasMinNnTerms && use_blas(m, n, k); }

// Whether any product may run on the BLAS (then the jobs keep its threading off: SequentialBlas).
inline bool blas_may_run() { return vector_isa() != Isa::kAvx512; }

// The right operand of an NT product C = A @ W^T: W (n x k, ldw; stored as S), and W^T packed (k x npad, ldwt; T;
// see pack_transposed) when the caller made it (see packs_transposed), else null.
template <typename T, typename S = T>
struct NtOperand {
  const S* w = nullptr;
  int64_t ldw = 0;
  const T* wt = nullptr;
  int64_t ldwt = 0;

  // Outputs from n0 on and terms from k0 on.
  NtOperand shifted(int64_t n0, int64_t k0) const {
    return {w + n0 * ldw + k0, ldw, wt ? wt + k0 * ldwt + n0 : nullptr, ldwt};
  }
};

// Whether the NT products of a call, n outputs of k terms each over `rows` rows (in tiles of `tile_rows`), run on a
// packed W^T (the axpy kernel) rather than on W (the dot kernel). Measured with the _cpu_gemm op on an AMD EPYC (Zen
// 5, one thread, float32, AVX-512): the dot kernel ran 64 x 512 x 1024 at 192 GFLOP/s and the axpy kernel at 253,
// but 256 x 20 x 256 at 178 against 136 (20 of the 32 lanes of two vectors used), and below k = 64 the dot kernel
// spends its time on the k % lanes last terms and the lane sums. So W^T is packed for a short k (the recurrences of
// w = 20..50, the chunks of c = 4: small matrices), and for n >= 64 outputs once the batch has kPackRows rows, where
// the transpose of every weight per call (memory-bound: 31 MB read and written for wide-resnet-custom) costs less
// than the dot kernel's slower products. kPackRows from forwards of SpinalLinear (same machine, 2 threads, float32,
// median of 7, microseconds; packing at >= 128 rows / never for n >= 64): vgg-head B = 128 176 / 157, 256 277 / 294,
// 512 458 / 604; wide-resnet-head 128 3014 / 2566, 256 4716 / 4627, 512 8049 / 11949; wide-resnet-custom 128 8686 /
// 7405, 256 12890 / 15895, 512 21528 / 25065.
inline constexpr int64_t kPackedMaxK = 64;
inline constexpr int64_t kPackMinN = 64;
inline constexpr int64_t kPackRows = 256;
//
// With vectors of 8 float32 lanes or fewer (AVX2, the baseline) narrow outputs fill the axpy kernel's vectors better
// (20 outputs: 20 of 24 lanes) and the dot kernel's lane sums weigh more, so there the products of fewer than
// kPackMinN outputs also pack from kPackRows rows. Measured on an AMD EPYC (Zen 1, AVX2): _cpu_gemm, one thread,
// float32, minimum of 5 x 200 calls, GFLOP/s dot / axpy on W^T: 256 x 20 x 128 20.5 / 25.0, 256 x 20 x 256 26.2 /
// 30.2, 128 x 20 x 128 21.1 / 24.2, 256 x 50 x 128 28.4 / 29.4; forwards of SpinalLinear (2 threads, minimum of 5
// blocks, three alternating pairs, microseconds, dot / packed): resnet-head B = 1024 857-991 / 790-818, vit-custom
// B = 1024 1161-1253 / 1011-1148; but packing at every batch of several tiles, B = 64 (one tile, the packing per call
// not amortised) lost: resnet-head 112-120 / 133-203, vit-custom 141-146 / 151-215.
inline bool packs_transposed(int64_t rows, int64_t tile_rows, int64_t n, int64_t k) {
  return tile_rows >= 2 &&
         (k < kPackedMaxK || (rows >= kPackRows && (n >= kPackMinN || vector_isa() < Isa::kAvx512)));
}


// A product with nothing to sum (m, n or k zero): C is left as it is, or zeroed when it is not accumulated into.
// Returns whether the product was empty.
template <typename T>
bool empty_product(int64_t m, int64_t n, int64_t k, bool accumulate, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return true;
  if (k > 0) return false;
  if (!accumulate) {
    for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, static_cast<T>(0.0f));
  }
  return true;
}

// C (m x n) (=|+= when accumulate) A (m x k, lda) @ W^T. W stored as a reduced S never goes to the BLAS (it would
// need W widened in memory).
template <typename T, typename S>
void nt_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const NtOperand<T, S>& w, bool accumulate, T* c,
             int64_t ldc) {
  if (empty_product(m, n, k, accumulate, c, ldc)) return;
  if constexpr (std::is_same_v<S, T>) {
    if (use_blas(m, n, k)) return blas_gemm<T>(false, true, m, n, k, a, lda, w.w, w.ldw, accumulate, c, ldc);
  }
  if (w.wt != nullptr && m >= 2) {
    return axpy_product<T, T>(m, n, k, a, lda, 1, w.wt, w.ldwt, true, c, ldc,
                              accumulate ? kernels::Out::kAdd : kernels::Out::kWrite);
  }
  dot_product<T, S>(m, n, k, a, lda, w.w, w.ldw, c, ldc, accumulate);
}

// Whether C = A^T B (m x n, on the kernels, written) runs as C^T = B^T A (narrow_tn_product): n narrower than one
// vector of `lanes`, m at least twice n. Measured with the _cpu_gemm op (AMD EPYC Zen 1, AVX2, one thread, float32,
// minimum of 5 blocks): 50 x 4 x 8192 took 326 us as A^T B and 131 us as (B^T A)^T; the regression configuration's
// dWx = dZ^T x_chunk (c = 4) in the backward op at B = 1024 (2 threads, only dWx asked for, two alternating runs):
// 882 / 890 us against 935 / 951. (Not measured with AVX-512, whose masked tail reads a partial vector in place; the
// rule is the same there: the direct form runs one partial vector of n < 16 lanes per row of C.)
inline bool transposes_narrow(int64_t m, int64_t n, int64_t lanes) { return n < lanes && m >= 2 * n; }

// C (m x n) = A^T B for A stored k x m (lda) and B k x n (ldb), n narrower than a vector, as C^T = B^T A into a
// buffer (the kernel's vectors along m, full, instead of one partial vector along n; and A read row after row instead
// of in strips of a few columns), then transposed into C (`transpose`). Each element is the same sum, in the same
// order of terms, as the kernel forms it for A^T B.
template <typename T>
void narrow_tn_product(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                       int64_t ldc) {
  std::vector<T> ct(static_cast<size_t>(n * m));
  axpy_product<T, T, T>(n, m, k, b, 1, ldb, a, lda, false, ct.data(), m, kernels::Out::kWrite);
  transpose<T>(n, m, ct.data(), m, c, ldc);
}

// C (m x n) (=|+= when accumulate) op(A) (m x k) @ B (k x n, ldb; stored as S, and then never on the BLAS, like
// nt_gemm): A (m x k, lda), or its transpose stored (k x m, lda) when trans_a. `stream`: C is large and not read
// again by this call (kernels::Out::kStream; no effect with accumulate or on the BLAS). C is T, or bfloat16 (CT:
// written, not accumulated, rounded once from the float32 sums; never on the BLAS).
template <typename T, typename S, typename CT>
void nn_gemm(bool trans_a, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const S* b, int64_t ldb,
             bool accumulate, CT* c, int64_t ldc, bool stream = false) {
  if (empty_product(m, n, k, accumulate, c, ldc)) return;
  if constexpr (std::is_same_v<S, T> && std::is_same_v<CT, T>) {
    if (trans_a ? use_blas_tn(m, n, k) : use_blas_nn(m, n, k)) {
      return blas_gemm<T>(trans_a, false, m, n, k, a, lda, b, ldb, accumulate, c, ldc);
    }
    if (trans_a && !accumulate && transposes_narrow(m, n, vector_lanes<T>())) {  // the weight gradients: written
      return narrow_tn_product<T>(m, n, k, a, lda, b, ldb, c, ldc);
    }
  }
  if constexpr (std::is_same_v<CT, T>) {
    if (m == 1 && !trans_a) return axpy_row_product<T, S>(n, k, a, b, ldb, c, accumulate);
  }
  const kernels::Out out = accumulate ? kernels::Out::kAdd : stream ? kernels::Out::kStream : kernels::Out::kWrite;
  axpy_product<T, S>(m, n, k, a, trans_a ? 1 : lda, trans_a ? lda : 1, b, ldb, false, c, ldc, out);
}


// bfloat16 pair products (AVX512_BF16). C (m x n, float32) (=|+=) A (m x k, bfloat16) @ W^T for W (n x k, bfloat16),
// on W packed in pairs (pack_pairs): P (ceil(k / 2) x ldp 32-bit words), P[q, j] = W[j, 2q] | W[j, 2q + 1] << 16
// (zero past k and past n; ldp = n rounded up to 16). One vdpbf16ps adds A[r, 2q] W[j, 2q] + A[r, 2q + 1] W[j, 2q + 1]
// to 16 float32 sums, twice the products per instruction of a float32 FMA: an MR x NV-vector block of C in
// registers, the pair A[r, 2q .. 2q + 1] broadcast against NV vectors of P's row q. Sums in pair order, each pair's
// two products added into the running sum one after the other (the instruction's definition: round to nearest
// even, bfloat16 and float32 denormals read and written as zero), whatever the tile, the job split or the thread
// count. Only on x86-64 with GCC or Clang (bf16_pairs() is false elsewhere).
inline int64_t pair_ld(int64_t n) { return (n + 15) / 16 * 16; }

// W (n x k, ldw) into P (see above), in blocks of 16 output columns x 16 pairs.
inline void pack_pairs(int64_t n, int64_t k, const c10::BFloat16* w, int64_t ldw, uint32_t* out, int64_t ldp) {
  const int64_t pairs = (k + 1) / 2;
  for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
    const int64_t q1 = std::min(pairs, q0 + 16);
    for (int64_t j0 = 0; j0 < ldp; j0 += 16) {
      for (int64_t q = q0; q < q1; ++q) {
        uint32_t* row = out + q * ldp;
        for (int64_t j = j0; j < j0 + 16; ++j) {
          uint32_t word = 0;
          if (j < n) {
            word = w[j * ldw + 2 * q].x;
            if (2 * q + 1 < k) word |= static_cast<uint32_t>(w[j * ldw + 2 * q + 1].x) << 16;
          }
          row[j] = word;
        }
      }
    }
  }
}

#if SPINAL_X86_DISPATCH
#define SPINAL_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2")))

namespace kernels {

// One pair step of pair_tile: row q of P against the pairs A[r, 2q .. 2q + 1] (kOdd: the last, odd term alone). The
// pair of row r sits at a + r * ars + q * aqs (16-bit elements, its two terms adjacent): ars = lda, aqs = 2 for a
// row-major A; ars = 2, aqs = 2 ldp for an A^T packed in pairs of its rows (pack_row_pairs).
template <int MR, int NV, bool kOdd>
SPINAL_TARGET_AVX512BF16 [[gnu::always_inline]] inline void pair_step(int64_t q, const uint16_t* a, int64_t ars,
                                                                      int64_t aqs, const uint32_t* p, int64_t ldp,
                                                                      __mmask16 last, __m512 (&acc)[MR][NV]) {
  __m512bh pv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const uint32_t* src = p + q * ldp + v * 16;
    pv[v] = (__m512bh)(v == NV - 1 ? _mm512_maskz_loadu_epi32(last, src) : _mm512_loadu_si512(src));
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const uint16_t* e = a + r * ars + q * aqs;
    uint32_t word = *e;  // kOdd: the pair's second term is zero (and not read: it may lie past the row)
    if constexpr (!kOdd) std::memcpy(&word, e, sizeof(word));
    const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, pv[v]);
  }
}

// Rows [0, MR) x NV vectors of C from `pairs` pairs (and one odd last term when `odd`); the last vector holds
// `last_cols` columns (its loads and stores masked). C is float32 (=|+=), or bfloat16 (CT: written, each sum rounded
// to nearest even by vcvtneps2bf16, which, like vdpbf16ps, writes denormals as zero).
template <int MR, int NV, typename CT>
SPINAL_TARGET_AVX512BF16 [[gnu::always_inline]] inline void pair_tile(int64_t pairs, bool odd, const uint16_t* a,
                                                                      int64_t ars, int64_t aqs, const uint32_t* p,
                                                                      int64_t ldp, int last_cols, CT* c, int64_t ldc,
                                                                      bool accumulate) {
  const __mmask16 last = static_cast<__mmask16>(last_cols == 16 ? 0xFFFF : (1u << last_cols) - 1);
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < pairs; ++q) pair_step<MR, NV, false>(q, a, ars, aqs, p, ldp, last, acc);
  if (odd) pair_step<MR, NV, true>(pairs, a, ars, aqs, p, ldp, last, acc);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      CT* dst = c + r * ldc + v * 16;
      const __mmask16 mask = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      if constexpr (std::is_same_v<CT, float>) {
        __m512 out = acc[r][v];
        if (accumulate) out = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), out);
        _mm512_mask_storeu_ps(dst, mask, out);
      } else {
        static_assert(std::is_same_v<CT, c10::BFloat16>, "float32 or bfloat16 results");
        _mm256_mask_storeu_epi16(dst, mask, (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
      }
    }
  }
}

template <int NV, typename CT>
SPINAL_TARGET_AVX512BF16 [[gnu::always_inline]] inline void pair_rows(int64_t m, int64_t pairs, bool odd,
                                                                      const uint16_t* a, int64_t ars, int64_t aqs,
                                                                      const uint32_t* p, int64_t ldp, int last_cols,
                                                                      CT* c, int64_t ldc, bool accumulate) {
  constexpr int MR = 6;  // 6 x 4 accumulators, 4 vectors of P and one broadcast: 29 of the 32 registers
  int64_t r = 0;
  for (; r + MR <= m; r += MR)
    pair_tile<MR, NV>(pairs, odd, a + r * ars, ars, aqs, p, ldp, last_cols, c + r * ldc, ldc, accumulate);
  const uint16_t* ar = a + r * ars;
  CT* cr = c + r * ldc;
  switch (m - r) {
    case 5: pair_tile<5, NV>(pairs, odd, ar, ars, aqs, p, ldp, last_cols, cr, ldc, accumulate); break;
    case 4: pair_tile<4, NV>(pairs, odd, ar, ars, aqs, p, ldp, last_cols, cr, ldc, accumulate); break;
    case 3: pair_tile<3, NV>(pairs, odd, ar, ars, aqs, p, ldp, last_cols, cr, ldc, accumulate); break;
    case 2: pair_tile<2, NV>(pairs, odd, ar, ars, aqs, p, ldp, last_cols, cr, ldc, accumulate); break;
    case 1: pair_tile<1, NV>(pairs, odd, ar, ars, aqs, p, ldp, last_cols, cr, ldc, accumulate); break;
    default: break;
  }
}

// C (m x n) (=|+= when accumulate; CT = bfloat16: written) A (m x k; pairs at a + r * ars + q * aqs, see pair_step) @
// W^T on P (ldp); column blocks of 4 vectors outside, rows inside (a block of P is reused by every row).
template <typename CT>
SPINAL_TARGET_AVX512BF16 inline void pair_gemm(int64_t m, int64_t n, int64_t k, const uint16_t* a16, int64_t ars,
                                               int64_t aqs, const uint32_t* p, int64_t ldp, CT* c, int64_t ldc,
                                               bool accumulate) {
  const int64_t pairs = k / 2, vectors = (n + 15) / 16;
  const bool odd = k % 2 != 0;
  for (int64_t v0 = 0; v0 < vectors; v0 += 4) {
    const int nv = static_cast<int>(std::min<int64_t>(4, vectors - v0));
    const int last_cols = static_cast<int>(std::min<int64_t>(16, n - (v0 + nv - 1) * 16));
    const uint32_t* pv = p + v0 * 16;
    CT* cv = c + v0 * 16;
    switch (nv) {
      case 4: pair_rows<4>(m, pairs, odd, a16, ars, aqs, pv, ldp, last_cols, cv, ldc, accumulate); break;
      case 3: pair_rows<3>(m, pairs, odd, a16, ars, aqs, pv, ldp, last_cols, cv, ldc, accumulate); break;
      case 2: pair_rows<2>(m, pairs, odd, a16, ars, aqs, pv, ldp, last_cols, cv, ldc, accumulate); break;
      default: pair_rows<1>(m, pairs, odd, a16, ars, aqs, pv, ldp, last_cols, cv, ldc, accumulate); break;
    }
  }
}

// 16 elements of a row (masked: zero past the mask) as the low halves of 16 32-bit words, float32 rounded to nearest
// even bfloat16 by vcvtneps2bf16.
template <typename Src>
SPINAL_TARGET_AVX512BF16 [[gnu::always_inline]] inline __m512i load_bf16_words(const Src* src, __mmask16 mask) {
  if constexpr (std::is_same_v<Src, float>) {
    return _mm512_maskz_cvtepu16_epi32(0xFFFF, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src)));
  } else {
    static_assert(std::is_same_v<Src, c10::BFloat16>, "float32 or bfloat16 rows");
    return _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(mask, src));
  }
}

// v[0, n) rounded to nearest even bfloat16 by vcvtneps2bf16 (as pack_row_pairs rounds) into out.
SPINAL_TARGET_AVX512BF16 inline void round_bf16(int64_t n, const float* v, c10::BFloat16* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = static_cast<__mmask16>(n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1);
    _mm256_mask_storeu_epi16(out + j, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, v + j)));
  }
}

// Rows [2 q0, 2 q1) of M (rows x n, ld; float32, rounded to nearest even bfloat16 by vcvtneps2bf16, or bfloat16) into
// rows [q0, q1) of P, packed in pairs of rows: P[q, j] = M[2q, j] | M[2q + 1, j] << 16 (zero past the rows and past
// n, up to ldp, a multiple of 16).
template <typename Src>
SPINAL_TARGET_AVX512BF16 inline void pack_row_pairs(int64_t q0, int64_t q1, int64_t rows, int64_t n, const Src* m,
                                                    int64_t ld, uint32_t* out, int64_t ldp) {
  for (int64_t q = q0; q < q1; ++q) {
    const Src* lo = m + 2 * q * ld;
    const bool has_hi = 2 * q + 1 < rows;
    uint32_t* o = out + q * ldp;
    for (int64_t j = 0; j < ldp; j += 16) {
      const __mmask16 mask = static_cast<__mmask16>(j + 16 <= n ? 0xFFFF : (j < n ? (1u << (n - j)) - 1 : 0));
      __m512i word = load_bf16_words(lo + j, mask);
      if (has_hi) {
        word = _mm512_or_si512(word, _mm512_maskz_slli_epi32(0xFFFF, load_bf16_words(lo + ld + j, mask), 16));
      }
      _mm512_storeu_si512(o + j, word);
    }
  }
}

// NT block on W as stored (where W is not packed in pairs: see pack_weights in spinal_cpu.cpp): C[r, j] (=|+=) sum_q A[r, q] W[j, q] for
// r < MR, j < NR; one vdpbf16ps per 32 terms of each (r, j), lane l holding the pairs (32t + 2l, 32t + 2l + 1), the
// last 32 or fewer terms loaded masked (zeros add nothing), then the lanes summed (lane_sum).
template <int MR, int NR>
SPINAL_TARGET_AVX512BF16 [[gnu::always_inline]] inline void pair_dot_tile(int64_t k, const uint16_t* a, int64_t lda,
                                                                          const uint16_t* w, int64_t ldw, float* c,
                                                                          int64_t ldc, bool accumulate) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < k; q += 32) {
    const __mmask32 mask = k - q >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (k - q)) - 1);
    __m512bh av[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) av[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, a + r * lda + q);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * ldw + q);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av[r], wv);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const float sum = lane_sum<float, 64>(acc[r][j]);
      float& out = c[r * ldc + j];
      out = accumulate ? out + sum : sum;
    }
  }
}

template <int MR>
SPINAL_TARGET_AVX512BF16 [[gnu::always_inline]] inline void pair_dot_rows(int64_t n, int64_t k, const uint16_t* a,
                                                                          int64_t lda, const uint16_t* w, int64_t ldw,
                                                                          float* c, int64_t ldc, bool accumulate) {
  constexpr int NR = MR == 1 ? 8 : 4;  // one row: more chains of dot products in flight
  int64_t j = 0;
  for (; j + NR <= n; j += NR) pair_dot_tile<MR, NR>(k, a, lda, w + j * ldw, ldw, c + j, ldc, accumulate);
  for (; j < n; ++j) pair_dot_tile<MR, 1>(k, a, lda, w + j * ldw, ldw, c + j, ldc, accumulate);
}

// C (m x n) (=|+= when accumulate) A (m x k, lda) @ W^T (W: n x k, ldw), both bfloat16 as stored, in blocks of
// 2 kDotK terms and kDotN outputs (as dot_gemm, whose float32 blocks hold as many bytes).
SPINAL_TARGET_AVX512BF16 inline void pair_dot_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a,
                                                   int64_t lda, const c10::BFloat16* w, int64_t ldw, float* c,
                                                   int64_t ldc, bool accumulate) {
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(a);
  const uint16_t* w16 = reinterpret_cast<const uint16_t*>(w);
  constexpr int64_t kBlockK = 2 * kDotK;
  for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
    const int64_t kb = std::min(kBlockK, k - k0);
    const bool acc = accumulate || k0 > 0;
    for (int64_t j0 = 0; j0 < n; j0 += kDotN) {
      const int64_t nb = std::min(kDotN, n - j0);
      const uint16_t* wb = w16 + j0 * ldw + k0;
      int64_t r = 0;
      for (; r + 4 <= m; r += 4) pair_dot_rows<4>(nb, kb, a16 + r * lda + k0, lda, wb, ldw, c + r * ldc + j0, ldc, acc);
      for (; r < m; ++r) pair_dot_rows<1>(nb, kb, a16 + r * lda + k0, lda, wb, ldw, c + r * ldc + j0, ldc, acc);
    }
  }
}

}  // namespace kernels
#endif

// C (m x n) (=|+= when accumulate) A (m x k, lda) @ W^T (W: n x k, ldw), both bfloat16 as stored, on the pairs'
// dot form (kernels::pair_dot_gemm). Only where bf16_pairs().
inline void pair_dot_product(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda,
                             const c10::BFloat16* w, int64_t ldw, float* c, int64_t ldc, bool accumulate) {
  if (empty_product(m, n, k, accumulate, c, ldc)) return;
#if SPINAL_X86_DISPATCH
  kernels::pair_dot_gemm(m, n, k, a, lda, w, ldw, c, ldc, accumulate);
#else
  (void)a, (void)lda, (void)w, (void)ldw;
#endif
}

// C (m x n) (=|+= when accumulate) A (m x k, lda; bfloat16) @ W^T on W packed in pairs (pack_pairs; the columns from
// the pointer on, ldp). Only where bf16_pairs().
inline void pair_product(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const uint32_t* p,
                         int64_t ldp, float* c, int64_t ldc, bool accumulate) {
  if (empty_product(m, n, k, accumulate, c, ldc)) return;
#if SPINAL_X86_DISPATCH
  kernels::pair_gemm<float>(m, n, k, reinterpret_cast<const uint16_t*>(a), lda, 2, p, ldp, c, ldc, accumulate);
#else
  (void)a, (void)lda, (void)p, (void)ldp;
#endif
}

// M (rows x n, ld; float32 rounded to bfloat16, or bfloat16) packed in pairs of rows into P ((rows + 1) / 2 x ldp
// 32-bit words, ldp = pair_ld(n)): P[q, j] = M[2q, j] | M[2q + 1, j] << 16. The pairs [q0, q1) of rows; the
// weight gradients' operands (pair_tn_product). Only where bf16_pairs().
template <typename Src>
void pack_row_pairs(int64_t q0, int64_t q1, int64_t rows, int64_t n, const Src* m, int64_t ld, uint32_t* out,
                    int64_t ldp) {
#if SPINAL_X86_DISPATCH
  kernels::pack_row_pairs<Src>(q0, q1, rows, n, m, ld, out, ldp);
#else
  (void)q0, (void)q1, (void)rows, (void)n, (void)m, (void)ld, (void)out, (void)ldp;
#endif
}

// Rows [0, m) of M (m x n, ld; float32) rounded to nearest even bfloat16 into out (ldo), as pack_row_pairs rounds.
// Only where bf16_pairs().
inline void round_rows_bf16(int64_t m, int64_t n, const float* v, int64_t ld, c10::BFloat16* out, int64_t ldo) {
#if SPINAL_X86_DISPATCH
  for (int64_t r = 0; r < m; ++r) kernels::round_bf16(n, v + r * ld, out + r * ldo);
#else
  (void)m, (void)n, (void)v, (void)ld, (void)out, (void)ldo;
#endif
}

// C (m x n) = A^T (A: k x m) @ B (k x n), over k = the rows of two matrices packed in pairs of rows (pack_row_pairs):
// A's columns from `a` on (lda words), B's from `b` on (ldb words); summed pair by pair (pair_gemm). C is float32 or
// bfloat16 (CT), written. Only where bf16_pairs().
template <typename CT>
void pair_tn_product(int64_t m, int64_t n, int64_t k, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                     CT* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, static_cast<CT>(0.0f));
    return;
  }
#if SPINAL_X86_DISPATCH
  kernels::pair_gemm<CT>(m, n, k, reinterpret_cast<const uint16_t*>(a), 2, 2 * lda, b, ldb, c, ldc, false);
#else
  (void)a, (void)lda, (void)b, (void)ldb;
#endif
}

}  // namespace spinal_ops::cpu
