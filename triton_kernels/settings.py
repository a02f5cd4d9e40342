"""Launch settings of the Triton kernels: the one place that picks the path (fast or wide), tile sizes, warps and
stages, and that enforces the kernels' remaining limit (32-bit weight offsets, :func:`check_index_limits`).

Two paths of the row-tiled kernels (forward, backward chain), chosen by :func:`path_plan`: the fast path keeps a
whole sub-layer width and the whole head row as single tiles (h in registers, the whole recurrent and head weight
tiles staged at once); the wide path tiles the width (BLOCK_N columns, K-steps of BLOCK_K) and the head (BLOCK_O
outputs), reading h / dZ back from global memory, and so has no limit on layer_width or out_features. The fast
path is used while its whole tiles fit the shared-memory and register model below (:func:`fast_path_fits`).

Nothing here was timed on a GPU (none is available to this project). Every constant comes from a simple model
of an NVIDIA H100 / A100 SM, stated next to it:

- registers: 65536 32-bit registers per SM, at most 255 per thread. We budget 128 fp32 *accumulator* values
  per thread (half the per-thread maximum; the other half holds dot operands, pointers and masks), i.e.
  ``128 * 32 * num_warps`` live accumulator values per program.
- shared memory: 227 KB usable per block on H100 (164 KB on A100). A ``tl.dot`` operand tile is staged
  there, once per pipeline stage; we keep the staged bytes under 160 KB so both architectures fit.
- memory transactions: a row segment of 128 bytes is one full cache line; K-steps of 128 bytes per row
  (32 fp32 / 64 half values) keep every load of ``x`` a whole number of lines.
- ``tl.dot`` needs every tile dimension >= 16.

Under ``TRITON_INTERPRET=1`` the kernels run as numpy on whole tiles and the cost is per executed operation,
so the interpreter settings simply take larger tiles (fewer programs and loop trips); their values change speed
only, never results.

On a GPU the forward and backward chain kernels are wrapped in ``triton.autotune`` over the row tile, warps and
stages (:func:`forward_autotune_configs`, :func:`chain_autotune_configs`), pruned by the register and
shared-memory model above on the path :func:`path_plan` chose (the path and its BLOCK_W / BLOCK_O / BLOCK_N /
BLOCK_K are fixed by this module, not tuned); ``SPINAL_OPS_TRITON_AUTOTUNE=0`` uses the model's single choice
instead. The tuning key buckets the batch size (its next power of two, :func:`batch_bucket`) and includes the path:
a new batch size re-tunes only when it starts a new bucket. First-call cost on a GPU: every kernel and bucket
compiles and times its pruned candidates once (up to 32 configurations, seconds per kernel); later calls with
the same shapes and bucket reuse the winner. ``SPINAL_OPS_TRITON_AUTOTUNE=0`` skips tuning (one compile per
kernel, the model's settings), for reproducible tiles across processes and for CUDA graph capture without a
warm-up call.

float32 ``tl.dot`` precision follows PyTorch's own switch, ``torch.get_float32_matmul_precision()``:
``"highest"`` (PyTorch's default) -> ``"ieee"`` (exact fp32 products, what the tests use); ``"high"`` or
``"medium"`` -> ``"tf32"`` (10-bit mantissa operands: expect relative errors around 1e-3 of the output scale,
about ``2**-11 * sqrt(c)`` per dot product; the tests do not run tf32, the interpreter ignores it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------- model constants

ACC_VALUES_PER_THREAD = 128  # half of the 255-register per-thread limit, see the module docstring
THREADS_PER_WARP = 32
SMEM_BUDGET_BYTES = 160 * 1024  # fits A100 (164 KB) and H100 (227 KB) per-block shared memory
LINE_BYTES = 128  # one cache line: the K-step of a row
MIN_DOT = 16  # smallest tl.dot tile dimension
MAX_ROW_TILE = 128  # beyond 128 rows a program's accumulators exceed the register budget for every w >= 16
INTERPRETER_ROW_TILE = 64  # interpreter: large tiles, few programs (speed only)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"3.9.0+git1234"``."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


FP64_DOT = _release(triton.__version__) >= (3, 5)  # tl.dot accepts float64 operands


# Triton's interpreter is process-global (each launch patches triton.language): launches are serialised there.
INTERPRETER_LOCK = threading.Lock()


def launch_guard(device: torch.device):
    """Context for a launcher's kernel launches on ``device``: the interpreter lock under ``TRITON_INTERPRET=1``;
    on a GPU the device guard of ``device``, so that Triton launches there, on that device's current stream (not on
    whatever device is current)."""
    if interpreted():
        check_interpreter_numpy(triton.__version__, _numpy_version())
        return INTERPRETER_LOCK
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _numpy_version() -> str:
    import numpy

    return numpy.__version__


@functools.cache
def check_interpreter_numpy(triton_version: str, numpy_version: str) -> None:
    """Triton's interpreter before 3.7 turns each scalar kernel argument into a 1-element array and converts it
    back with ``int()`` (loop bounds such as ``range(0, L)``), which numpy 2.4 refuses; stop with what to install
    instead of failing inside a kernel."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        raise RuntimeError(
            f"spinal_ops: the Triton {triton_version} interpreter (TRITON_INTERPRET=1) cannot run with numpy "
            f"{numpy_version} (it converts 1-element arrays with int(), which numpy 2.4 refuses): install "
            "'numpy<2.4', or Triton >= 3.7"
        )


def launcher(kernel):
    """``torch.library.wrap_triton(kernel)``: a launch that ``torch.compile`` and ``make_fx`` trace as a kernel call.

    torch before 2.13 rejects the interpreter's kernel objects (``TRITON_INTERPRET=1``); there the kernel is
    launched as it is, which runs it the same way eagerly (tracing such a launch under ``torch.compile`` then needs
    torch >= 2.13).
    """
    from torch.library import wrap_triton

    try:
        return wrap_triton(kernel)
    except RuntimeError:
        if not interpreted():
            raise
        return kernel


def launch_row_tiled(kernel, tuned, rows: int, args: tuple, consts: dict, settings, device: torch.device) -> None:
    """Launch a row-tiled kernel (forward, backward chain) under :func:`launch_guard`: ``tuned()`` (its
    ``triton.autotune`` wrapper, the grid from the chosen ``BLOCK_B``) when :func:`autotune_enabled`, else
    ``kernel`` with ``settings()`` (the model's :class:`ChainSettings`)."""
    with launch_guard(device):
        if autotune_enabled():
            launcher(tuned())[lambda meta: (triton.cdiv(rows, meta["BLOCK_B"]),)](*args, **consts)
        else:
            s = settings()
            launcher(kernel)[(triton.cdiv(rows, s.block_b),)](*args, **consts, **s.meta())


@functools.lru_cache(maxsize=256)
def cached_layer_table(starts: tuple, slots: tuple, device: torch.device) -> torch.Tensor:
    """The kernels' ``(2L,)`` int32 table (starts, then slots) on ``device``: copied once per distinct table and
    device (a blocking copy from host memory, complete before any stream reads it), then reused, so a call makes
    no host-to-device copy and no synchronisation (warm up once before capturing a CUDA graph)."""
    return torch.tensor([*starts, *slots], dtype=torch.int32, device=device)


def interpreted() -> bool:
    """Kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """``triton.autotune`` on GPUs, unless ``SPINAL_OPS_TRITON_AUTOTUNE=0``; never under the interpreter."""
    return not interpreted() and os.environ.get("SPINAL_OPS_TRITON_AUTOTUNE", "1") != "0"


# ---------------------------------------------------------------------------------------------------- dtypes


@dataclasses.dataclass(frozen=True)
class DtypePlan:
    """How a storage dtype is computed: operand dtype of ``tl.dot``, accumulator dtype, fp32 dot precision."""

    dot: tl.dtype
    acc: tl.dtype
    precision: str  # "ieee" or "tf32"; "fma": no tl.dot (float64 before Triton 3.5)


def dtype_plan(dtype: torch.dtype) -> DtypePlan:
    """float64: fp64 throughout (``tl.dot`` in fp64 from Triton 3.5; before, products summed by broadcast, the
    ``"fma"`` precision of ``_mma``). float32: fp32 with ieee/tf32 from ``torch.get_float32_matmul_precision()``.
    float16: fp16 dot operands, fp32 accumulation. bfloat16: bf16 dot operands with fp32 accumulation on a GPU;
    under the interpreter the operands are upcast to fp32 first (its bf16 ``tl.dot`` returns garbage)."""
    if dtype == torch.float64:
        return DtypePlan(tl.float64, tl.float64, "ieee" if FP64_DOT else "fma")
    if dtype == torch.float32:
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        return DtypePlan(tl.float32, tl.float32, precision)
    if dtype == torch.float16:
        return DtypePlan(tl.float16, tl.float32, "ieee")
    if dtype == torch.bfloat16:
        return DtypePlan(tl.float32 if interpreted() else tl.bfloat16, tl.float32, "ieee")
    raise TypeError(f"spinal_ops triton backend: unsupported dtype {dtype}; use float16, bfloat16, float32 or float64")


# ------------------------------------------------------------------------------------------------ index limits

INDEX_LIMIT = (1 << 31) - 1  # the kernels compute weight offsets in 32-bit integers (row offsets are 64-bit)


def check_index_limits(rows: int, in_features: int, chunk: int, width: int, num_layers: int, out: int, lx: int,
                       lh: int) -> None:
    """Raise a clear error (backend, argument, supported values, fallback) past the kernels' 32-bit index math.

    Rows are addressed with 64-bit offsets, so ``x``, ``H`` and ``y`` may exceed 2^31 elements; row indices,
    column indices and offsets inside one weight tensor are 32-bit: fewer than 2^31 rows, and each of
    ``weight_x (Lx, w, c)``, ``weight_h (Lh, w, w)`` and ``head_weight (out, L*w)`` below 2^31 elements. There is
    no limit on layer_width or out_features by themselves (the wide path tiles both).
    """
    fallback = "use the cuda, cpu or reference backend (spinal_ops.use_backend(...))"
    checks = [
        ("batch rows", rows, f"B = {rows}"),
        ("layer_width (weight_x)", lx * width * chunk, f"weight_x ({lx}, {width}, {chunk})"),
        ("layer_width (weight_h)", lh * width * width, f"weight_h ({lh}, {width}, {width})"),
        ("out_features (head_weight)", out * num_layers * width, f"head_weight ({out}, {num_layers * width})"),
    ]
    for argument, size, shape in checks:
        if size > INDEX_LIMIT:
            raise ValueError(
                f"spinal_ops triton backend: {argument}: {shape} has {size} elements, past the kernels' 32-bit "
                f"index arithmetic; supported: fewer than 2^31 batch rows and fewer than 2^31 elements per weight "
                f"tensor (any layer_width and out_features within that); {fallback}"
            )


# ------------------------------------------------------------------------------------------ paths and tiles


def width_tile(width: int) -> int:
    """Fast path BLOCK_W: the whole sub-layer width (h lives in registers as one tile), a power of two >= 16."""
    return max(MIN_DOT, _pow2(width))


def out_tile(out: int) -> int:
    """Fast path BLOCK_O: the whole head width (the head accumulator y stays in registers), padded likewise."""
    return max(MIN_DOT, _pow2(out))


def k_step(extent: int, dtype: torch.dtype) -> int:
    """K-step over chunk columns / input columns: one 128-byte line per row, at most the padded extent."""
    per_line = LINE_BYTES // max(_element_size(dtype), 2)
    return max(MIN_DOT, min(per_line, _pow2(extent)))


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


# The fast path's fit model. It stages two whole weight tiles as tl.dot operands in shared memory: the recurrent
# weight (BLOCK_W x BLOCK_W) and, with a head, the head-weight block of the sub-layer (BLOCK_W x BLOCK_O). Both
# must fit SMEM_BUDGET_BYTES (160 KB) together, at the storage dtype's element size. Its accumulators (the
# backward chain's, the larger kernel: 4 width tiles + the head row per row) must fit the register budget of
# 8 warps at the smallest row tile (16 rows): 16 * (4 * BLOCK_W + BLOCK_O) <= 128 * 32 * 8 = 32768 values.
# What that selects (padded w and out; wide beyond):
#   fp32 / tf32: w <= 128 with out <= 128 (64 KB + 64 KB), w <= 64 with out <= 512, w <= 32 with out <= 1024.
#   16-bit:      w <= 256 with out <= 64 (128 KB + 32 KB), w <= 128 with out <= 512, w <= 64 with out <= 1024.
#   fp64:        w <= 128 with out <= 32, w <= 64 with out <= 256, w <= 32 with out <= 512.
#   Any dtype:   out > 1024 is wide (registers: 16 rows x a 2048-wide head row alone is 32768 values).
# The benchmark configurations resnet-head and vit-custom (w = 20), regression (50) and vgg-head (128) stay on the
# fast path; wide-resnet-* (w = 512) take the wide path. Compiled for sm_90a (Triton 3.8, no GPU needed to
# compile), the fast path's shared memory matches the model (fp32 w = 128, out = 10: 72 KB for the tiles) while a
# forced fast path at fp32 w = 256 asks for 272 KB, more than any GPU has. Not timed on a GPU (none available):
# the threshold is where the model says the whole tiles stop fitting, not a measured crossover.
FAST_PATH_MAX_WARPS = 8
# On top of its whole tiles the fast path needs pipeline buffers and layout-conversion scratch: compiled for sm_90a
# with Triton 3.8, the chain kernel at the model's boundary (w = 256 16-bit, out = 64: 163,840 B of whole tiles)
# asked for 174,080 B, over an A100's 166,912 B opt-in limit. A plan is kept on the fast path only where the
# tiles plus this margin fit the device's limit (:func:`shared_memory_limit`).
FAST_PATH_SMEM_MARGIN = 16 * 1024

# Opt-in shared memory per block by compute capability major version, where the device properties do not say:
# sm_80 (A100) 166,912 B, sm_90 (H100 / H200) 232,448 B; other majors (sm_86 / sm_89: 101,376 B) the smallest.
_SMEM_OPTIN_BY_MAJOR = {8: 166_912, 9: 232_448}
_SMEM_OPTIN_FALLBACK = 101_376


@functools.cache
def shared_memory_limit(device: torch.device | None) -> int | None:
    """The opt-in shared memory per block of a CUDA ``device`` in bytes (cached per device); None for CPU tensors
    under the interpreter, where the model's budget alone applies (as on the H100 / H200 it was written for)."""
    if device is None or device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    if props.major == 8 and props.minor != 0:
        return _SMEM_OPTIN_FALLBACK
    return _SMEM_OPTIN_BY_MAJOR.get(props.major, _SMEM_OPTIN_FALLBACK)


def smem_budget(device: torch.device | None) -> int:
    """Shared memory a plan may stage: the model's budget, within the device's limit less the fast path margin."""
    limit = shared_memory_limit(device)
    return SMEM_BUDGET_BYTES if limit is None else min(SMEM_BUDGET_BYTES, limit - FAST_PATH_SMEM_MARGIN)


def fast_path_fits(width: int, out: int, dtype: torch.dtype, device: torch.device | None = None) -> bool:
    """True when the fast path's whole weight tiles fit shared memory (of ``device``, when given) and its
    accumulators fit registers."""
    bw = width_tile(width)
    bo = out_tile(out) if out else 0
    smem = (bw * bw + bw * bo) * _element_size(dtype)
    live = MIN_DOT * (4 * bw + max(bo, MIN_DOT))
    return smem <= smem_budget(device) and live <= ACC_VALUES_PER_THREAD * THREADS_PER_WARP * FAST_PATH_MAX_WARPS


# Wide-path tiles on a GPU (model, not timed):
# - BLOCK_N = 64 columns of the width per z / dZ tile: the backward keeps 3 such tiles per row (dH, act', Z);
#   a 64-wide tile is 256 bytes of fp32 per row, two full cache lines per load and store of H / dZ.
# - BLOCK_K = one 128-byte line per row and K-step (32 fp32, 64 16-bit, 16 fp64), as the input projection's
#   K-step: every load of H / dZ / a weight row segment is whole cache lines. Staged per pipeline stage:
#   (BLOCK_B x BLOCK_K + BLOCK_K x BLOCK_N) operands = 12 KB at the forward's 32 rows in fp32.
# - BLOCK_O = 64 outputs per head tile (the y accumulator is the size of a z tile), also the K-step over OUT of
#   the backward's G @ Wo.
# The row tile and warps of the wide path come from ptxas reports (WIDE_ROW_TILE below), not from this model.
# Under the interpreter the tiles are as large as the problem (up to 256 columns / 1024 outputs): fewer loop
# trips, and tile sizes change speed only there, never results.
WIDE_BLOCK_N = 64
WIDE_BLOCK_O = 64
INTERPRETER_WIDE_BLOCK = 256
INTERPRETER_WIDE_BLOCK_O = 1024


@dataclasses.dataclass(frozen=True)
class PathPlan:
    """The path of the row-tiled kernels (forward, backward chain) and its tiles: the ``WIDE`` flag and block
    sizes passed as constexprs.

    Fast path (``wide=False``): ``block_w >= w`` and ``block_o >= out`` (whole widths per tile);
    ``block_n = block_k = block_w`` (the backward's dx K-loop then has one step).
    Wide path (``wide=True``): ``block_n`` columns of the width per tile, ``block_k`` K-step over the width and
    over the L*w columns of H, ``block_o`` outputs per head tile (and the K-step over out in the backward);
    ``block_w`` is unused (MIN_DOT).
    """

    wide: bool
    block_w: int
    block_o: int
    block_n: int
    block_k: int

    def meta(self) -> dict:
        return dict(WIDE=self.wide, BLOCK_W=self.block_w, BLOCK_O=self.block_o, BLOCK_N=self.block_n,
                    BLOCK_K=self.block_k)


def path_plan(width: int, out: int, dtype: torch.dtype, device: torch.device | None = None) -> PathPlan:
    """The one place that picks fast vs wide (:func:`fast_path_fits`) and the tiles of either path, within the
    shared memory of ``device`` (computed once per layer shape, dtype, device and interpreter mode, then cached).

    The same model decides under the interpreter, so CPU tests run the path an H100 / H200 would. Tests force the
    wide path with small tiles by monkeypatching this function.
    """
    return _path_plan(width, out, dtype, device, interpreted())


@functools.lru_cache(maxsize=1024)
def _path_plan(width: int, out: int, dtype: torch.dtype, device, interpreter: bool) -> PathPlan:
    if fast_path_fits(width, out, dtype, device):
        bw = width_tile(width)
        return PathPlan(False, bw, out_tile(out), bw, bw)
    if interpreter:
        block = min(INTERPRETER_WIDE_BLOCK, width_tile(width))
        return PathPlan(True, MIN_DOT, min(INTERPRETER_WIDE_BLOCK_O, out_tile(out)), block, block)
    return PathPlan(True, MIN_DOT, WIDE_BLOCK_O, WIDE_BLOCK_N, k_step(width, dtype))


def live_per_row(path: PathPlan, kernel: str) -> int:
    """Accumulator values per row of a program (the register model), for ``kernel`` "forward" or "chain".

    Fast forward: h and z (2 width tiles) + y; fast chain: carry, dH, h and dZ (4 width tiles) + G.
    Wide forward: one z tile or one y tile; wide chain: dH, act' and Z (3 column tiles).
    """
    if path.wide:
        return max(path.block_n, path.block_o) if kernel == "forward" else 3 * path.block_n
    return (2 if kernel == "forward" else 4) * path.block_w + path.block_o


def _staged_bytes(path: PathPlan, block_b: int, block_c: int, stages: int, elem: int) -> int:
    """Shared memory of a program: pipelined K-loop operands, plus the fast path's whole recurrent tile."""
    if path.wide:
        per_stage = max(block_b * block_c + block_c * path.block_n,
                        block_b * path.block_k + path.block_k * max(path.block_n, path.block_o))
        return stages * per_stage * elem
    return stages * (block_b * block_c + block_c * path.block_w) * elem + path.block_w * path.block_w * elem


def _row_tile(rows: int, live_per_row: int, num_warps: int) -> int:
    """Largest power-of-two row tile whose live accumulators fit the register budget of ``num_warps``."""
    budget = ACC_VALUES_PER_THREAD * THREADS_PER_WARP * num_warps
    tile = MIN_DOT
    while tile * 2 <= MAX_ROW_TILE and tile * 2 * live_per_row <= budget:
        tile *= 2
    return min(tile, max(MIN_DOT, _pow2(rows)))


def _warps_for(live_values: int) -> int:
    """4 warps while a program's accumulators fit 4 warps' budget, else 8 (the next register file share)."""
    return 4 if live_values <= ACC_VALUES_PER_THREAD * THREADS_PER_WARP * 4 else 8


@dataclasses.dataclass(frozen=True)
class ChainSettings:
    """Launch settings of the row-tiled kernels (forward, backward chain) that autotuning would choose."""

    block_b: int
    block_c: int  # K-step over chunk columns (forward, Z recompute) / column tile of dx (backward)
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_B=self.block_b, BLOCK_C=self.block_c, num_warps=self.num_warps, num_stages=self.num_stages)


# Wide path, no autotuning: row tile and warps from ptxas resource reports, not from the register model (which
# undercounts there: the wide K-loops keep 64-bit pointer tiles of both operands live). The kernels were compiled
# with Triton 3.8 on this machine (compiling needs no GPU; ptxas -v on the generated PTX), BLOCK_N = BLOCK_O = 64,
# BLOCK_K one line, gelu with a head (Z recompute: the largest chain kernel): forward at 32 rows x 8 warps and
# chain at 16 rows x 8 warps spill nothing in fp16 / bf16 and at most 8 bytes (sm_90a) / 24 bytes (sm_80) in
# fp32 (ieee) and fp64, using 10-40 KB of shared memory; 64 rows x 4 warps spilled 0.5-3 KB on sm_90a.
WIDE_ROW_TILE = {"forward": 32, "chain": 16}
WIDE_WARPS = 8


@functools.lru_cache(maxsize=4096)
def _chain_settings(rows: int, chunk: int, path: PathPlan, dtype: torch.dtype, kernel: str,
                    interpreter: bool) -> ChainSettings:
    """Cached per problem (computed once per batch size, chunk, path and dtype)."""
    bc = k_step(chunk, dtype)
    if interpreter:
        return ChainSettings(min(INTERPRETER_ROW_TILE, max(MIN_DOT, _pow2(rows))), max(bc, min(64, _pow2(chunk))),
                             4, 1)
    # 2 stages: double-buffer the operand tiles of the K loops; a third stage buys nothing when the input
    # projection's loop has only c / BLOCK_C <= 8 trips (every configuration of bench/configs.py).
    if path.wide:
        return ChainSettings(min(WIDE_ROW_TILE[kernel], max(MIN_DOT, _pow2(rows))), bc, WIDE_WARPS, 2)
    live = live_per_row(path, kernel)
    warps = _warps_for(MIN_DOT * live)
    bb = _row_tile(rows, live, warps)
    return ChainSettings(bb, bc, warps, 2)


def forward_settings(rows: int, chunk: int, path: PathPlan, dtype: torch.dtype) -> ChainSettings:
    """Forward: row tile from the forward's accumulators per row (:func:`live_per_row`)."""
    return _chain_settings(rows, chunk, path, dtype, "forward", interpreted())


def chain_settings(rows: int, chunk: int, path: PathPlan, dtype: torch.dtype) -> ChainSettings:
    """Backward chain: row tile from the chain kernel's accumulators per row (:func:`live_per_row`)."""
    return _chain_settings(rows, chunk, path, dtype, "chain", interpreted())


@dataclasses.dataclass(frozen=True)
class WeightSettings:
    """Settings of the weight-gradient kernel: output tiles (BLOCK_M x BLOCK_N over the width, BLOCK_O x BLOCK_N
    over the head), row step BLOCK_R."""

    block_m: int
    block_n: int
    block_o: int
    block_r: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_O=self.block_o, BLOCK_R=self.block_r,
                    num_warps=self.num_warps, num_stages=self.num_stages)


# Interpreter: the cost is per program and per executed operation (each call of a @triton.jit helper re-patches
# triton.language, ~1-3 ms), so the weight-gradient tiles grow with the problem up to these caps (speed only).
INTERPRETER_WEIGHT_TILE = 256
INTERPRETER_HEAD_TILE = 1024


def weight_settings(rows: int, chunk: int, width: int, out: int, dtype: torch.dtype) -> WeightSettings:
    """Each program reduces one output tile over all rows, in order (deterministic, no atomics).

    Output tile 64 x 64 (the head's too): 4096 fp32 accumulators = 32 per thread at 4 warps, small enough to leave
    registers for the two operand tiles; row step 32 (fp32) / 64 (16-bit) = 128 bytes per column.
    """
    return _weight_settings(rows, chunk, width, out, dtype, interpreted())


@functools.lru_cache(maxsize=4096)
def _weight_settings(rows: int, chunk: int, width: int, out: int, dtype: torch.dtype,
                     interpreter: bool) -> WeightSettings:
    if interpreter:
        return WeightSettings(min(INTERPRETER_WEIGHT_TILE, max(MIN_DOT, _pow2(width))),
                              min(INTERPRETER_WEIGHT_TILE, max(MIN_DOT, _pow2(max(chunk, width)))),
                              min(INTERPRETER_HEAD_TILE, max(MIN_DOT, _pow2(out))),
                              min(INTERPRETER_ROW_TILE, max(MIN_DOT, _pow2(rows))), 4, 1)
    return WeightSettings(64, 64, 64, k_step(rows, dtype), 4, 2)


# ------------------------------------------------------------------------------------------ autotune (GPU)


def _chain_configs():
    """Row tile x warps x stages; pruned per problem by the kernel's prune function. The path (``WIDE``) and its
    tiles (``BLOCK_W``, ``BLOCK_O``, ``BLOCK_N``, ``BLOCK_K``) are not tuned: :func:`path_plan` fixes them."""
    return [
        triton.Config({"BLOCK_B": bb, "BLOCK_C": bc}, num_warps=nw, num_stages=ns)
        for bb in (16, 32, 64, 128)
        for bc in (32, 64)
        for nw in (4, 8)
        for ns in (2, 3)
    ]


def _path_of(named_args: dict, kwargs: dict) -> PathPlan:
    """The launcher's :class:`PathPlan`, rebuilt from the constexpr arguments the kernel was called with."""

    def arg(name):
        return kwargs[name] if name in kwargs else named_args[name]

    return PathPlan(bool(arg("WIDE")), arg("BLOCK_W"), arg("BLOCK_O"), arg("BLOCK_N"), arg("BLOCK_K"))


def _make_prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        """Keep configs whose accumulators fit the register budget (x1.5 slack: the model is rough) and whose
        staged operand tiles fit shared memory, on the path the launcher chose; never more rows than the batch;
        always keep one."""
        rows = named_args["B"]
        path = _path_of(named_args, kwargs)
        per_row = live_per_row(path, kernel)
        elem = named_args["x_ptr"].element_size()
        budget = smem_budget(named_args["x_ptr"].device)
        kept = []
        for cfg in configs:
            bb, bc = cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_C"]
            regs_ok = bb * per_row <= 1.5 * ACC_VALUES_PER_THREAD * THREADS_PER_WARP * cfg.num_warps
            smem_ok = _staged_bytes(path, bb, bc, cfg.num_stages, elem) <= budget
            rows_ok = bb <= max(MIN_DOT, _pow2(rows))
            if regs_ok and smem_ok and rows_ok:
                kept.append(cfg)
        if not kept:
            kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"], c.num_stages))]
        return kept

    return prune


def forward_autotune_configs():
    """Candidates for the forward kernel: BLOCK_B in 16..128 (rows per program: more rows reuse each weight tile
    more, at the cost of registers), BLOCK_C 32/64 (one or two cache lines per row and K-step), 4/8 warps, 2/3
    stages. The prune keeps what the register / shared-memory model allows."""
    return _chain_configs()


def chain_autotune_configs():
    """Candidates for the backward chain kernel, same space, pruned with the chain kernel's accumulators."""
    return _chain_configs()


forward_prune = _make_prune("forward")
chain_prune = _make_prune("chain")
# WIDE is part of the key: a forced or changed path never reuses the other path's tuning. B_BUCKET (not B):
# batch sizes 65..128 share one tuning, and so on.
AUTOTUNE_KEY = ["B_BUCKET", "C", "W", "L", "OUT", "WIDE"]


def batch_bucket(rows: int) -> int:
    """The autotuning bucket of a batch size: its next power of two (at least 1)."""
    return _pow2(rows)
