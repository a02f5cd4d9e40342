"""Shared test helpers: the one sample generator, the one tolerance rule, the backends under test and the one
check of a backend against the reference (:func:`check_against_reference`).

Tolerance rule (flash-attention's, spinal_ops/_tolerance.py): a kernel's error against the float64 reference may be
at most twice the error of the reference computed in the kernel's own dtype, plus a small floor per dtype relative
to the largest magnitude of the expected tensor. In float64 the reference-in-dtype *is* the float64 reference, so
the floor alone applies: agreement to rounding.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import sys

import pytest
import torch

import spinal_ops
from spinal_ops import reference
from spinal_ops._tolerance import FLOOR, GRADCHECK, max_error, tolerance

__all__ = ["FLOOR", "GRADCHECK", "tolerance"]  # the rule lives in the package (python -m spinal_ops check uses it too)


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem: sizes and variant flags. ``id`` names it in parametrize ids and failure messages."""

    rows: int  # B
    in_features: int  # D
    num_splits: int  # K
    width: int  # w
    num_layers: int  # L
    out: int = 3  # head outputs (ignored in hidden mode)
    split_mode: str = "cyclic"
    activation: str = "relu"
    negative_slope: float = 0.01
    shared: bool = False  # the weight slots (0, 1, 1, ..., 1)
    tie: tuple[int, ...] | None = None  # any other weight slots (tied sub-layers), e.g. (0, 1, 2, 3, 2, 3)
    bias: bool = True
    head: bool = True
    layout: str = "contiguous"  # "contiguous", "transposed" (non-contiguous x), "3d" (leading dims)

    @property
    def id(self) -> str:
        flags = [self.split_mode, self.activation]
        flags += ["shared"] if self.shared else []
        flags += ["tie" + "".join(map(str, self.tie))] if self.tie else []
        flags += [] if self.bias else ["nobias"]
        flags += ["head"] if self.head else ["hidden"]
        flags += [] if self.layout == "contiguous" else [self.layout]
        sizes = f"B{self.rows}-D{self.in_features}-K{self.num_splits}-w{self.width}-L{self.num_layers}"
        return sizes + "-" + "-".join(flags)

    def replace(self, **kw) -> Case:
        return dataclasses.replace(self, **kw)

    @property
    def slots(self) -> tuple[int, ...]:
        """The weight slot of each sub-layer."""
        return self.tie if self.tie else reference.weight_slots(self.num_layers, self.shared)

    def layer_args(self) -> tuple[list[int], list[int]]:
        """``(starts, slots)``: the op arguments that describe the sub-layers."""
        starts = reference.split_starts(self.in_features, self.num_splits, self.num_layers, self.split_mode)
        return starts, list(self.slots)


# Tiny, regular and awkward shapes: odd D and w, K not dividing D, wrap, L = 1, B in {0, 1, 7, 257}. By name:
# tests pick ``CASES["wrap"]``, never a position.
CASES = {
    "wrap": Case(7, 13, 3, 5, 4),  # D = 13, K = 3: c = 4, chunks wrap
    "alternate": Case(1, 16, 2, 8, 4, split_mode="alternate"),  # the classic halves
    "empty": Case(0, 10, 2, 3, 3),  # empty batch
    "b257": Case(257, 9, 2, 7, 5, activation="tanh"),  # c = round(4.5) = 4, odd everything
    "k8": Case(7, 24, 8, 3, 10, activation="leaky_relu", negative_slope=0.2),  # K = 8, wrap many times
    "l1": Case(5, 11, 2, 6, 1),  # L = 1: no recurrence
    "shared": Case(7, 12, 3, 4, 5, shared=True, activation="sigmoid"),
    "gelu-hidden": Case(7, 12, 3, 4, 6, head=False, activation="gelu"),
    "silu-transposed": Case(7, 15, 4, 5, 4, bias=False, activation="silu", layout="transposed"),
    "identity-3d": Case(7, 10, 2, 4, 3, activation="identity", layout="3d"),
    # tied weights in the regression scripts' pattern (fc1, fc2, fc3, fc4, fc3, fc4): slots 2 and 3 serve two
    # sub-layers each; D = 13, c = 4: chunks wrap
    "tied": Case(7, 13, 3, 5, 6, tie=(0, 1, 2, 3, 2, 3), activation="leaky_relu", negative_slope=0.1),
    # leaky_relu with a negative slope: act' needs the recomputed Z (not readable from h)
    "leaky-negative": Case(7, 13, 3, 5, 4, activation="leaky_relu", negative_slope=-0.3),
    # shared weights in hidden mode without bias, alternate split
    "shared-hidden-nobias": Case(9, 16, 4, 6, 5, split_mode="alternate", shared=True, bias=False, head=False,
                                 activation="silu"),
}

# One-tile batches wide enough that the cpu kernel splits each sub-layer's products into column blocks
# (csrc/cpu/spinal_parallel.h, ColumnSplit: the batch is one row tile, which is B <= 16 rows, or B <= 256 rows of a
# layer whose weights exceed 1 MB (RowTiles); a product of >= 2^18 multiply-adds; >= 128 columns; so the B = 64 case
# splits in float64 and runs as row tiles in float32):
# w = 200 -> 3 blocks (80, 80, 40); c = round(150.5) = 150 -> 2 blocks (80, 70), the first straddling the wrap of
# the chunk starting at column 300 of 301; w = 131 -> 2 blocks (80, 51), c = 128 -> 2 blocks (64, 64).
COLUMN_SPLIT_CASES = {
    "split-z-carry": Case(7, 301, 2, 200, 3, activation="gelu"),  # Z and carry split (recomputed Z), dx not (210k)
    "split-z-carry-dx": Case(64, 301, 2, 200, 3, shared=True, head=False, activation="tanh"),  # Z, carry and dx
    "split-z": Case(9, 257, 2, 131, 4, bias=False, activation="leaky_relu", negative_slope=-0.1),  # Z split only
}


def unread_columns(case: Case) -> list[int]:
    """The columns of ``x`` that no sub-layer's chunk reads: their gradient is zero."""
    c = reference.chunk_size(case.in_features, case.num_splits)
    read = {(s + j) % case.in_features for s in set(case.layer_args()[0]) for j in range(c)}
    return [k for k in range(case.in_features) if k not in read]


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=0):
    """``(x, params)``: input of the case's layout and packed parameters, drawn from a fixed seed.

    ``x`` has shape ``(B, D)`` (``(2, B, D)`` for layout "3d"); params is a dict with keys weight_x,
    weight_h, bias, head_weight, head_bias (None where absent), all leaf tensors requiring grad.
    """
    g = torch.Generator().manual_seed(seed)
    c = reference.chunk_size(case.in_features, case.num_splits)
    lx, lh = reference.num_slots(case.slots)
    w = case.width

    def rand(*shape, scale=1.0):
        t = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
        return t.to(dtype=dtype, device=device).requires_grad_()

    if case.layout == "transposed":
        x = rand(case.in_features, case.rows).detach().t().requires_grad_()
    elif case.layout == "3d":
        x = rand(2, case.rows, case.in_features)
    else:
        x = rand(case.rows, case.in_features)
    params = {
        "weight_x": rand(lx, w, c, scale=reference.init_bound(c) * 2),
        "weight_h": rand(lh, w, w, scale=reference.init_bound(c + w) * 2),
        "bias": rand(lx, w) if case.bias else None,
        "head_weight": rand(case.out, case.num_layers * w, scale=reference.init_bound(case.num_layers * w))
        if case.head else None,
        "head_bias": rand(case.out) if (case.head and case.bias) else None,
    }
    return x, params


def functional_kwargs(case: Case) -> dict:
    """Keyword arguments of ``spinal_ops.spinal_linear`` for a case."""
    return dict(num_layers=case.num_layers, num_splits=case.num_splits, split_mode=case.split_mode,
                activation=case.activation, negative_slope=case.negative_slope, weight_slots=case.slots)


def assert_close(actual, expected_hi, expected_same=None, *, what: str) -> None:
    """Assert ``actual`` is within :func:`tolerance` of ``expected_hi`` (the float64 reference).

    ``expected_same`` is the reference computed in ``actual``'s dtype (defaults to ``expected_hi``, which
    gives the floor alone). ``what`` names backend, case and tensor in the failure message.
    """
    assert actual is not None, f"{what}: gradient missing"
    assert actual.shape == expected_hi.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected_hi.shape)}"
    if actual.numel() == 0:
        return
    nan_ok = torch.isnan(actual.double()) == torch.isnan(expected_hi.double())
    assert bool(nan_ok.all()), f"{what}: NaN pattern differs from the reference ({actual.dtype})"
    tol = tolerance(expected_hi, expected_same, actual.dtype)
    worst = max_error(actual, expected_hi)
    assert worst <= tol, f"{what}: max abs error {worst:.3e} > tolerance {tol:.3e} ({actual.dtype})"


def run_and_grad(fn, x, params, seed=1, cot_dtype=None):
    """Run ``fn(x, **params)``, backpropagate a fixed random cotangent; return ``(out, grads by name)``.

    The cotangent is drawn in float64 and rounded to ``cot_dtype`` (default: the output's dtype), then cast to the
    output's dtype: a float64 run given ``cot_dtype`` gets the very values a run in that dtype gets.
    """
    out = fn(x, **params)
    g = torch.Generator().manual_seed(seed)
    cot = (torch.rand(out.shape, generator=g, dtype=torch.float64) * 2 - 1).to(cot_dtype or out.dtype)
    leaves = {"x": x, **{k: v for k, v in params.items() if v is not None}}
    grads = torch.autograd.grad(out, list(leaves.values()), cot.to(out.dtype).to(out.device), allow_unused=True)
    return out.detach(), dict(zip(leaves.keys(), grads, strict=False))


# ------------------------------------------------------------------------------------------ backends under test

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# A file-system check, so that collection never queries CUDA; tests re-check torch.cuda.is_available() when they run.
GPU_PRESENT = os.path.exists("/dev/nvidiactl")
DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

_BACKEND_PARAMS = {
    "reference": pytest.param("reference", id="reference"),
    "cpu": pytest.param("cpu", id="cpu"),
    "triton": pytest.param("triton", marks=pytest.mark.triton, id="triton"),
    "gemm": pytest.param("gemm", id="gemm"),
    "cuda": pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
    # the CUDA kernel sources run on the CPU under the SIMT emulator (tests/cuda_emulated)
    "emulated": pytest.param("emulated", marks=pytest.mark.emulated, id="emulated"),
}
BACKEND_NAMES = tuple(_BACKEND_PARAMS)


def backends(*names: str) -> list:
    """The parameters (with their marks) of the named backends, for ``@pytest.mark.parametrize("backend", ...)``;
    tests/conftest.py skips those not available here at collection time."""
    return [_BACKEND_PARAMS[n] for n in names]


# The kernel backends, each checked against the reference.
BACKENDS = backends("cpu", "gemm", "triton", "cuda", "emulated")


def _emulator_build():
    here = str(pathlib.Path(__file__).resolve().parent / "cuda_emulated")
    if here not in sys.path:
        sys.path.insert(0, here)
    import build  # tests/cuda_emulated/build.py

    return build


def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot be collected here (None: it can). Reads no CUDA state: see GPU_PRESENT."""
    native = spinal_ops.backends._native_kernel
    if name == "reference":
        return None
    if name == "cpu":
        return None if native("CPU") else "the native extension (C++ CPU kernel) is not built"
    if name == "cuda":
        if not GPU_PRESENT:
            return "no NVIDIA GPU on this machine"
        return None if native("CUDA") else "built without the CUDA kernels"
    if name == "gemm":
        return None if native("CPU") else "the native extension (its argument checks) is not built"
    if name == "triton":
        if not spinal_ops.backends.triton_importable():
            return "Triton is not installed"
        return None if (GPU_PRESENT or INTERPRETED) else "Triton needs a GPU, or TRITON_INTERPRET=1 (set before import)"
    if name == "emulated":
        return None if _emulator_build().cuda_headers_available() else "the CUDA toolkit headers are not installed"
    raise ValueError(f"unknown backend {name!r}")


def require_backend(name: str) -> None:
    """Skip the calling test when backend ``name`` cannot run in this process."""
    if name == "emulated":
        reason = unavailable(name)
        if reason:
            pytest.skip(f"backend 'emulated' not available here: {reason}")
        return
    usable = spinal_ops.available_backends()
    if name not in usable:
        pytest.skip(f"backend {name!r} not available here (available: {', '.join(usable)})")


def device_of(backend: str) -> str:
    """The device of the tensors a backend runs here."""
    if backend == "cuda" or (backend == "triton" and not INTERPRETED):
        return "cuda"
    return "cpu"


def emulator():
    """The emulated CUDA kernels (tests/cuda_emulated: built on first use, then reused)."""
    return _emulator_build().load()


def triton_ops():
    """``torch.ops.spinal_ops`` with the Triton ops (spinal_forward_triton, _spinal_backward_triton) registered:
    importing ``spinal_ops.triton_kernels`` registers them."""
    importlib.import_module("spinal_ops.triton_kernels")
    return torch.ops.spinal_ops


class _EmulatedSpinal(torch.autograd.Function):
    """The emulated CUDA forward and backward kernels as one differentiable op (what the native ops' C++ autograd
    does for the real kernels)."""

    @staticmethod
    def forward(ctx, x, weight_x, weight_h, bias, head_weight, head_bias, hyper):
        H, y = emulator().forward(x, weight_x, weight_h, bias, head_weight, head_bias, *hyper, 0, False)
        ctx.save_for_backward(x, H, weight_x, weight_h, bias, head_weight)
        ctx.hyper = hyper
        ctx.set_materialize_grads(False)
        return H, y

    @staticmethod
    def backward(ctx, grad_h, grad_y):
        x, H, weight_x, weight_h, bias, head_weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:6])
        if head_weight is None:
            grad_y = None
        if grad_h is None and grad_y is None:
            return (None,) * 7
        grads = emulator().backward(grad_y, grad_h, x, H, weight_x, weight_h, bias, head_weight, *ctx.hyper, mask)
        return (*[g if m else None for g, m in zip(grads, mask, strict=True)], None)


def emulated_linear(case: Case, x, weight_x, weight_h, bias=None, head_weight=None, head_bias=None):
    """``spinal_ops.spinal_linear`` for a case on the emulated CUDA kernels."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    starts, slots = case.layer_args()
    H, y = _EmulatedSpinal.apply(x2d, weight_x, weight_h, bias, head_weight, head_bias,
                                 (starts, slots, case.activation, float(case.negative_slope)))
    out = H if head_weight is None else y
    return out.reshape(*x.shape[:-1], out.shape[-1])


def backend_fn(backend: str, case: Case):
    """``fn(x, **params)``: the case's layer on ``backend`` (a spinal_ops backend, or "emulated")."""
    if backend == "emulated":
        return lambda x, **params: emulated_linear(case, x, **params)

    def fn(x, **params):
        with spinal_ops.use_backend(backend):  # a context variable: each thread forces its own backend
            return spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))

    return fn


def upcast(x: torch.Tensor, params: dict):
    """The same values in float64, as fresh leaves with the same layout (strides) as ``x``."""
    x64 = torch.empty_strided(x.shape, x.stride(), dtype=torch.float64, device=x.device)
    x64.copy_(x.detach())
    return x64.requires_grad_(), {k: (v.detach().double().requires_grad_() if v is not None else None)
                                  for k, v in params.items()}


def run_case(backend: str, case: Case, dtype: torch.dtype = torch.float64, *, device: str | None = None,
             seed: int = 0, cot_seed: int = 1, inputs=None, cot_dtype=None) -> dict:
    """Forward and backward of ``case`` on ``backend``: ``{"output": ..., "x": dx, "weight_x": ..., ...}`` (one
    gradient per leaf, None where the output does not depend on it).

    The inputs are :func:`make_inputs` (``dtype``, ``seed``, on ``device``, default :func:`device_of`) unless
    ``inputs=(x, params)`` gives them; the cotangent is :func:`run_and_grad`'s (``cot_seed``, ``cot_dtype``).
    """
    x, params = inputs if inputs is not None else make_inputs(case, dtype, device=device or device_of(backend),
                                                              seed=seed)
    out, grads = run_and_grad(backend_fn(backend, case), x, params, seed=cot_seed, cot_dtype=cot_dtype)
    return {"output": out, **grads}


def check_against_reference(backend: str, case: Case, dtype: torch.dtype = torch.float64, *,
                            device: str | None = None, seed: int = 0, cot_seed: int = 1, inputs=None,
                            what: str | None = None) -> None:
    """The conformance check: the output and every gradient of ``case`` on ``backend`` against the reference,
    under the tolerance rule.

    Expected values: the reference on the very same inputs and cotangent upcast to float64 (exact up to float64
    rounding), and the reference run in ``dtype`` on the same inputs (the error PyTorch itself makes there).
    ``inputs=(x, params)`` replaces :func:`make_inputs` (``dtype``, ``seed``, ``device``); ``what`` prefixes the
    failure messages (default: backend, case and dtype).
    """
    if inputs is None:
        inputs = make_inputs(case, dtype, device=device or device_of(backend), seed=seed)
    x, params = inputs
    dtype = x.dtype
    what = what or f"backend={backend} case={case.id} dtype={DTYPE_NAMES[dtype]}"
    got = run_case(backend, case, inputs=(x, params), cot_seed=cot_seed)
    hi = run_case("reference", case, inputs=upcast(x, params), cot_seed=cot_seed, cot_dtype=dtype)
    same = hi if dtype == torch.float64 else run_case("reference", case, inputs=(x, params), cot_seed=cot_seed)
    out = got["output"]
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}"
    assert out.device == x.device, f"{what}: output on {out.device}, input on {x.device}"
    assert got.keys() == hi.keys(), f"{what}: gradient set {sorted(got)} != {sorted(hi)}"
    for name, expected in hi.items():
        actual = got[name]
        label = "output" if name == "output" else f"d{name}"
        if expected is None:  # weight_h of L = 1 (no recurrence): unused by the reference, and has no elements
            assert actual is None or actual.numel() == 0, f"{what}: {label} must be empty"
            continue
        assert actual is not None, f"{what}: {label} missing"
        assert actual.dtype == dtype, f"{what}: {label} has dtype {actual.dtype}"
        assert_close(actual, expected, same[name], what=f"{what}: {label}")
