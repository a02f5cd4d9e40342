"""Shared test helpers: the one sample generator and the one tolerance rule.

Tolerance rule (flash-attention's): a kernel's error against the float64 reference may be at most twice the
error of the reference computed in the kernel's own dtype, plus a small floor per dtype (relative to the
largest magnitude of the expected tensor). In float64 the reference-in-dtype *is* the float64 reference, so
the floor alone applies: agreement to rounding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import spinal_ops
from spinal_ops import reference

# Floors, relative to max |expected|, one per dtype.
FLOOR = {
    torch.float64: 1e-12,  # sums of <= ~1e4 products: rounding is ~1e-13 relative
    torch.float32: 1e-5,  # a different summation order than the reference in float32, ~1e-6 seen
    torch.float16: 2e-3,  # one half-precision ulp at the output scale is ~1e-3
    torch.bfloat16: 1.6e-2,  # one bfloat16 ulp is 2^-7 ~ 7.8e-3; allow two
}


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


# Tiny, regular and awkward shapes: odd D and w, K not dividing D, wrap, L = 1, B in {0, 1, 7, 257}.
CASES = [
    Case(7, 13, 3, 5, 4),  # D = 13, K = 3: c = 4, chunks wrap
    Case(1, 16, 2, 8, 4, split_mode="alternate"),  # the classic halves
    Case(0, 10, 2, 3, 3),  # empty batch
    Case(257, 9, 2, 7, 5, activation="tanh"),  # c = round(4.5) = 4, odd everything
    Case(7, 24, 8, 3, 10, activation="leaky_relu", negative_slope=0.2),  # K = 8, wrap many times
    Case(5, 11, 2, 6, 1),  # L = 1: no recurrence
    Case(7, 12, 3, 4, 5, shared=True, activation="sigmoid"),
    Case(7, 12, 3, 4, 6, head=False, activation="gelu"),
    Case(7, 15, 4, 5, 4, bias=False, activation="silu", layout="transposed"),
    Case(7, 10, 2, 4, 3, activation="identity", layout="3d"),
    # tied weights in the regression scripts' pattern (fc1, fc2, fc3, fc4, fc3, fc4): slots 2 and 3 serve two
    # sub-layers each; D = 13, c = 4: chunks wrap
    Case(7, 13, 3, 5, 6, tie=(0, 1, 2, 3, 2, 3), activation="leaky_relu", negative_slope=0.1),
]

# One-tile batches wide enough that the cpu kernel splits each sub-layer's products into column blocks
# (csrc/cpu/spinal_cpu.cpp, ColumnSplit: B <= 256 rows, a product of >= 2^18 multiply-adds, >= 128 columns):
# w = 200 -> 3 blocks (80, 80, 40); c = round(150.5) = 150 -> 2 blocks (80, 70), the first straddling the wrap of
# the chunk starting at column 300 of 301; w = 131 -> 2 blocks (80, 51), c = 128 -> 2 blocks (64, 64).
COLUMN_SPLIT_CASES = [
    Case(7, 301, 2, 200, 3, activation="gelu"),  # Z and carry split (recomputed Z), dx not (210k products)
    Case(64, 301, 2, 200, 3, shared=True, head=False, activation="tanh"),  # Z, carry and dx split
    Case(9, 257, 2, 131, 4, bias=False, activation="leaky_relu", negative_slope=-0.1),  # Z split only
]


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


def tolerance(expected_hi: torch.Tensor, expected_same: torch.Tensor, dtype: torch.dtype) -> float:
    """The allowed max-abs error: ``2 * err(reference in dtype) + FLOOR[dtype] * max|expected|``."""
    scale = expected_hi.abs().max().item() if expected_hi.numel() else 0.0
    base = (expected_same.double() - expected_hi.double()).abs().max().item() if expected_hi.numel() else 0.0
    return 2 * base + FLOOR[dtype] * max(scale, 1.0)


def assert_close(actual, expected_hi, expected_same=None, *, what: str) -> None:
    """Assert ``actual`` is within :func:`tolerance` of ``expected_hi`` (the float64 reference).

    ``expected_same`` is the reference computed in ``actual``'s dtype (defaults to ``expected_hi``, which
    gives the floor alone). ``what`` names backend, case and tensor in the failure message.
    """
    if expected_same is None:
        expected_same = expected_hi
    assert actual is not None, f"{what}: gradient missing"
    assert actual.shape == expected_hi.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected_hi.shape)}"
    if actual.numel() == 0:
        return
    tol = tolerance(expected_hi, expected_same, actual.dtype)
    err = (actual.double() - expected_hi.double()).abs()
    nan_ok = torch.isnan(actual.double()) == torch.isnan(expected_hi.double())
    assert bool(nan_ok.all()), f"{what}: NaN pattern differs from the reference ({actual.dtype})"
    worst = err.nan_to_num(0.0).max().item()
    assert worst <= tol, f"{what}: max abs error {worst:.3e} > tolerance {tol:.3e} ({actual.dtype})"


def run_and_grad(fn, x, params, seed=1):
    """Run ``fn(x, **params)``, backpropagate a fixed random cotangent; return ``(out, grads by name)``."""
    out = fn(x, **params)
    g = torch.Generator().manual_seed(seed)
    cot = (torch.rand(out.shape, generator=g, dtype=torch.float64) * 2 - 1).to(out.dtype)
    leaves = {"x": x, **{k: v for k, v in params.items() if v is not None}}
    grads = torch.autograd.grad(out, list(leaves.values()), cot.to(out.device), allow_unused=True)
    return out.detach(), dict(zip(leaves.keys(), grads, strict=False))


def require_backend(name: str) -> None:
    """Skip the calling test when backend ``name`` cannot run in this process."""
    usable = spinal_ops.available_backends()
    if name not in usable:
        pytest.skip(f"backend {name!r} not available here (available: {', '.join(usable)})")
