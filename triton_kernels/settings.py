"""Launch settings of the Triton kernels.

:func:`launch_settings` is the one entry point: given the kernel (``"forward"``, ``"chain"`` or ``"weights"``), the
problem (:class:`Dims`), the storage dtype and the device, it returns the whole launch (:class:`Launch`): the grid,
the path of the row-tiled kernels (fast or wide, :func:`path_plan`) with its tiles, the row and K-step tiles, warps
and stages (or, when autotuning, what the autotuner leaves open), the dtype constexprs (:func:`dtype_plan`) and the
runtime arguments the settings own (the autotuning key's batch bucket; the weight kernel's task counts). The
launchers in ``triton_kernels/forward.py`` and ``triton_kernels/backward.py`` add only the call's tensors, sizes
and flags.

Two paths of the row-tiled kernels (forward, backward chain): the fast path keeps a whole sub-layer width and the
whole head row as single tiles (h in registers, the whole recurrent and head weight tiles staged at once); the wide
path tiles the width (BLOCK_N columns, K-steps of BLOCK_K) and the head (BLOCK_O outputs), reading h / dZ back from
global memory, and so has no limit on layer_width or out_features. The fast path is used while its whole tiles fit
the shared-memory and register model (:func:`fast_path_fits`). The weights kernel has no path: it tiles every
extent.

This module also enforces the kernels' remaining limit (32-bit weight offsets, :func:`check_index_limits`) and holds
the launch environment (:func:`interpreted`, :func:`launch_guard`, :func:`launcher`).

Nothing here was timed on a GPU (none is available to this project). Every constant below comes from a simple
model of an NVIDIA H100 / A100 SM or from ptxas resource reports of the compiled kernels, stated next to it. Under
``TRITON_INTERPRET=1`` the kernels run as numpy on whole tiles and the cost is per executed operation, so the
interpreter settings simply take larger tiles (fewer programs and loop trips); their values change speed only,
never results.

On a GPU the forward and backward chain kernels are wrapped in ``triton.autotune`` (:func:`autotuner`) over the
row tile, K-step, warps and stages (:func:`autotune_configs`), pruned by the register and shared-memory model on
the path :func:`path_plan` chose (:func:`autotune_prune`; the path and its BLOCK_W / BLOCK_O / BLOCK_N / BLOCK_K are
fixed here, not tuned); ``SPINAL_OPS_TRITON_AUTOTUNE=0`` uses the model's single choice instead. The tuning key
buckets the batch size (its next power of two, :func:`batch_bucket`) and includes the path: a new batch size
re-tunes only when it starts a new bucket. First-call cost on a GPU: every kernel and bucket compiles and times its
pruned candidates once (up to 32 configurations, seconds per kernel); later calls with the same shapes and bucket
reuse the winner. ``SPINAL_OPS_TRITON_AUTOTUNE=0`` skips tuning (one compile per kernel, the model's settings), for
reproducible tiles across processes and for CUDA graph capture without a warm-up call.

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
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from spinal_ops.gpu_model import Problem

KERNELS = ("forward", "chain", "weights")


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"3.9.0+git1234"``."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# --------------------------------------------------------------------------------------------- environment


def interpreted() -> bool:
    """Kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """``triton.autotune`` on GPUs, unless ``SPINAL_OPS_TRITON_AUTOTUNE=0``; never under the interpreter."""
    return not interpreted() and os.environ.get("SPINAL_OPS_TRITON_AUTOTUNE", "1") != "0"


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


@functools.lru_cache(maxsize=256)
def cached_layer_table(starts: tuple, slots: tuple, device: torch.device) -> torch.Tensor:
    """The kernels' ``(2L,)`` int32 table (starts, then slots) on ``device``: copied once per distinct table and
    device (a blocking copy from host memory, complete before any stream reads it), then reused, so a call makes
    no host-to-device copy and no synchronisation (warm up once before capturing a CUDA graph)."""
    return torch.tensor([*starts, *slots], dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------------- dtypes


@dataclasses.dataclass(frozen=True)
class DtypePlan:
    """How a storage dtype is computed: operand dtype of ``tl.dot``, accumulator dtype, fp32 dot precision."""

    dot: tl.dtype
    acc: tl.dtype
    precision: str  # "ieee" or "tf32"; "fma": no tl.dot (float64 before Triton 3.5)

    def meta(self) -> dict:
        return dict(DOT_DTYPE=self.dot, ACC_DTYPE=self.acc, PRECISION=self.precision)


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


# ------------------------------------------------------------------------------------------------ cost model

# Registers: 65536 32-bit registers per SM, at most 255 per thread. The budget is 128 fp32 *accumulator* values per
# thread (half the per-thread maximum; the other half holds dot operands, pointers and masks), i.e.
# ACC_VALUES_PER_THREAD * THREADS_PER_WARP * num_warps live accumulator values per program.
ACC_VALUES_PER_THREAD = 128
THREADS_PER_WARP = 32
# Shared memory: 227 KB usable per block on H100 (164 KB on A100). A tl.dot operand tile is staged there, once per
# pipeline stage; the staged bytes stay under 160 KB so that both architectures fit.
SMEM_BUDGET_BYTES = 160 * 1024
# Memory transactions: a row segment of 128 bytes is one full cache line; K-steps of 128 bytes per row (32 fp32 /
# 64 16-bit / 16 fp64 values, :func:`k_step`) keep every load of x, H, dZ or a weight row segment a whole number
# of lines.
LINE_BYTES = 128
# tl.dot needs every tile dimension >= 16.
MIN_DOT = 16
# Beyond 128 rows a program's accumulators exceed the register budget for every w >= 16.
MAX_ROW_TILE = 128
# Warps of the fast path's row-tiled kernels (:func:`_warps_for`): 4 while a program's accumulators at the
# smallest row tile fit 4 warps' share of the register budget, else 8, the next register file share.
MODEL_WARPS = (4, 8)
# Pipeline stages on a GPU without autotuning: 2 double-buffer the operand tiles of the K loops; a third stage buys
# nothing when the input projection's loop is short: c / BLOCK_C trips, 8 in fp32 (4 in 16-bit, 16 in fp64) at
# c = 256 (resnet-head, vgg-head in spinal_ops/configs.py), fewer for vit-custom (c = 128) and regression (c = 4).
# wide-resnet-head and wide-resnet-custom (c = 1024: 32 trips in fp32) get 2 as well; the autotuner's candidates
# include 3 stages.
MODEL_STAGES = 2

# The fast path's fit model (:func:`fast_path_fits`). It stages two whole weight tiles as tl.dot operands in shared
# memory: the recurrent weight (BLOCK_W x BLOCK_W) and, with a head, the head-weight block of the sub-layer
# (BLOCK_W x BLOCK_O). Both must fit SMEM_BUDGET_BYTES (160 KB) together, at the storage dtype's element size. Its
# accumulators (the backward chain's, the larger kernel: 4 width tiles + the head row per row) must fit the
# register budget of FAST_PATH_MAX_WARPS = 8 warps at the smallest row tile (16 rows):
# 16 * (4 * BLOCK_W + BLOCK_O) <= 128 * 32 * 8 = 32768 values.
# What that selects (padded w and out; wide beyond):
#   fp32 / tf32: w <= 128 with out <= 128 (64 KB + 64 KB), w <= 64 with out <= 512, w <= 32 with out <= 1024.
#   16-bit:      w <= 256 with out <= 64 (128 KB + 32 KB), w <= 128 with out <= 512, w <= 64 with out <= 1024.
#   fp64:        w <= 128 with out <= 32, w <= 64 with out <= 256, w <= 32 with out <= 512.
#   Any dtype:   out > 1024 is wide (registers: 16 rows x a 2048-wide head row alone is 32768 values).
# The benchmark configurations (spinal_ops/configs.py) resnet-head and vit-custom (w = 20), regression (50) and
# vgg-head (128) stay on the fast path; wide-resnet-* (w = 512) take the wide path. Compiled for sm_90a (Triton
# 3.8, no GPU needed to compile), the fast path's shared memory matches the model (fp32 w = 128, out = 10: 72 KB
# for the tiles) while a forced fast path at fp32 w = 256 asks for 272 KB, more than any GPU has. Not timed on a
# GPU: the threshold is where the model says the whole tiles stop fitting, not a measured crossover.
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

# Wide-path tiles on a GPU (model, not timed):
# - BLOCK_N = 64 columns of the width per z / dZ tile: the backward keeps 3 such tiles per row (dH, act', Z);
#   a 64-wide tile is 256 bytes of fp32 per row, two full cache lines per load and store of H / dZ.
# - BLOCK_K = one 128-byte line per row and K-step (LINE_BYTES: 32 fp32, 64 16-bit, 16 fp64), as the input
#   projection's K-step. Staged per pipeline stage: (BLOCK_B x BLOCK_K + BLOCK_K x BLOCK_N) operands = 12 KB at the
#   forward's 32 rows in fp32.
# - BLOCK_O = 64 outputs per head tile (the y accumulator is the size of a z tile), also the K-step over OUT of
#   the backward's G @ Wo.
WIDE_BLOCK_N = 64
WIDE_BLOCK_O = 64
# Wide-path row tile and warps, without autotuning: from ptxas resource reports, not from the register model (which
# undercounts there: the wide K-loops keep 64-bit pointer tiles of both operands live). The kernels were compiled
# with Triton 3.8 (compiling needs no GPU; ptxas -v on the generated PTX), BLOCK_N = BLOCK_O = 64, BLOCK_K one
# line, gelu with a head (Z recompute: the largest chain kernel): forward at 32 rows x 8 warps and chain at 16 rows
# x 8 warps spill nothing in fp16 / bf16 and at most 8 bytes (sm_90a) / 24 bytes (sm_80) in fp32 (ieee) and fp64,
# using 10-40 KB of shared memory; 64 rows x 4 warps spilled 0.5-3 KB on sm_90a.
WIDE_ROW_TILE = {"forward": 32, "chain": 16}
WIDE_WARPS = 8

# Weight-gradient kernel on a GPU (model, not timed): each program reduces one output tile over all rows, in order
# (deterministic, no atomics). Output tile 64 x 64 (the head's too): 4096 fp32 accumulators = 32 per thread at
# 4 warps, small enough to leave registers for the two operand tiles; row step BLOCK_R one line per column
# (:func:`k_step` of the batch: 32 fp32 / 64 16-bit rows = 128 bytes), double-buffered (MODEL_STAGES).
WEIGHT_TILE = 64
WEIGHT_WARPS = 4

# Interpreter (speed only): the cost is per program and per executed operation (each call of a @triton.jit helper
# re-patches triton.language, ~1-3 ms), so tiles grow with the problem up to these caps: few programs, few loop
# trips. Warps and stages mean nothing there (4 and 1).
INTERPRETER_ROW_TILE = 64  # rows per program of every kernel (BLOCK_B; BLOCK_R of the weights kernel)
INTERPRETER_CHUNK_TILE = 64  # K-step over chunk columns (BLOCK_C), at least the GPU's k_step
INTERPRETER_WIDE_BLOCK = 256  # wide path BLOCK_N = BLOCK_K
INTERPRETER_WIDE_BLOCK_O = 1024  # wide path BLOCK_O
INTERPRETER_WEIGHT_TILE = 256  # weights kernel BLOCK_M, BLOCK_N
INTERPRETER_HEAD_TILE = 1024  # weights kernel BLOCK_O
INTERPRETER_WARPS = 4
INTERPRETER_STAGES = 1


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def width_tile(width: int) -> int:
    """Fast path BLOCK_W: the whole sub-layer width (h lives in registers as one tile), a power of two >= 16."""
    return max(MIN_DOT, _pow2(width))


def out_tile(out: int) -> int:
    """Fast path BLOCK_O: the whole head width (the head accumulator y stays in registers), padded likewise."""
    return max(MIN_DOT, _pow2(out))


def k_step(extent: int, dtype: torch.dtype) -> int:
    """K-step over chunk columns / input columns / rows: one LINE_BYTES line per row, at most the padded extent."""
    per_line = LINE_BYTES // max(_element_size(dtype), 2)
    return max(MIN_DOT, min(per_line, _pow2(extent)))


def _row_cap(rows: int, cap: int) -> int:
    """A row tile of at most ``cap`` rows and no more than the batch needs (at least MIN_DOT)."""
    return min(cap, max(MIN_DOT, _pow2(rows)))


# ------------------------------------------------------------------------------------------ paths and tiles


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
    accumulators fit registers (the fit model above FAST_PATH_MAX_WARPS)."""
    bw = width_tile(width)
    bo = out_tile(out) if out else 0
    smem = (bw * bw + bw * bo) * _element_size(dtype)
    live = MIN_DOT * (4 * bw + max(bo, MIN_DOT))
    return smem <= smem_budget(device) and live <= ACC_VALUES_PER_THREAD * THREADS_PER_WARP * FAST_PATH_MAX_WARPS


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
    """Fast vs wide (:func:`fast_path_fits`) and the tiles of either path, within the shared memory of ``device``
    (computed once per layer shape, dtype, device and interpreter mode, then cached); :func:`launch_settings`
    takes the path from here.

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
    return _row_cap(rows, tile)


def _warps_for(live_values: int) -> int:
    """MODEL_WARPS: the fewer warps while a program's accumulators fit their register budget, else the more."""
    few, many = MODEL_WARPS
    return few if live_values <= ACC_VALUES_PER_THREAD * THREADS_PER_WARP * few else many


# ----------------------------------------------------------------------------------------------- launches


@dataclasses.dataclass(frozen=True)
class Dims(Problem):
    """The problem of one call (:class:`spinal_ops.gpu_model.Problem`: ``x (rows, in_features)``, ``weight_x (lx,
    width, chunk)``, ``weight_h (lh, width, width)``, ``num_layers`` sub-layers, ``out`` head outputs, 0 without a
    head) and, for the weights kernel, the backward's output mask (which of dx, dweight_x, dweight_h, dbias,
    dhead_weight, dhead_bias are computed)."""

    mask: tuple[bool, ...] = (False,) * 6

    def check(self) -> None:
        """:func:`check_index_limits` of these sizes."""
        check_index_limits(self.rows, self.in_features, self.chunk, self.width, self.num_layers, self.out, self.lx,
                           self.lh)


@dataclasses.dataclass(frozen=True, eq=False)
class Launch:
    """One kernel launch as :func:`launch_settings` chose it; the launcher runs
    ``launcher(kernel)[grid](*call_args, *args, **call_flags, **meta)``.

    ``grid``: the grid, a tuple, or (autotuned) a function of the autotuner's chosen meta-parameters.
    ``args``: the runtime arguments the settings own, after the call's own: ``(B_BUCKET,)`` for the row-tiled
    kernels (the autotuning key, :func:`batch_bucket`), the task counts for the weights kernel
    (:func:`weight_tasks`). ``meta``: constexprs (dtypes, the path and its tiles, row and K tiles) and ``num_warps``
    / ``num_stages``; autotuned, the row tile, K-step, warps and stages are left to the autotuner. ``path``: the
    row-tiled kernels' :class:`PathPlan` (None for the weights kernel). ``autotune``: launch the kernel's
    ``triton.autotune`` wrapper (:func:`autotuner`) instead of the kernel.
    """

    grid: tuple[int] | Callable[[dict], tuple[int]]
    args: tuple[int, ...]
    meta: dict
    path: PathPlan | None
    autotune: bool


LAUNCH_TARGETS = ("interpreter", "gpu")


def launch_settings(kernel: str, dims: Dims, dtype: torch.dtype, device: torch.device | None,
                    target: str | None = None) -> Launch:
    """The launch of ``kernel`` ("forward", "chain" or "weights") for the problem ``dims`` in storage dtype
    ``dtype`` on ``device``: the one place that chooses grid, path, tiles, warps and stages.

    The row-tiled kernels (forward, backward chain) take the path of :func:`path_plan` (looked up on every call, so
    a monkeypatched plan applies) and, unless autotuned, the row tile and warps of the register model (fast path)
    or of the ptxas reports (wide path). The weights kernel takes WEIGHT_TILE output tiles and its task counts
    (:func:`weight_tasks`, from ``dims.mask``); it does not depend on ``device``.

    ``target``: None for the launch this process makes (interpreter or GPU, autotuned or not); ``"gpu"`` for the
    launch a GPU makes without autotuning, and ``"interpreter"`` for the interpreter's, whatever this process is
    (the GPU cost model, :mod:`spinal_ops.gpu_model`, describes GPU launches from here on any machine).
    """
    if kernel not in KERNELS:
        raise ValueError(f"spinal_ops triton backend: unknown kernel {kernel!r}; one of {KERNELS}")
    if target is not None and target not in LAUNCH_TARGETS:
        raise ValueError(f"spinal_ops triton backend: target must be None or one of {LAUNCH_TARGETS}, got {target!r}")
    types = dtype_plan(dtype).meta()
    interpreter = interpreted() if target is None else target == "interpreter"
    if kernel == "weights":
        tiles = _weight_tiles(dims.rows, dims.chunk, dims.width, dims.out, dtype, interpreter)
        tasks = weight_tasks(dims, tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_O"])
        return Launch((tasks.programs,), tasks.args(), {**types, **tiles}, None, False)
    if target is None:
        path = path_plan(dims.width, dims.out, dtype, device)
    else:
        path = _path_plan(dims.width, dims.out, dtype, device, interpreter)
    rows = dims.rows
    args = (batch_bucket(rows),)
    if target is None and autotune_enabled():
        return Launch(lambda meta: (triton.cdiv(rows, meta["BLOCK_B"]),), args, {**types, **path.meta()}, path, True)
    tiles = _row_tiles(kernel, rows, dims.chunk, path, dtype, interpreter)
    return Launch((triton.cdiv(rows, tiles["BLOCK_B"]),), args, {**types, **path.meta(), **tiles}, path, False)


@functools.lru_cache(maxsize=4096)
def _row_tiles(kernel: str, rows: int, chunk: int, path: PathPlan, dtype: torch.dtype, interpreter: bool) -> dict:
    """BLOCK_B, BLOCK_C, warps and stages of a row-tiled kernel without autotuning (cached per problem; read-only)."""
    bc = k_step(chunk, dtype)
    if interpreter:
        block_c = max(bc, min(INTERPRETER_CHUNK_TILE, _pow2(chunk)))
        return dict(BLOCK_B=_row_cap(rows, INTERPRETER_ROW_TILE), BLOCK_C=block_c, num_warps=INTERPRETER_WARPS,
                    num_stages=INTERPRETER_STAGES)
    if path.wide:
        return dict(BLOCK_B=_row_cap(rows, WIDE_ROW_TILE[kernel]), BLOCK_C=bc, num_warps=WIDE_WARPS,
                    num_stages=MODEL_STAGES)
    live = live_per_row(path, kernel)
    warps = _warps_for(MIN_DOT * live)
    return dict(BLOCK_B=_row_tile(rows, live, warps), BLOCK_C=bc, num_warps=warps, num_stages=MODEL_STAGES)


@functools.lru_cache(maxsize=4096)
def _weight_tiles(rows: int, chunk: int, width: int, out: int, dtype: torch.dtype, interpreter: bool) -> dict:
    """Output tiles (BLOCK_M x BLOCK_N over the width, BLOCK_O x BLOCK_N over the head), row step BLOCK_R, warps
    and stages of the weights kernel (cached per problem; read-only)."""
    if interpreter:
        return dict(BLOCK_M=min(INTERPRETER_WEIGHT_TILE, max(MIN_DOT, _pow2(width))),
                    BLOCK_N=min(INTERPRETER_WEIGHT_TILE, max(MIN_DOT, _pow2(max(chunk, width)))),
                    BLOCK_O=min(INTERPRETER_HEAD_TILE, max(MIN_DOT, _pow2(out))),
                    BLOCK_R=_row_cap(rows, INTERPRETER_ROW_TILE), num_warps=INTERPRETER_WARPS,
                    num_stages=INTERPRETER_STAGES)
    return dict(BLOCK_M=WEIGHT_TILE, BLOCK_N=WEIGHT_TILE, BLOCK_O=WEIGHT_TILE, BLOCK_R=k_step(rows, dtype),
                num_warps=WEIGHT_WARPS, num_stages=MODEL_STAGES)


@dataclasses.dataclass(frozen=True)
class WeightTasks:
    """The weights kernel's 1-D grid, split into three task ranges (one program per output tile), in this order:
    A, ``dweight_x`` and ``dbias`` (``tasks_a = lx * tiles_m * tiles_n_a`` programs); B, ``dweight_h``
    (``tasks_b = lh * tiles_m * tiles_n_b``); C, ``dhead_weight`` and ``dhead_bias`` (``tasks_c``: tiles of
    BLOCK_O outputs times ``tiles_n_c``). ``tiles_m``: tiles of BLOCK_M over the width; ``tiles_n_*``: tiles of
    BLOCK_N per tile row of each range (1 where only the bias gradient of the range is computed)."""

    tiles_m: int
    tiles_n_a: int
    tasks_a: int
    tiles_n_b: int
    tasks_b: int
    tiles_n_c: int
    tasks_c: int

    @property
    def programs(self) -> int:
        return self.tasks_a + self.tasks_b + self.tasks_c

    def args(self) -> tuple[int, ...]:
        """The kernel's runtime arguments TILES_M, TILES_N_A, TASKS_A, TILES_N_B, TASKS_B, TILES_N_C (range C is the
        rest of the grid)."""
        return self.tiles_m, self.tiles_n_a, self.tasks_a, self.tiles_n_b, self.tasks_b, self.tiles_n_c


def weight_tasks(dims: Dims, block_m: int, block_n: int, block_o: int) -> WeightTasks:
    """The task counts of the weights kernel for ``dims.mask`` (computed here only; the kernel reads them)."""
    _, need_wx, need_wh, need_b, need_wo, need_bo = (bool(m) for m in dims.mask)
    tiles_m = triton.cdiv(dims.width, block_m)
    tiles_n_a = triton.cdiv(dims.chunk, block_n) if need_wx else 1
    tiles_n_b = triton.cdiv(dims.width, block_n)
    tiles_n_c = triton.cdiv(dims.num_layers * dims.width, block_n) if need_wo else 1
    tasks_a = dims.lx * tiles_m * tiles_n_a if (need_wx or need_b) else 0
    tasks_b = dims.lh * tiles_m * tiles_n_b if need_wh else 0
    tasks_c = triton.cdiv(dims.out, block_o) * tiles_n_c if (need_wo or need_bo) else 0
    return WeightTasks(tiles_m, tiles_n_a, tasks_a, tiles_n_b, tasks_b, tiles_n_c, tasks_c)


# ------------------------------------------------------------------------------------------ autotune (GPU)

# WIDE is part of the key: a forced or changed path never reuses the other path's tuning. B_BUCKET (not B):
# batch sizes 65..128 share one tuning, and so on.
AUTOTUNE_KEY = ["B_BUCKET", "C", "W", "L", "OUT", "WIDE"]


def batch_bucket(rows: int) -> int:
    """The autotuning bucket of a batch size: its next power of two (at least 1)."""
    return _pow2(rows)


def autotune_configs() -> list:
    """Candidates of the row-tiled kernels (forward and backward chain share the space): BLOCK_B in 16..128 (rows
    per program: more rows reuse each weight tile more, at the cost of registers), BLOCK_C 32/64 (one or two cache
    lines per row and K-step), 4/8 warps, 2/3 stages. The prune (:func:`autotune_prune`) keeps what the register /
    shared-memory model allows. The path (``WIDE``) and its tiles (``BLOCK_W``, ``BLOCK_O``, ``BLOCK_N``,
    ``BLOCK_K``) are not tuned: :func:`path_plan` fixes them."""
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


def _prune(kernel: str, configs, named_args, **kwargs):
    """Keep configs whose accumulators fit the register budget (x1.5 slack: the model is rough) and whose staged
    operand tiles fit shared memory, on the path the launcher chose; never more rows than the batch; always keep
    one."""
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


def autotune_prune(kernel: str):
    """The ``early_config_prune`` of ``kernel``'s ("forward" or "chain") autotuner: ``prune(configs, named_args,
    **constexprs)``."""
    return functools.partial(_prune, kernel)


def autotuner(kernel: str):
    """The ``triton.autotune`` decorator of a row-tiled ``kernel`` ("forward" or "chain"). Building one needs a GPU
    driver on some Triton releases: the launchers build their wrapper on first use."""
    return triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": autotune_prune(kernel)})
