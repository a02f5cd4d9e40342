"""Launch settings of the Triton kernels: the one place that picks tile sizes, warps and stages.

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
shared-memory model above; ``SPINAL_OPS_TRITON_AUTOTUNE=0`` uses the model's single choice instead. The tuning
key includes the batch size ``B``: one tuning per distinct batch size.

float32 ``tl.dot`` precision follows PyTorch's own switch, ``torch.get_float32_matmul_precision()``:
``"highest"`` (PyTorch's default) -> ``"ieee"`` (exact fp32 products, what the tests use); ``"high"`` or
``"medium"`` -> ``"tf32"`` (10-bit mantissa operands: expect relative errors around 1e-3 of the output scale,
about ``2**-11 * sqrt(c)`` per dot product; the tests do not run tf32, the interpreter ignores it).
"""

from __future__ import annotations

import contextlib
import threading
import dataclasses
import os

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


# Triton's interpreter is process-global (each launch patches triton.language): launches are serialised there.
INTERPRETER_LOCK = threading.Lock()


def launch_guard():
    """Context for a launcher's kernel launches: the interpreter lock under ``TRITON_INTERPRET=1``, else nothing."""
    return INTERPRETER_LOCK if interpreted() else contextlib.nullcontext()


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
    precision: str  # "ieee" or "tf32"


def dtype_plan(dtype: torch.dtype) -> DtypePlan:
    """float64: fp64 throughout. float32: fp32 with ieee/tf32 from ``torch.get_float32_matmul_precision()``.
    float16: fp16 dot operands, fp32 accumulation. bfloat16: bf16 dot operands with fp32 accumulation on a GPU;
    under the interpreter the operands are upcast to fp32 first (its bf16 ``tl.dot`` returns garbage)."""
    if dtype == torch.float64:
        return DtypePlan(tl.float64, tl.float64, "ieee")
    if dtype == torch.float32:
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        return DtypePlan(tl.float32, tl.float32, precision)
    if dtype == torch.float16:
        return DtypePlan(tl.float16, tl.float32, "ieee")
    if dtype == torch.bfloat16:
        return DtypePlan(tl.float32 if interpreted() else tl.bfloat16, tl.float32, "ieee")
    raise TypeError(f"spinal_ops triton backend: unsupported dtype {dtype}; use float16, bfloat16, float32 or float64")


# ------------------------------------------------------------------------------------------------ tile sizes


# Triton caps one tile (block) at 2^20 elements; the kernels hold a (BLOCK_W x BLOCK_W) recurrent-weight tile
# and a (BLOCK_W x BLOCK_O) head-weight tile.
MAX_TILE_ELEMENTS = 1 << 20


def check_tile_limits(width: int, out: int) -> None:
    """Raise a clear error (backend, argument, supported values, fallback) when a layer exceeds the tile cap."""
    bw, bo = width_tile(width), out_tile(out) if out else MIN_DOT
    if bw * bw > MAX_TILE_ELEMENTS:
        raise ValueError(
            f"spinal_ops triton backend: layer_width={width} (tile {bw}) exceeds Triton's 2^20-element tile limit; "
            f"supported: layer_width <= 1024; use the cuda, cpu or reference backend (spinal_ops.use_backend(...))"
        )
    if bw * bo > MAX_TILE_ELEMENTS:
        raise ValueError(
            f"spinal_ops triton backend: layer_width={width} with out_features={out} (tiles {bw} x {bo}) exceeds "
            f"Triton's 2^20-element tile limit; supported: padded(layer_width) * padded(out_features) <= 2^20; use "
            f"the cuda, cpu or reference backend (spinal_ops.use_backend(...))"
        )


def width_tile(width: int) -> int:
    """BLOCK_W: the whole sub-layer width (h lives in registers as one tile), padded to a power of two >= 16."""
    return max(MIN_DOT, _pow2(width))


def out_tile(out: int) -> int:
    """BLOCK_O: the whole head width (the head accumulator y stays in registers), padded likewise."""
    return max(MIN_DOT, _pow2(out))


def k_step(extent: int, dtype: torch.dtype) -> int:
    """K-step over chunk columns / input columns: one 128-byte line per row, at most the padded extent."""
    per_line = LINE_BYTES // max(torch.empty((), dtype=dtype).element_size(), 2)
    return max(MIN_DOT, min(per_line, _pow2(extent)))


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
    """Settings of the row-tiled kernels (forward, backward chain)."""

    block_b: int
    block_c: int  # K-step over chunk columns (forward, Z recompute) / column tile of dx (backward)
    block_w: int
    block_o: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_B=self.block_b, BLOCK_C=self.block_c, num_warps=self.num_warps, num_stages=self.num_stages)


def _chain_settings(rows, chunk, width, out, dtype, live_tiles_w) -> ChainSettings:
    bw, bo = width_tile(width), out_tile(out)
    bc = k_step(chunk, dtype)
    if interpreted():
        return ChainSettings(min(INTERPRETER_ROW_TILE, max(MIN_DOT, _pow2(rows))), max(bc, min(64, _pow2(chunk))),
                             bw, bo, 4, 1)
    live_per_row = live_tiles_w * bw + bo
    warps = _warps_for(MIN_DOT * live_per_row)
    bb = _row_tile(rows, live_per_row, warps)
    # 2 stages: double-buffer the x / weight_x tiles of the K loop; a third stage buys nothing when the loop
    # has only c / BLOCK_C <= 8 trips (every configuration of bench/configs.py), see the autotune configs.
    return ChainSettings(bb, bc, bw, bo, warps, 2)


def forward_settings(rows: int, chunk: int, width: int, out: int, dtype: torch.dtype) -> ChainSettings:
    """Forward: live accumulators per row are h and z (2 * BLOCK_W) plus the head's y (BLOCK_O)."""
    return _chain_settings(rows, chunk, width, out, dtype, 2)


def chain_settings(rows: int, chunk: int, width: int, out: int, dtype: torch.dtype) -> ChainSettings:
    """Backward chain: carry, dH, h and dZ (4 * BLOCK_W) plus the incoming head gradient (BLOCK_O)."""
    return _chain_settings(rows, chunk, width, out, dtype, 4)


@dataclasses.dataclass(frozen=True)
class WeightSettings:
    """Settings of the weight-gradient kernel: output tiles (BLOCK_M x BLOCK_N), row step BLOCK_R."""

    block_m: int
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_R=self.block_r, num_warps=self.num_warps,
                    num_stages=self.num_stages)


def weight_settings(rows: int, chunk: int, width: int, out: int, dtype: torch.dtype) -> WeightSettings:
    """Each program reduces one output tile over all rows, in order (deterministic, no atomics).

    Output tile 64 x 64: 4096 fp32 accumulators = 32 per thread at 4 warps, small enough to leave registers
    for the two operand tiles; row step 32 (fp32) / 64 (16-bit) = 128 bytes per column.
    """
    if interpreted():
        return WeightSettings(min(64, max(MIN_DOT, _pow2(width))), min(64, max(MIN_DOT, _pow2(max(chunk, width)))),
                              min(INTERPRETER_ROW_TILE, max(MIN_DOT, _pow2(rows))), 4, 1)
    return WeightSettings(64, 64, k_step(rows, dtype), 4, 2)


# ------------------------------------------------------------------------------------------ autotune (GPU)


def _chain_configs(live_tiles_w: int):
    """Row tile x warps x stages; pruned per problem by :func:`_prune_chain`."""
    return [
        triton.Config({"BLOCK_B": bb, "BLOCK_C": bc}, num_warps=nw, num_stages=ns)
        for bb in (16, 32, 64, 128)
        for bc in (32, 64)
        for nw in (4, 8)
        for ns in (2, 3)
    ]


def _make_prune(live_tiles_w: int):
    def prune(configs, named_args, **kwargs):
        """Keep configs whose accumulators fit the register budget (x1.5 slack: the model is rough) and whose
        staged operand tiles fit shared memory; never more rows than the batch; always keep one."""
        rows = named_args["B"]
        bw = kwargs.get("BLOCK_W", named_args.get("BLOCK_W"))
        bo = kwargs.get("BLOCK_O", named_args.get("BLOCK_O"))
        elem = named_args["x_ptr"].element_size()
        kept = []
        for cfg in configs:
            bb, bc = cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_C"]
            live = bb * (live_tiles_w * bw + bo)
            regs_ok = live <= 1.5 * ACC_VALUES_PER_THREAD * THREADS_PER_WARP * cfg.num_warps
            smem = cfg.num_stages * (bb * bc + bc * bw) * elem + bw * bw * elem
            rows_ok = bb <= max(MIN_DOT, _pow2(rows))
            if regs_ok and smem <= SMEM_BUDGET_BYTES and rows_ok:
                kept.append(cfg)
        if not kept:
            kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"], c.num_stages))]
        return kept

    return prune


def forward_autotune_configs():
    """Candidates for the forward kernel: BLOCK_B in 16..128 (rows per program: more rows reuse each weight tile
    more, at the cost of registers), BLOCK_C 32/64 (one or two cache lines per row and K-step), 4/8 warps, 2/3
    stages. The prune keeps what the register / shared-memory model allows."""
    return _chain_configs(2)


def chain_autotune_configs():
    """Candidates for the backward chain kernel, same space, pruned with its 4 live width tiles per row."""
    return _chain_configs(4)


forward_prune = _make_prune(2)
chain_prune = _make_prune(4)
AUTOTUNE_KEY = ["B", "C", "W", "L", "OUT"]
