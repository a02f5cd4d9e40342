"""GPU cost MODEL of the spinal ops: what each plan would cost on an H100, H200 or A100. Not a measurement.

One module holds the whole model; the automatic backend choice on CUDA tensors (:func:`choose_backend`, called by
:func:`spinal_ops.backends.select_backend`), ``python -m spinal_ops gpu-model`` and README's GPU table all read it.

What it models, per call (``forward``, or ``fwd+bwd``: a training step's forward and backward, every gradient):

- **The fused plans** ``cuda`` and ``triton``: each launch as the launchers make it. Grid, block and shared memory
  are the launchers' own: Triton's from :func:`triton_kernels.settings.launch_settings` (the settings a GPU uses
  without autotuning), CUDA's from the launch geometry of ``csrc/cuda`` mirrored in :func:`cuda_launches` (a test
  runs the CUDA launchers under the SIMT emulator and compares every launch with this mirror). On top of that
  structure the model puts the work of one CTA (FLOPs on tensor cores or FMA, bytes streamed, dependent steps)
  and turns it into time with the device table below.
- **The eager chain** (the original scripts' loop: ``eager``), **the dense layer** it replaces (``nn.Linear(D,
  L*w) -> act -> nn.Linear(L*w, out)``: ``dense``) and **the reference backend** (``reference``, what the
  automatic choice falls back to): their aten ops are recorded by running the modules on ``meta`` tensors
  (:func:`eager_ops`), so the op count and every GEMM shape are the code's own; each op is timed as cuBLAS
  (GEMMs) or a bandwidth-bound kernel.
- **The floor**: ``max(FLOPs / attainable rate, minimum bytes / HBM bandwidth, one call)`` at every B (the FLOPs
  and bytes of :mod:`spinal_ops.benchmark`, which the CPU report uses too; one call: one kernel and its host call
  forward, two for fwd+bwd, :func:`call_seconds`); for small batches the weight bytes or the call set it.

A call's time is ``max(host, GPU)``: the host (Python, the dispatcher, the launches) runs ahead of the GPU in a
loop of calls, so whichever is longer sets the pace. Precision: ``bf16`` (bfloat16 storage, tensor cores, fp32
accumulation), ``fp32`` (float32 under ``torch.get_float32_matmul_precision() == "highest"``, PyTorch's default:
no tensor cores anywhere) and ``tf32`` (float32 with ``"high"``: cuBLAS, the Triton kernels' ``tl.dot`` and the
CUDA forward's tensor cores use tf32; the CUDA backward stays on FMA for float32).

Every constant below says where it comes from: a datasheet, a launcher, or a judgement (marked *model*). Expect
+-2x on any single number; the model ranks plans, it does not predict milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from . import backends, reference
from .configs import CONFIGS, ROOFLINE_BATCH_SIZES, SpinalConfig

MATHS = ("bf16", "fp32", "tf32")
BWD_FLOPS = 2  # backward FLOPs per forward FLOP: the input gradient and the weight gradient of every product
MODES = ("forward", "fwd+bwd")
PLANS = backends.CANDIDATES["cuda"]  # what the automatic choice picks from (each runs the spinal layer)

# -------------------------------------------------------------------------------------------------- devices

ATTAINABLE_COMPUTE = 0.8  # model: share of the datasheet's dense peak a large cuBLAS GEMM sustains
ATTAINABLE_HBM = 0.9  # model: share of the datasheet's HBM bandwidth a large copy sustains


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One GPU of the table. Rates are datasheet peaks (dense, no sparsity), FLOP/s and bytes/s."""

    name: str
    sms: int
    clock_hz: float  # boost clock
    bf16_tensor: float
    tf32_tensor: float
    fp32_fma: float
    hbm: float
    l2: float  # L2 -> SM aggregate bandwidth (model: microbenchmark-order value, not a datasheet figure)
    l2_bytes: int
    smem_per_sm: int  # shared memory per SM usable by blocks
    smem_per_block: int  # opt-in maximum per block

    def rate(self, math_mode: str, tensor_cores: bool) -> float:
        """Attainable FLOP/s of the whole GPU for ``math_mode`` on tensor cores or on FMA units."""
        if not tensor_cores or math_mode == "fp32":
            peak = self.fp32_fma
        else:
            peak = self.bf16_tensor if math_mode == "bf16" else self.tf32_tensor
        return ATTAINABLE_COMPUTE * peak

    @property
    def hbm_attainable(self) -> float:
        return ATTAINABLE_HBM * self.hbm

    @property
    def sm_l2_bandwidth(self) -> float:
        """What one SM can pull from L2: SM_L2_BYTES_PER_CLOCK per clock."""
        return SM_L2_BYTES_PER_CLOCK * self.clock_hz


# NVIDIA datasheets (H100 Tensor Core GPU, SXM column; H200 Tensor Core GPU; A100 80GB SXM): dense tensor rates are
# half the "with sparsity" figures. H200 is the H100's GH100 with HBM3e: same SMs, clocks and rates.
DEVICES: dict[str, GpuSpec] = {
    "h100-sxm": GpuSpec("h100-sxm", sms=132, clock_hz=1.98e9, bf16_tensor=989.5e12, tf32_tensor=494.7e12,
                        fp32_fma=66.9e12, hbm=3.35e12, l2=5.5e12, l2_bytes=50 << 20, smem_per_sm=228 << 10,
                        smem_per_block=227 << 10),
    "h200": GpuSpec("h200", sms=132, clock_hz=1.98e9, bf16_tensor=989.5e12, tf32_tensor=494.7e12, fp32_fma=66.9e12,
                    hbm=4.8e12, l2=5.5e12, l2_bytes=50 << 20, smem_per_sm=228 << 10, smem_per_block=227 << 10),
    "a100-sxm": GpuSpec("a100-sxm", sms=108, clock_hz=1.41e9, bf16_tensor=312e12, tf32_tensor=156e12,
                        fp32_fma=19.5e12, hbm=2.039e12, l2=4.0e12, l2_bytes=40 << 20, smem_per_sm=164 << 10,
                        smem_per_block=163 << 10),
}
REPORT_DEVICES = ("h100-sxm", "h200")

# Latency and per-SM bandwidth (model): an L2 hit costs a few hundred cycles on Hopper and Ampere; a CTA that
# waits for each step's data pays one such round trip per dependent step. SM_L2_BYTES_PER_CLOCK: the L1 fill rate
# of one SM from L2.
L2_LATENCY_S = 200e-9
SM_L2_BYTES_PER_CLOCK = 64
# Fixed GPU time of one kernel (model): launch, ramp and drain of a small kernel run back to back with others.
KERNEL_FIXED_S = 2.0e-6
# Host time (model; the CPU-side costs measured for the same Python and dispatcher path on CPU tensors, plus the
# CUDA driver's launch call): one eager aten op called from Python (nn.Linear, cat, relu); one op run by the
# autograd engine in a backward (C++, no Python); the spinal op through torch.ops and the autograd kernel from
# SpinalLinear.forward (about 7 us measured on CPU tensors, +1 us for the launch); the engine's call of the
# backward op; a Triton launch from Python (argument specialisation and the launcher: the cost per kernel).
EAGER_OP_HOST_S = 4.0e-6
ENGINE_OP_HOST_S = 2.0e-6
FUSED_OP_HOST_S = 8.0e-6
FUSED_BACKWARD_HOST_S = 6.0e-6
# The op pairs registered from Python (triton, gemm: torch.library ops with register_autograd), around their bodies:
# a forward without a graph; one that records the autograd node; the engine's call of the Python backward and the
# backward op. Measured on CPU tensors with bodies that only allocate their outputs (resnet-head's shapes, B = 1,
# AMD EPYC Zen 5, 2 threads; medians of 9 x 1000 calls, microseconds): forward without a graph 13.9 / 15.2 (bodies
# 2-3), with one 35.9; forward and torch.autograd.grad 84-95, against 21 for grad() of one multiply.
PY_OP_HOST_S = 12.0e-6
PY_OP_GRAPH_HOST_S = 35.0e-6
PY_OP_BACKWARD_HOST_S = 30.0e-6
CUDA_LAUNCH_HOST_S = 1.0e-6
TRITON_LAUNCH_HOST_S = 12.0e-6
# How close each kernel's inner product comes to the SM's attainable rate (model): the CUDA kernels stage operands
# with synchronous scalar loads and a barrier per slice (no overlap of loads and math); Triton pipelines
# its loads (cp.async, 2 stages) but waits for each MMA.
MMA_EFFICIENCY = {"cuda": 0.25, "triton": 0.5}
FMA_EFFICIENCY = {"cuda": 0.5, "triton": 0.5}

# CUDA launch geometry: the constants of csrc/cuda/spinal_common.cuh and spinal_fwd_kernel.cuh (the emulated test
# checks the launches these give against the launchers).
CUDA_THREADS = 128  # kThreads
CUDA_BM, CUDA_BN = 16, 64  # row tile, column tile
CUDA_LDC = CUDA_BN + 4  # staged result row stride
CUDA_FMA_COLUMNS = 8  # kColsPerRow: the FMA step skips a result whose 8 columns all lie past the tile's valid ones
CUDA_YACC_LIMIT = 16 * 1024  # FwdSmem::kYaccLimit: the head accumulator stays on chip up to this size
CUDA_WEIGHT_PIECE_ROWS = 128  # kWeightPieceRows: rows of B one CTA of the weights launch reduces
CUDA_MIN_BLOCKS_PER_SM = 2  # __launch_bounds__' second argument: registers capped for 2 resident blocks
TRITON_REGS_PER_THREAD = 255  # ptxas reports of the Triton kernels compiled for sm_90a: the fast path uses all 255
REGISTERS_PER_SM = 65536  # 32-bit registers per SM on every GPU of the table


def cuda_acc_bytes(element: int) -> int:
    """``acc_t<T>``: bytes of the accumulation type for a storage element of ``element`` bytes (fp64: 8, else 4)."""
    return 8 if element == 8 else 4


def cuda_stage_bytes(math_mode: str, element: int) -> int:
    """``stage_t<T, M>``: bytes of the forward's staged operands (16-bit on tensor cores, else the fp32 / fp64
    accumulation type)."""
    return element if math_mode == "bf16" else cuda_acc_bytes(element)


def cuda_slice(stage_bytes: int) -> int:
    """``kSlice<S>``: terms per staging round for staged elements of ``stage_bytes`` (16-bit: 128, else 32)."""
    return 128 if stage_bytes == 2 else 32


def cuda_lds(stage_bytes: int) -> int:
    """``kLds<S>``: the staged row stride."""
    return cuda_slice(stage_bytes) + 8


def _align128(n: int) -> int:
    return (n + 127) // 128 * 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return _cdiv(n, unit) * unit


def _storage(math_mode: str) -> torch.dtype:
    if math_mode not in MATHS:
        raise ValueError(f"math must be one of {MATHS}, got {math_mode!r}")
    return torch.bfloat16 if math_mode == "bf16" else torch.float32


# ----------------------------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """One call: ``rows`` x ``in_features`` input, ``num_layers`` sub-layers of ``width`` on chunks of ``chunk``
    columns, ``out`` head outputs (0: hidden layer), ``lx`` / ``lh`` weight slots. (The Triton launch settings'
    ``Dims`` is this with the backward's output mask.)"""

    rows: int
    in_features: int
    chunk: int
    width: int
    num_layers: int
    out: int
    lx: int
    lh: int

    @classmethod
    def of(cls, cfg: SpinalConfig, rows: int) -> Problem:
        return cls(rows, cfg.in_features, cfg.chunk, cfg.width, cfg.num_layers, cfg.out, cfg.num_layers,
                   cfg.num_layers - 1)

    @property
    def parameters(self) -> int:
        """Parameters of the layer (packed weights, biases and head)."""
        c, w, out = self.chunk, self.width, self.out
        return self.lx * w * (c + 1) + self.lh * w * w + out * self.num_layers * w + out

    @property
    def x_columns(self) -> int:
        """Columns of ``x`` some chunk reads."""
        return min(self.in_features, self.num_layers * self.chunk)

    def flops(self, mode: str) -> int:
        """FLOPs of one ``mode`` step ("forward", "backward" or "fwd+bwd").

        Forward: ``rows * reference.flops_per_row``. Backward: BWD_FLOPS times that (every product of the forward
        has an input-gradient and a weight-gradient product of the same size; element-wise work ignored).
        ``fwd+bwd``: the sum.
        """
        forward = self.rows * reference.flops_per_row(self.chunk, self.width, self.num_layers, self.out)
        return {"forward": forward, "backward": BWD_FLOPS * forward, "fwd+bwd": (1 + BWD_FLOPS) * forward}[mode]

    def min_elements(self, mode: str) -> int:
        """Elements one ``mode`` step must move at least once.

        Forward: the ``x`` columns read, the parameters, the output ``y``. Backward: ``x``, the parameters and the
        output gradient read, the input gradient and the parameter gradients written. ``fwd+bwd``: the backward's
        and the output ``y``. Intermediates (``H``) are not counted: a kernel could keep or recompute them.
        """
        x, p, y = self.rows * self.x_columns, self.parameters, self.rows * self.out
        backward = x + p + y + self.rows * self.in_features + p
        return {"forward": x + p + y, "backward": backward, "fwd+bwd": backward + y}[mode]


# ---------------------------------------------------------------------------------------- launch descriptions


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One launch: the structure (``grid`` CTAs of ``block`` threads with ``smem`` bytes of dynamic shared memory:
    the launcher's own) and the model's work per CTA."""

    backend: str
    kernel: str
    grid: int
    block: int
    smem: int
    ctas_by_registers: int  # resident CTAs per SM the registers allow (shared memory: per device, resident_ctas)
    steps: int  # dependent steps of a CTA, each waiting for its data (sub-layers, or row slices)
    flops_per_cta: float
    tensor_cores: bool
    bytes_per_cta: float  # streamed from L2 by one CTA
    in_flight_per_cta: float  # bytes one CTA has in flight at a time (its staging)
    hbm_bytes: float  # unique bytes of the launch (read once from HBM, results written once)
    meta: dict = dataclasses.field(default_factory=dict, compare=False)  # Triton: the launch's constexprs


def resident_ctas(k: KernelLaunch, dev: GpuSpec) -> int:
    """CTAs of launch ``k`` resident on one SM of ``dev``: what registers and shared memory allow (the driver
    reserves 1 KB of shared memory per block)."""
    return max(1, min(k.ctas_by_registers, dev.smem_per_sm // (k.smem + 1024)))


def cuda_stage_smem(stage: int, tensor_cores: bool) -> int:
    """``StageSmem<T, M>::bytes``, the staging carve every kernel's shared memory starts with: the staged tiles of
    ``stage``-byte elements and, on tensor cores, the fp32 result tile."""
    lds = cuda_lds(stage)
    return (_align128(stage * CUDA_BM * lds) + _align128(stage * CUDA_BN * lds)
            + (_align128(4 * CUDA_BM * CUDA_LDC) if tensor_cores else 0))


def cuda_forward_smem(math_mode: str, width: int, out: int, head: bool, element: int) -> int:
    """``FwdSmem::bytes(out, head)`` of the instantiation the launcher picks (fast path when ``width <= 64``)."""
    acc = cuda_acc_bytes(element)
    wfast = CUDA_BN if width <= CUDA_BN else 0
    fixed = (cuda_stage_smem(cuda_stage_bytes(math_mode, element), math_mode in ("bf16", "tf32"))
             + _align128(element * 2 * CUDA_BM * wfast))
    yacc = _align128(acc * CUDA_BM * out)
    return fixed + (yacc if head and yacc <= CUDA_YACC_LIMIT else 0)


def cuda_backward_tensor_cores(math_mode: str) -> bool:
    """``kBwdMma<T>``: the backward's chain and weights kernels run on tensor cores for 16-bit dtypes (FMA for fp32,
    tf32 or not). Their staged operands are the forward's size in every math mode (:func:`cuda_stage_bytes`: tf32
    stages float32, as FMA does)."""
    return math_mode == "bf16"


def cuda_backward_smem(math_mode: str, element: int) -> int:
    """``BwdSmem<T>::bytes`` (the chain and weights launches): the staging carve alone."""
    return cuda_stage_smem(cuda_stage_bytes(math_mode, element), cuda_backward_tensor_cores(math_mode))


def cuda_weight_pieces(rows: int) -> int:
    """``weight_pieces(B)``: the weights launch's pieces of the batch (one above CUDA_WEIGHT_PIECE_ROWS rows: none)."""
    return _cdiv(rows, CUDA_WEIGHT_PIECE_ROWS) if rows > CUDA_WEIGHT_PIECE_ROWS else 1


def cuda_weight_jobs(p: Problem, mask) -> int:
    """``weight_jobs(p).total()``: one job per 16 x 64 output tile of each gradient the mask asks for."""
    _, wx, wh, b, wo, bo = (bool(m) for m in mask)
    tw = _cdiv(p.width, CUDA_BM)
    jobs = p.lx * tw * _cdiv(p.chunk, CUDA_BN) if wx else 0
    jobs += p.lx * tw if b else 0
    jobs += p.lh * tw * _cdiv(p.width, CUDA_BN) if wh else 0
    jobs += _cdiv(p.out, CUDA_BM) * _cdiv(p.num_layers * p.width, CUDA_BN) if wo else 0
    jobs += _cdiv(p.out, CUDA_BM) if bo else 0
    return jobs


def _chain_bytes(p: Problem, row_tile: int, element: int, column_passes: int) -> float:
    """Bytes one row-tiled CTA streams: every weight once, its rows of x once per column pass, H and y."""
    rows = min(row_tile, p.rows)
    return (p.parameters + rows * p.chunk * p.num_layers * column_passes
            + rows * p.num_layers * p.width + rows * p.out) * element


def _chain_flops(p: Problem, row_tile: int, width_pad: int, out_pad: int, chunk_pad: int, mode: str,
                 width_terms: int | None = None) -> float:
    """FLOPs of one row-tiled CTA over all sub-layers, at the sizes its tiles compute (padding is computed too):
    ``width_pad`` / ``out_pad`` output columns of the sub-layers / the head, ``chunk_pad`` and ``width_terms``
    (default ``width_pad``) terms of the input and recurrent / head products."""
    width_terms = width_pad if width_terms is None else width_terms
    per_layer = width_pad * (chunk_pad + width_terms) + out_pad * width_terms
    factor = 1 if mode == "forward" else 1.5  # backward chain: dH, carry and dx products (no weight products)
    return 2.0 * row_tile * p.num_layers * per_layer * factor


def _unique_bytes(p: Problem, element: int, kernel: str) -> float:
    x, params, h, y = p.rows * p.x_columns, p.parameters, p.rows * p.num_layers * p.width, p.rows * p.out
    if kernel == "forward":
        return (x + params + h + y) * element
    if kernel == "chain":  # reads gy, H, x (recompute), weights; writes dZ (fp32) and dx
        return (y + h + x + params) * element + p.rows * p.num_layers * p.width * 4 + p.rows * p.in_features * element
    return (p.rows * (p.num_layers * p.width * 4 + p.x_columns + p.num_layers * p.width) + params) * element


def cuda_launches(p: Problem, math_mode: str, mode: str) -> list[KernelLaunch]:
    """The CUDA backend's launches for one call: the forward, and for ``fwd+bwd`` the backward's chain and weights
    kernels (every gradient) and, for a batch split into pieces, the weights' reduce kernel. Grid, block and shared
    memory as ``csrc/cuda/spinal_launch.h`` launches them."""
    element = _storage(math_mode).itemsize
    tensor = math_mode in ("bf16", "tf32")
    launches = []
    if p.rows == 0:
        return launches
    tiles = _cdiv(p.rows, CUDA_BM)

    # What the tile steps compute (csrc/cuda/spinal_common.cuh, Tile::step): FMA, the slice's terms exactly and
    # the result columns in groups of CUDA_FMA_COLUMNS; tensor cores, whole wmma K-steps and 16-column warp tiles.
    fma = (_round_up(p.width, CUDA_FMA_COLUMNS), _round_up(p.out, CUDA_FMA_COLUMNS), p.chunk, p.width)
    mk = 16 if math_mode == "bf16" else 8
    wmma = (_round_up(p.width, 16), _round_up(p.out, 16), _round_up(p.chunk, mk), _round_up(p.width, mk))
    wpad, opad, cpad, wterms = wmma if tensor else fma
    staged = cuda_stage_bytes(math_mode, element)
    stage_bytes = (CUDA_BM + CUDA_BN) * cuda_slice(staged) * staged
    smem = cuda_forward_smem(math_mode, p.width, p.out, p.out > 0, element)
    launches.append(KernelLaunch(
        "cuda", "spinal_fwd_kernel", tiles, CUDA_THREADS, smem,
        CUDA_MIN_BLOCKS_PER_SM, p.num_layers,
        _chain_flops(p, CUDA_BM, wpad, opad, cpad, "forward", wterms), tensor,
        _chain_bytes(p, CUDA_BM, element, _cdiv(p.width, CUDA_BN)), stage_bytes, _unique_bytes(p, element, "forward")))
    if mode == "forward":
        return launches
    mask = (True, True, p.lh > 0, True, p.out > 0, p.out > 0)
    bsmem = cuda_backward_smem(math_mode, element)
    acc = cuda_acc_bytes(element)
    btc = cuda_backward_tensor_cores(math_mode)
    bstaged = cuda_stage_bytes(math_mode, element)
    bstage = (CUDA_BM + CUDA_BN) * cuda_slice(bstaged) * bstaged
    chain_pads = wmma if btc else fma
    launches.append(KernelLaunch(
        "cuda", "spinal_bwd_chain_kernel", tiles, CUDA_THREADS, bsmem, CUDA_MIN_BLOCKS_PER_SM, p.num_layers,
        _chain_flops(p, CUDA_BM, *chain_pads[:3], "chain", chain_pads[3]), btc,
        _chain_bytes(p, CUDA_BM, element, _cdiv(p.width, CUDA_BN)), bstage, _unique_bytes(p, element, "chain")))
    jobs = cuda_weight_jobs(p, mask)
    pieces = cuda_weight_pieces(p.rows)
    piece_rows = min(p.rows, CUDA_WEIGHT_PIECE_ROWS) if pieces > 1 else p.rows
    partials = pieces * jobs * CUDA_BM * CUDA_BN * acc if pieces > 1 else 0
    gradients = p.parameters * element  # written by the weights launch, or by the reduce launch from the partials
    launches.append(KernelLaunch(
        "cuda", "spinal_bwd_weights_kernel", jobs * pieces, CUDA_THREADS, bsmem, CUDA_MIN_BLOCKS_PER_SM,
        _cdiv(piece_rows, cuda_slice(bstaged)), 2.0 * piece_rows * CUDA_BM * CUDA_BN, btc,
        piece_rows * (CUDA_BM + CUDA_BN) * float(bstaged), bstage,
        _unique_bytes(p, element, "weights") + (partials - gradients if pieces > 1 else 0)))
    if pieces > 1:  # the partial tiles summed in piece order, one CTA per tile: reads them, writes the gradients
        launches.append(KernelLaunch(
            "cuda", "spinal_bwd_reduce_kernel", jobs, CUDA_THREADS, 0, CUDA_MIN_BLOCKS_PER_SM, 1,
            float(pieces * CUDA_BM * CUDA_BN), False, float(pieces * CUDA_BM * CUDA_BN * acc),
            float(pieces * CUDA_BM * CUDA_BN * acc), partials + gradients))
    return launches


def _triton_dims(p: Problem, mask):
    from .triton_kernels import settings

    return settings, settings.Dims(*dataclasses.astuple(p), tuple(mask))


def triton_launches(p: Problem, math_mode: str, mode: str, target: str = "gpu") -> list[KernelLaunch]:
    """The Triton backend's launches for one call, from :func:`triton_kernels.settings.launch_settings` for
    ``target`` (``"gpu"``: the model's settings without autotuning; ``"interpreter"``: what the tests launch)."""
    dtype = _storage(math_mode)
    element = dtype.itemsize
    tensor = math_mode in ("bf16", "tf32")
    launches = []
    if p.rows == 0:
        return launches
    kernels = ["forward"] if mode == "forward" else ["forward", "chain", "weights"]
    mask = (True, True, p.lh > 0, True, p.out > 0, p.out > 0)
    settings, dims = _triton_dims(p, mask if mode != "forward" else (False,) * 6)
    for kernel in kernels:
        launch = settings.launch_settings(kernel, dims, dtype, None, target=target)
        meta = launch.meta
        grid = int(launch.grid[0])
        warps, stages = meta["num_warps"], meta["num_stages"]
        by_regs = max(1, REGISTERS_PER_SM // (warps * 32 * TRITON_REGS_PER_THREAD))
        if kernel == "weights":
            bm, bn, br = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_R"]
            smem = stages * br * (bm + bn) * element
            launches.append(KernelLaunch(
                "triton", "weights", grid, warps * 32, smem, by_regs,
                _cdiv(p.rows, br), 2.0 * p.rows * bm * bn, tensor, p.rows * (bm + bn) * float(element), smem,
                _unique_bytes(p, element, "weights"), dict(meta)))
            continue
        path = launch.path
        bb, bc = meta["BLOCK_B"], meta["BLOCK_C"]
        smem = settings._staged_bytes(path, bb, bc, stages, element)
        if path.wide:
            wpad = _round_up(p.width, path.block_n)
            opad = _round_up(p.out, path.block_o)
            passes = _cdiv(p.width, path.block_n)
        else:
            wpad, opad, passes = path.block_w, (path.block_o if p.out else 0), 1
        cpad = _round_up(p.chunk, bc)
        launches.append(KernelLaunch(
            "triton", kernel, grid, warps * 32, smem, by_regs,
            p.num_layers, _chain_flops(p, bb, wpad, opad, cpad, kernel), tensor,
            _chain_bytes(p, bb, element, passes), smem, _unique_bytes(p, element, kernel), dict(meta)))
    return launches


# ------------------------------------------------------------------------------------------------- timing


def kernel_seconds(k: KernelLaunch, dev: GpuSpec, math_mode: str) -> float:
    """GPU time of one launch: fixed cost + the longest of the CTAs' critical path (waves of resident CTAs, each
    step waiting one L2 round trip, streaming at what its loads in flight allow), the unique bytes at HBM bandwidth
    and all CTAs' streamed bytes at L2 bandwidth."""
    if k.grid == 0:
        return 0.0
    resident = resident_ctas(k, dev)
    slots = dev.sms * resident
    waves = _cdiv(k.grid, slots)
    share = min(resident, _cdiv(k.grid, dev.sms))  # CTAs that share one busy SM
    efficiency = (MMA_EFFICIENCY if k.tensor_cores else FMA_EFFICIENCY)[k.backend]
    sm_rate = dev.rate(math_mode, k.tensor_cores) * efficiency / dev.sms
    compute = share * k.flops_per_cta / sm_rate
    stream = min(k.in_flight_per_cta / L2_LATENCY_S, dev.sm_l2_bandwidth / share)
    memory = k.bytes_per_cta / stream
    critical = waves * (max(compute, memory) + k.steps * L2_LATENCY_S)
    return KERNEL_FIXED_S + max(critical, k.hbm_bytes / dev.hbm_attainable, k.grid * k.bytes_per_cta / dev.l2)


def gemm_seconds(m: int, n: int, k: int, nbytes: float, dev: GpuSpec, math_mode: str) -> float:
    """cuBLAS GEMM (model): 128 x 128 output tiles, split over K (256-deep pieces) until the SMs are busy, at the
    attainable tensor (bf16, tf32) or FMA (fp32) rate; at least its bytes at HBM bandwidth."""
    tiles = _cdiv(m, 128) * _cdiv(n, 128)
    split = max(1, min(_cdiv(dev.sms, tiles), k // 256))
    busy = min(1.0, tiles * split / dev.sms)
    compute = 2.0 * m * n * k / (dev.rate(math_mode, True) * busy)
    return KERNEL_FIXED_S + max(compute, nbytes / dev.hbm_attainable)


@dataclasses.dataclass(frozen=True)
class EagerOp:
    """One aten op of an eager plan: its name, the GEMM shape (m, n, k) if it is one, the bytes it touches and
    whether the autograd engine runs it (a backward op: no Python)."""

    name: str
    gemm: tuple[int, int, int] | None
    nbytes: int
    backward: bool


def _gemm_shape(name: str, args, out) -> tuple[int, int, int] | None:
    """``(m, n, k)`` of a matrix product (``mm``, ``addmm``, their ``out=`` and in-place forms), else None."""
    op = name.split(".")[1] if name.startswith("aten.") else ""
    if op in ("mm", "addmm", "addmm_"):
        a, b = (args[0], args[1]) if op == "mm" else (args[1], args[2])
        return int(a.shape[0]), int(b.shape[1]), int(a.shape[1])
    return None


def _bytes_of(values) -> int:
    seen, total = set(), 0
    for v in values:
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            total += v.numel() * v.element_size()
    return total


# Ops that launch no kernel: allocations and detach.
_NO_KERNEL = frozenset(("detach.default", "empty.memory_format", "empty_like.default", "empty_strided.default",
                        "new_empty.default", "new_empty_strided.default"))


def _record_ops(fn) -> list[EagerOp]:
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[EagerOp] = []
    state = {"backward": False}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and func.__name__ not in _NO_KERNEL:
                flat = list(args) + list(out if isinstance(out, (tuple, list)) else [out])
                ops.append(EagerOp(str(func), _gemm_shape(str(func), args, out), _bytes_of(flat), state["backward"]))
            return out

    with Recorder():
        fn(state)
    return ops


@contextlib.contextmanager
def _clean_context():
    """Recording may run inside a user's call (the automatic choice), under inference mode, autocast or the user's
    own dispatch modes: none of them may apply to the layer built for it or to its ops, and nothing may leak."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad(), torch._C._DisableAutocast():
        yield


@functools.lru_cache(maxsize=512)
def eager_ops(plan: str, cfg: SpinalConfig, rows: int, mode: str, math_mode: str) -> tuple[EagerOp, ...]:
    """The aten ops of ``plan`` ("eager": the original scripts' chain; "dense": the dense layer it replaces;
    "reference": the reference backend; "gemm": the gemm backend's calls) for one ``mode`` call on ``rows`` rows,
    recorded on ``meta`` tensors."""
    with _clean_context():
        return _eager_ops(plan, cfg, rows, mode, math_mode)


def _eager_ops(plan: str, cfg: SpinalConfig, rows: int, mode: str, math_mode: str) -> tuple[EagerOp, ...]:
    from .benchmark import EagerSpinal, dense_equivalent
    from .module import SpinalLinear

    dtype = _storage(math_mode)
    head = cfg.out > 0  # out = 0: a hidden layer
    spinal = SpinalLinear(cfg.in_features, cfg.out if head else cfg.num_layers * cfg.width, layer_width=cfg.width,
                          num_layers=cfg.num_layers, num_splits=cfg.num_splits, activation=cfg.activation, head=head,
                          device="meta", dtype=dtype)
    if plan == "eager":
        module = EagerSpinal(spinal)
    elif plan == "dense":
        module = dense_equivalent(cfg, dtype=dtype, device="meta")
    elif plan == "gemm":
        return _gemm_plan_ops(spinal, cfg, rows, mode, dtype)
    elif plan == "reference":
        spec = spinal._spec

        def module(x):
            p = spinal
            h_all, y = reference.spinal_forward(x, p.weight_x, p.weight_h, p.bias, p.head_weight, p.head_bias,
                                                *spec.op_args)
            return y if head else h_all
    else:
        raise ValueError(f"plan must be eager, dense, gemm or reference, got {plan!r}")
    x = torch.empty(rows, cfg.in_features, device="meta", dtype=dtype, requires_grad=mode == "fwd+bwd")

    def run(state):
        if mode == "forward":
            with torch.no_grad():
                module(x)
            return
        y = module(x)
        grad = torch.empty_like(y)
        state["backward"] = True
        y.backward(grad)

    return tuple(_record_ops(run))


def _gemm_plan_ops(spinal, cfg: SpinalConfig, rows: int, mode: str, dtype: torch.dtype) -> tuple[EagerOp, ...]:
    """The gemm backend's calls (:mod:`spinal_ops.gemm`: its forward, and for ``fwd+bwd`` its backward with every
    gradient), recorded on ``meta`` tensors. All are issued from Python (the op's own body), none by the engine."""
    from . import gemm

    spec = spinal._spec
    p = spinal
    hyper = spec.op_args
    x = torch.empty(rows, cfg.in_features, device="meta", dtype=dtype)

    def run(state):
        with torch.no_grad():
            h_all, y = gemm.spinal_forward_gemm(x, p.weight_x, p.weight_h, p.bias, p.head_weight, p.head_bias,
                                                *hyper)
            if mode == "fwd+bwd":
                head = p.head_weight is not None
                gemm.spinal_backward_gemm(torch.empty_like(y) if head else None, None if head else
                                          torch.empty_like(h_all), x, h_all, p.weight_x, p.weight_h, p.bias,
                                          p.head_weight, *hyper, [True, True, True, True, head, head])

    return tuple(_record_ops(run))


def eager_seconds(ops, dev: GpuSpec, math_mode: str) -> tuple[float, float]:
    """(host, GPU) seconds of a list of eager ops."""
    host = sum(ENGINE_OP_HOST_S if op.backward else EAGER_OP_HOST_S for op in ops)
    gpu = 0.0
    for op in ops:
        if op.gemm is not None:
            gpu += gemm_seconds(*op.gemm, op.nbytes, dev, math_mode)
        else:
            gpu += KERNEL_FIXED_S + op.nbytes / dev.hbm_attainable
    return host, gpu


@dataclasses.dataclass(frozen=True)
class PlanTime:
    plan: str
    host_s: float
    gpu_s: float
    launches: int

    @property
    def seconds(self) -> float:
        return max(self.host_s, self.gpu_s)


def fused_time(plan: str, p: Problem, dev: GpuSpec, math_mode: str, mode: str) -> PlanTime:
    """A fused plan's call: its launches (:func:`cuda_launches` / :func:`triton_launches`) and host costs."""
    launches = cuda_launches(p, math_mode, mode) if plan == "cuda" else triton_launches(p, math_mode, mode)
    per_launch = CUDA_LAUNCH_HOST_S if plan == "cuda" else TRITON_LAUNCH_HOST_S
    host = op_pair_host_s(plan, mode) + per_launch * len(launches)
    gpu = sum(kernel_seconds(k, dev, math_mode) for k in launches)
    return PlanTime(plan, host, gpu, len(launches))


def plan_time(plan: str, cfg: SpinalConfig, rows: int, dev: GpuSpec, math_mode: str, mode: str) -> PlanTime:
    """Modelled time of ``plan`` ("cuda", "triton", "gemm", "reference", "eager" or "dense") for one call."""
    if plan in ("cuda", "triton"):
        return fused_time(plan, Problem.of(cfg, rows), dev, math_mode, mode)
    ops = eager_ops(plan, cfg, rows, mode, math_mode)
    host, gpu = eager_seconds(ops, dev, math_mode)
    if plan == "gemm":  # the op pair's own calls around its Python calls
        host += op_pair_host_s(plan, mode)
    return PlanTime(plan, host, gpu, len(ops))


def op_pair_host_s(plan: str, mode: str) -> float:
    """Host time of a fused plan's op pair itself (not its kernels or calls) for one ``mode`` call: the native ops'
    C++ autograd (cuda), or the op pairs registered from Python (triton, gemm)."""
    if plan == "cuda":
        return FUSED_OP_HOST_S + (FUSED_BACKWARD_HOST_S if mode == "fwd+bwd" else 0.0)
    return PY_OP_HOST_S if mode == "forward" else PY_OP_GRAPH_HOST_S + PY_OP_BACKWARD_HOST_S


def call_seconds(mode: str) -> float:
    """The least a call can cost: one kernel and its host call (forward), or two (forward and backward)."""
    return (2 if mode == "fwd+bwd" else 1) * (KERNEL_FIXED_S + EAGER_OP_HOST_S)


def floor_seconds(p: Problem, dev: GpuSpec, math_mode: str, mode: str) -> float:
    """``max(FLOPs / attainable rate, minimum bytes / HBM bandwidth, one call)``: the minimum bytes include every
    weight once, so for small batches this is ``max(weight bytes / HBM, one launch)``; the rate is the tensor-core
    rate (bf16, tf32) or, for fp32, the FMA rate."""
    element = _storage(math_mode).itemsize
    compute = p.flops(mode) / dev.rate(math_mode, math_mode != "fp32")
    return max(compute, p.min_elements(mode) * element / dev.hbm_attainable, call_seconds(mode))


# --------------------------------------------------------------------------------------------- the choice


@functools.lru_cache(maxsize=1024)
def choose_backend(cfg: SpinalConfig, rows: int, device: str, math_mode: str, mode: str,
                   available: tuple[str, ...] = PLANS) -> str:
    """The automatic backend for a call on GPU ``device`` (a key of DEVICES): the fastest of ``available`` by the
    model (ties: the order of PLANS). ``reference`` (the eager chain) is a candidate wherever it is available, so
    the choice is never modelled slower than it. Cached per problem (the first call of a shape records the
    reference's ops on meta tensors, a few milliseconds)."""
    candidates = [plan for plan in PLANS if plan in available]
    if not candidates:
        raise ValueError(f"no plan available among {available!r}; plans: {PLANS}")
    dev = DEVICES[device]
    return min(candidates, key=lambda plan: plan_time(plan, cfg, rows, dev, math_mode, mode).seconds)


def device_key(props) -> str:
    """The key of DEVICES that models a CUDA device, from its properties (``torch.cuda.get_device_properties``): by
    name; an unknown GPU is added to the table as an H100 SXM with its own SM count."""
    name = props.name.lower()
    for key, marker in (("h200", "h200"), ("h100-sxm", "h100"), ("a100-sxm", "a100")):
        if marker in name:
            return key
    key = f"{props.name} (as h100-sxm)"
    if key not in DEVICES:
        DEVICES[key] = dataclasses.replace(DEVICES["h100-sxm"], name=key, sms=int(props.multi_processor_count))
    return key


def math_of(dtype: torch.dtype) -> str:
    """The model's precision for a storage dtype under the current float32 matmul precision (16-bit: bf16)."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ----------------------------------------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class ModelRow:
    device: str
    config: str
    rows: int
    mode: str
    math: str
    times: dict  # plan -> PlanTime, every plan of PLANS plus eager and dense
    chosen: str
    floor_s: float

    @property
    def chosen_s(self) -> float:
        return self.times[self.chosen].seconds

    @property
    def baseline_s(self) -> float:
        return min(self.times["eager"].seconds, self.times["dense"].seconds)

    @property
    def floor_target(self) -> float | None:
        """The largest time / floor the targets allow at this batch: 1.5 from B = 1024, 2 up to B = 64."""
        return 1.5 if self.rows >= 1024 else (2.0 if self.rows <= 64 else None)

    @property
    def beats_baseline(self) -> bool:
        return self.chosen_s <= self.baseline_s * (1 + 1e-9)

    @property
    def meets_floor(self) -> bool | None:
        """Whether the chosen plan is within the floor target (None: no target at this batch)."""
        target = self.floor_target
        return None if target is None else self.chosen_s <= target * self.floor_s

    def misses(self) -> list[str]:
        """The targets this row misses, each as a short text."""
        out = []
        if not self.beats_baseline:
            which = "dense" if self.times["dense"].seconds < self.times["eager"].seconds else "eager"
            out.append(f"slower than {which} ({self.chosen_s / self.baseline_s:.2f}x)")
        if self.meets_floor is False:
            out.append(f"{self.chosen_s / self.floor_s:.1f}x floor (target {self.floor_target:g}x)")
        return out


def model_row(device: str, cfg: SpinalConfig, rows: int, mode: str, math_mode: str) -> ModelRow:
    dev = DEVICES[device]
    p = Problem.of(cfg, rows)
    times = {plan: plan_time(plan, cfg, rows, dev, math_mode, mode) for plan in (*PLANS, "eager", "dense")}
    chosen = choose_backend(cfg, rows, device, math_mode, mode)
    return ModelRow(device, cfg.name, rows, mode, math_mode, times, chosen, floor_seconds(p, dev, math_mode, mode))


def model_rows(devices=REPORT_DEVICES, configs=CONFIGS, batch_sizes=ROOFLINE_BATCH_SIZES, modes=MODES,
               maths=("bf16", "fp32")) -> list[ModelRow]:
    return [model_row(d, cfg, b, mode, m) for d in devices for m in maths for mode in modes for cfg in configs
            for b in batch_sizes]


def _t(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def format_table(rows: list[ModelRow]) -> str:
    """Every row: the chosen plan and its time, each plan's time, the floor and the misses."""
    head = ["device", "math", "mode", "config", "B", "chosen", "chosen time", "cuda", "triton", "gemm", "reference",
            "eager", "dense", "floor", "x floor", "misses"]
    body = []
    for r in rows:
        t = r.times
        body.append([r.device, r.math, r.mode, r.config, str(r.rows), r.chosen, _t(r.chosen_s), _t(t["cuda"].seconds),
                     _t(t["triton"].seconds), _t(t["gemm"].seconds), _t(t["reference"].seconds), _t(t["eager"].seconds),
                     _t(t["dense"].seconds), _t(r.floor_s), f"{r.chosen_s / r.floor_s:.1f}",
                     "; ".join(r.misses()) or "-"])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    lines = ["MODEL, not a measurement (spinal_ops.gpu_model): time per call = max(host, GPU)."]
    lines.append("  ".join(h.ljust(widths[i]) for i, h in enumerate(head)))
    lines += ["  ".join(v.ljust(widths[i]) for i, v in enumerate(row)) for row in body]
    return "\n".join(lines)


def format_markdown(rows: list[ModelRow]) -> str:
    """README's table: one line per device, configuration and B; per precision and mode the chosen plan, its time,
    and its ratio to min(eager, dense) and to the floor."""
    columns = sorted({(r.math, r.mode) for r in rows}, key=lambda k: (MATHS.index(k[0]), MODES.index(k[1])))
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r.device, r.config, r.rows), {})[(r.math, r.mode)] = r
    head = ["device", "config", "B"] + [f"{m} {mode}" for m, mode in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (device, config, batch), by_column in cells.items():
        values = []
        for column in columns:
            r = by_column.get(column)
            values.append("" if r is None else f"{r.chosen} {_t(r.chosen_s)} ({r.chosen_s / r.baseline_s:.2f} / "
                          f"{r.chosen_s / r.floor_s:.1f})")
        lines.append("| " + " | ".join([device, config, str(batch), *values]) + " |")
    return "\n".join(lines)


def summary(rows: list[ModelRow]) -> str:
    """Counts of the rows that meet each target, and the misses grouped by cause."""
    total = len(rows)
    slower = [r for r in rows if not r.beats_baseline]
    large = [r for r in rows if r.rows >= 1024]
    large_ok = [r for r in large if r.meets_floor]
    small = [r for r in rows if r.rows <= 64]
    small_ok = [r for r in small if r.meets_floor]
    chosen = {}
    for r in rows:
        chosen[r.chosen] = chosen.get(r.chosen, 0) + 1
    return (f"{total} rows. Automatic <= min(eager, dense): {total - len(slower)} of {total}. "
            f"B >= 1024 within 1.5x floor: {len(large_ok)} of {len(large)}. "
            f"B <= 64 within 2x floor: {len(small_ok)} of {len(small)}. "
            f"Chosen: " + ", ".join(f"{k} {v}" for k, v in sorted(chosen.items())) + ".")
