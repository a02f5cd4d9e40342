// The parallel jobs of the CPU kernels (csrc/cpu/spinal_cpu.cpp): row tiles, column blocks within a one-tile
// batch, and the runner that spreads jobs over PyTorch's intra-op threads (at::parallel_for), each job with
// sequential BLAS (csrc/cpu/spinal_blas.h).
//
// Determinism: the split into jobs depends only on the problem sizes, never on the thread count, and which
// thread runs a job never changes its result, so outputs are bitwise identical across runs and thread counts.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../spinal_args.h"
#include "spinal_gemm.h"

namespace spinal_ops::cpu {

// Below this many multiply-adds in all, jobs run on the calling thread: waking the thread pool costs more
// than it saves (measured: a B = 32 backward took 0.67 ms on one thread and up to 20 ms through the pool on a
// loaded 2-core machine). About 10 us of work on one core.
inline constexpr int64_t kParallelWork = int64_t(1) << 18;

// Runs fn(j) for j = 0 .. jobs-1, in parallel over PyTorch's intra-op threads when there is enough work, each
// job with sequential BLAS. `work` is the multiply-adds of all jobs together. Threads take the next job from a
// shared counter, so jobs of unequal size balance: at::parallel_for alone hands each thread a contiguous range,
// which gave one of 2 threads all four dW_x jobs of wide-resnet-head's weight-gradient phase (~90% of its work).
// Which thread runs a job never changes its result.
//
// Global state: none is changed. The one hazard is ATen's lazy per-thread initialisation of its thread settings:
// the first at::parallel_for or at::get_num_threads of a thread sets OpenMP's thread count to
// mkl_get_max_threads(), which reads 1 while a SequentialBlas is alive on that thread (a one-tile batch runs its
// column-split jobs inside one). That left torch.get_num_threads() at 1 for the rest of the caller's program.
// The flag is thread-local and kept once per copy of the inline at::internal::lazy_init_num_threads (libtorch
// has one, at::parallel_for inlines another into this library), so both are initialised here, before any
// SequentialBlas exists on this thread.
template <typename F>
void run_jobs(int64_t jobs, int64_t work, const F& fn) {
  at::internal::lazy_init_num_threads();
  (void)at::get_num_threads();
  if (jobs <= 1 || work < kParallelWork) {
    SequentialBlas sequential(blas_may_run());
    for (int64_t j = 0; j < jobs; ++j) fn(j);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(jobs, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    SequentialBlas sequential(blas_may_run());
    for (int64_t j = next.fetch_add(1); j < jobs; j = next.fetch_add(1)) fn(j);
  });
}

// The row tiles of a call: the batch in tiles of `size` rows, each one job (rows are independent in the forward
// and the backward's chain). The size depends only on the problem sizes, never on the thread count, which keeps
// results bitwise reproducible; every kernel sums each element in the same order whatever its tile.
//
// Layers whose weights fit in the L2 cache (at most kTileWeightBytes) split the batch into about kRowJobs tiles of
// a multiple of 16 rows, between kMinRowTile and kMaxRowTile: every tile reads the weights from the cache, and a
// small batch still makes several jobs (resnet-head at B = 64: 4 tiles of 16). Wider layers keep tiles of
// kMaxRowTile rows (the weights stream from memory once per tile), and a batch that is one tile splits each
// sub-layer's products into column blocks instead (ColumnSplit). kMaxRowTile: chosen by `python -m spinal_ops
// bench` over {64, 128, 256, 512} (AMD EPYC, AVX2): 256 amortises the per-product overhead of the narrow layers while
// a tile of H (256 * L*w values, <= 5 MB for L*w = 5120) still streams through L2 for the wide ones.
//
// Weights of more than kL2Bytes (the L2 of a core of the AMD EPYC Zen 1 and Zen 3 machines measured; Zen 5 has 1 MB)
// come from the L3 in every tile: there tiles are of at least 32 rows where the batch still makes two of them
// (vgg-head, 740 KB of float32 weights: B = 64 in two tiles of 32, not four of 16; B = 32 keeps two of 16). Measured
// on the AMD EPYC Zen 3 (2 threads, one process, 15 rounds of alternating blocks of 0.08 s, median of the rounds'
// ratios, 32-row tiles / 16-row tiles): vgg-head B = 64 forward 0.84 and 0.87, fwd+bwd 0.95 and 0.95, B = 128 forward
// 0.88, fwd+bwd 0.93; one tile of 32 at B = 32 lost (forward 1.14, fwd+bwd 1.08); for the layers of about 100 KB or
// less (resnet-head, vit-custom, regression) 32-row tiles at B = 64 and 128 gave 0.95-1.10, where two identical
// settings in the same runs gave 0.95-1.04.
inline constexpr int64_t kMaxRowTile = 256;
inline constexpr int64_t kMinRowTile = 16;
inline constexpr int64_t kL3RowTile = 32;
inline constexpr int64_t kRowJobs = 8;
inline constexpr int64_t kTileWeightBytes = int64_t(1) << 20;
inline constexpr int64_t kL2Bytes = int64_t(512) << 10;

struct RowTiles {
  int64_t rows = 0;
  int64_t size = 1;   // rows per tile (the last may be shorter)
  int64_t count = 0;  // number of tiles

  static RowTiles make(const SpinalDims& d, int64_t element_size) {
    const int64_t weights = d.layers * d.width * d.chunk + (d.layers - 1) * d.width * d.width + d.hidden() * d.out;
    RowTiles t;
    t.rows = d.rows;
    t.size = kMaxRowTile;
    if (weights * element_size <= kTileWeightBytes) {
      const int64_t per_job = (d.rows + kRowJobs - 1) / kRowJobs;
      const bool from_l3 = weights * element_size > kL2Bytes && d.rows >= 2 * kL3RowTile;
      t.size = std::clamp((per_job + 15) / 16 * 16, from_l3 ? kL3RowTile : kMinRowTile, kMaxRowTile);
    }
    t.count = (d.rows + t.size - 1) / t.size;
    return t;
  }
  int64_t begin(int64_t t) const { return t * size; }
  int64_t length(int64_t t) const { return std::min(size, rows - t * size); }
};

// Multiply-adds of one row through the layer (the forward; the backward's phases are of the same order).
inline int64_t row_work(const SpinalDims& d) {
  return d.layers * d.width * (d.chunk + d.width) + d.hidden() * d.out;
}

// Runs fn(r0, m, one_tile) for every row tile (as parallel jobs); one_tile: the batch is one tile.
template <typename F>
void for_each_tile(const RowTiles& tiles, int64_t work, const F& fn) {
  run_jobs(tiles.count, work, [&](int64_t t) { fn(tiles.begin(t), tiles.length(t), tiles.count == 1); });
}

// Rows of one tile are one job. When the whole batch is one tile (RowTiles: B <= 16, or a layer too wide for the L2
// cache with B <= kMaxRowTile) that single job would leave
// every other thread idle while it runs the chain, so each sub-layer's products are split instead into fixed
// column blocks of the output (the width w for Z and the carry, the chunk c for dx), one job each, with a join per
// sub-layer. The split depends only on the sizes, never on the thread count (results stay bitwise reproducible),
// and is used only when one sub-layer's product has at least kParallelWork multiply-adds. Blocks are multiples of
// 16 columns (whole AVX-512 / two AVX2 vectors), at least kMinColumnBlock wide (a GEMM call per block stays
// cheap next to its work) and at most kMaxColumnBlocks. Measured on 2 cores (AMD EPYC, AVX2): the forward of
// wide-resnet-custom (w = 512, 8 blocks) at B = 1 / 64 took 0.70x / 0.52x the time of the single job.
inline constexpr int64_t kMaxColumnBlocks = 8;
inline constexpr int64_t kMinColumnBlock = 64;

struct ColumnSplit {
  int64_t columns = 0;
  int64_t blocks = 1;
  int64_t size = 0;  // columns per block (the last one may be shorter)

  // Split of `columns` output columns of a product with `work` multiply-adds, within a one-tile batch.
  static ColumnSplit make(int64_t columns, int64_t work, bool one_tile) {
    ColumnSplit c;
    c.columns = columns;
    c.size = columns;
    if (!one_tile || work < kParallelWork || columns < 2 * kMinColumnBlock) return c;
    c.blocks = std::min(kMaxColumnBlocks, columns / kMinColumnBlock);
    c.size = ((columns + c.blocks - 1) / c.blocks + 15) / 16 * 16;
    c.blocks = (columns + c.size - 1) / c.size;
    return c;
  }
  int64_t begin(int64_t b) const { return b * size; }
  int64_t end(int64_t b) const { return std::min(columns, (b + 1) * size); }
};

}  // namespace spinal_ops::cpu
