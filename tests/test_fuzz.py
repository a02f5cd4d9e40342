"""Property-based tests: every backend reachable in this process equals the reference, forward and every gradient.

Hypothesis draws the sizes (D, K, w, L, B, out), the variant (activation and slope, split mode, shared weights,
head, bias), the dtype, the layout of ``x`` (contiguous, transposed, arbitrary leading dims, non-contiguous
leading dims) and the values' seed; the one check of ``helpers.py`` (``check_against_reference``, under the one
tolerance rule) decides. The expected values are the reference run on the very same inputs and cotangent upcast to
float64 (exact up to float64 rounding) and the reference run in the backend's dtype (the error PyTorch itself makes
there).

Budget: 200 examples on the ``cpu`` backend, 60 on the ``reference`` (against literal ``nn.Linear`` chains
written like the original scripts), 60 on ``triton`` and 30 on its wide path (tiny shapes: the interpreter costs
~0.1 s per call); ten times as many under ``HYPOTHESIS_PROFILE=explore``. A failure prints the smallest example found
and a ``@reproduce_failure`` line; under the "dev" profile (the default outside CI) it also stays in ``.hypothesis/``
and is tried first on the next run; under "ci" every run draws the same examples. See conftest.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPE_NAMES,
    INTERPRETED,
    Case,
    assert_close,
    check_against_reference,
    make_inputs,
    require_backend,
)
from original import CustomizableSpinal, packed_grads

import spinal_ops
from spinal_ops import SpinalLinear, reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXPLORE = settings.get_current_profile_name() == "explore"

LAYOUTS = ("contiguous", "transposed", "lead", "lead-strided")


def _budget(examples: int):
    """``@settings`` with ``examples`` (x10 under "explore"); the rest comes from the loaded profile."""
    return settings(max_examples=examples * (10 if EXPLORE else 1))


# ---------------------------------------------------------------------------------------------- strategies


@st.composite
def problems(draw, *, max_features, max_width, max_layers, max_out, max_rows, tile_rows=()):
    """``(case, lead, layout)``: a Case, the leading dims of ``x`` (``(B,)`` unless the layout is "lead*") and
    the layout of ``x`` (one of LAYOUTS).

    ``B`` is drawn from ``0 .. max_rows``, or from ``tile_rows`` (sizes around a kernel's row tile).
    """
    d = draw(st.integers(1, max_features), label="D")
    k = draw(st.integers(1, min(2 * d - 1, 8)), label="K")
    c = reference.chunk_size(d, k)
    split_mode = draw(st.sampled_from(reference.SPLIT_MODES), label="split_mode")
    if split_mode == "alternate" and k * c > d:  # alternate needs K * c <= D (tested in test_module.py)
        split_mode = "cyclic"
    activation = draw(st.sampled_from(reference.ACTIVATIONS), label="activation")
    slope = 0.01
    if activation == "leaky_relu":
        slope = draw(st.one_of(st.sampled_from([0.01, 0.0, -0.3]), st.floats(-2, 2, width=32)), label="slope")
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    if layout.startswith("lead"):
        lead = tuple(draw(st.lists(st.integers(0, 5), min_size=0 if layout == "lead" else 2, max_size=3),
                          label="lead"))
    else:
        rows = st.integers(0, max_rows)
        lead = (draw(st.one_of(rows, st.sampled_from(tile_rows)) if tile_rows else rows, label="B"),)
    head = draw(st.booleans(), label="head")
    num_layers = draw(st.integers(1, max_layers), label="L")
    tying = draw(st.sampled_from(["own", "shared", "tied"]), label="tying")
    tie = None
    if tying == "tied" and num_layers > 2:  # sub-layer i >= 1 takes a new slot or one of the earlier ones >= 1
        tie = [0, 1]
        for _ in range(2, num_layers):
            tie.append(draw(st.integers(1, max(tie) + 1), label="slot"))
        tie = tuple(tie)
    case = Case(
        rows=math.prod(lead),
        in_features=d,
        num_splits=k,
        width=draw(st.integers(1, max_width), label="w"),
        num_layers=num_layers,
        out=draw(st.integers(1, max_out), label="out") if head else 3,
        split_mode=split_mode,
        activation=activation,
        negative_slope=slope,
        shared=tying == "shared",
        tie=tie,
        bias=draw(st.booleans(), label="bias"),
        head=head,
        layout="transposed" if layout == "transposed" else "contiguous",
    )
    return case, lead, layout


def _shape_input(x: torch.Tensor, lead: tuple, layout: str) -> torch.Tensor:
    """``x`` (a ``(B, D)`` leaf) as a leaf of shape ``(*lead, D)``; non-contiguous leading dims for
    "lead-strided" (the values are laid out with the leading dims reversed, then permuted back)."""
    if not layout.startswith("lead"):
        return x
    d = x.shape[-1]
    if layout == "lead":
        return x.detach().reshape(*lead, d).requires_grad_()
    n = len(lead)
    flipped = x.detach().reshape(*reversed(lead), d)
    return flipped.permute(*reversed(range(n)), n).requires_grad_()


# ------------------------------------------------------------------------------------------------ the check


def fuzz_check(backend: str, case: Case, lead: tuple, layout: str, dtype: torch.dtype, value_seed: int,
               device: str = "cpu") -> None:
    """helpers.check_against_reference on ``x`` of the drawn leading dims and layout."""
    x, params = make_inputs(case, dtype, device=device, seed=value_seed)
    x = _shape_input(x, lead, layout)
    what = (f"backend={backend} case={case.id} x={tuple(x.shape)}{'' if x.is_contiguous() else ' non-contiguous'} "
            f"dtype={DTYPE_NAMES[dtype]} seed={value_seed}")
    note(what)
    check_against_reference(backend, case, inputs=(x, params), what=what)


# ------------------------------------------------------------------------------------------------- backends


CPU_TILE_ROWS = (255, 256, 257, 513)  # several row tiles of the cpu kernel (RowTiles: parallel jobs, a short last one)


@_budget(200)
@given(problem=problems(max_features=40, max_width=24, max_layers=8, max_out=12, max_rows=70,
                        tile_rows=CPU_TILE_ROWS),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       value_seed=st.integers(0, 2**16))
def test_cpu_matches_reference(problem, dtype, value_seed):
    require_backend("cpu")
    fuzz_check("cpu", *problem, dtype, value_seed)


@_budget(60)
@given(problem=problems(max_features=12, max_width=9, max_layers=4, max_out=5, max_rows=20, tile_rows=(65,)),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       value_seed=st.integers(0, 2**16))
def test_triton_matches_reference(problem, dtype, value_seed):
    require_backend("triton")
    fuzz_check("triton", *problem, dtype, value_seed, device="cpu" if INTERPRETED else "cuda")


# The wide path of the Triton kernels (chosen on a GPU for layers whose whole tiles would not fit, see
# triton_kernels/settings.py) forced with 16-wide tiles, so that widths and heads up to 40 span several tiles with a
# masked last one; the config's own choice is what test_triton_matches_reference exercises.
WIDE_TILE = 16


@_budget(30)
@given(problem=problems(max_features=20, max_width=40, max_layers=4, max_out=40, max_rows=20),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       value_seed=st.integers(0, 2**16))
def test_triton_wide_path_matches_reference(problem, dtype, value_seed):
    require_backend("triton")
    from unittest import mock

    from spinal_ops.triton_kernels import settings

    plan = settings.PathPlan(wide=True, block_w=WIDE_TILE, block_o=WIDE_TILE, block_n=WIDE_TILE, block_k=WIDE_TILE)
    with mock.patch.object(settings, "path_plan", lambda width, out, dtype, device=None: plan):
        fuzz_check("triton", *problem, dtype, value_seed, device="cpu" if INTERPRETED else "cuda")


@_budget(60)
@given(problem=problems(max_features=30, max_width=12, max_layers=8, max_out=8, max_rows=20),
       dtype=st.sampled_from([torch.float64, torch.float32]), value_seed=st.integers(0, 2**16))
def test_reference_matches_original_chain(problem, dtype, value_seed):
    """The spec itself against literal ``nn.Linear`` chains written like the original customizable model."""
    case, lead, _ = problem  # x is built here: any leading dims, contiguous
    case = case.replace(split_mode="cyclic")  # the customizable model tiles x: the cyclic split
    torch.manual_seed(value_seed)
    orig = CustomizableSpinal(case.in_features, case.num_splits, case.width, case.num_layers, case.out,
                              activation=case.activation, negative_slope=case.negative_slope, slots=case.slots,
                              head=case.head, bias=case.bias).to(dtype)
    layers, head = orig.linears()
    module = SpinalLinear.from_linears(case.in_features, layers, head, num_splits=case.num_splits,
                                       activation=case.activation, negative_slope=case.negative_slope)
    what = f"backend=reference case={case.id} x={lead + (case.in_features,)} dtype={DTYPE_NAMES[dtype]}"
    note(what)
    x = torch.rand(*lead, case.in_features, dtype=dtype) * 2 - 1
    x_orig, x_sp = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = orig(x_orig.reshape(-1, case.in_features))
    with spinal_ops.use_backend("reference"):
        actual = module(x_sp)
    assert actual.shape == (*lead, expected.shape[-1]), f"{what}: output shape {tuple(actual.shape)}"
    assert_close(actual.detach().reshape(expected.shape), expected.detach(), what=f"{what}: output")
    cot = torch.rand(expected.shape, dtype=dtype) - 0.5
    expected.backward(cot)
    actual.backward(cot.reshape(actual.shape))
    assert_close(x_sp.grad, x_orig.grad, what=f"{what}: dx")
    for name, grad in packed_grads(layers, head, module.chunk).items():
        got = getattr(module, name).grad
        if grad.numel() == 0:  # weight_h of L = 1: unused, no gradient
            assert got is None or got.numel() == 0, f"{what}: d{name} must be empty"
            continue
        assert_close(got, grad, what=f"{what}: d{name}")
