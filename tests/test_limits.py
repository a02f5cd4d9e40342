"""Limits and kernel errors: index arithmetic past 2^31 elements, very large heads, the hard limits of the
kernels (enforced with an error that names the backend and the fallback), and argument errors raised by the
kernel ops themselves (naming the backend, the argument and the supported values)."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, assert_close, backends, check_against_reference, make_inputs, require_backend, triton_ops

from spinal_ops import reference

# ------------------------------------------------------------------------------- index arithmetic past 2^31


def test_cpu_row_offsets_past_2_31_elements():
    """x spans 2^31 + 3 * 2^16 elements (8 GiB of float32 address space), so row offsets ``r * D`` of the last
    rows exceed 2^31. The memory is never written except for the last 3 rows: fresh pages of the OS read as
    zeros without being allocated, so the test needs ~10 MB of RAM. Checked: the forward of those rows (per-tile
    pointer offsets) and the weight gradients, whose GEMMs run over all rows with leading dimension D (32-bit
    BLAS sizes, 64-bit pointer offsets). B >= 2^31 rows is refused (next test)."""
    require_backend("cpu")
    d, extra = 1 << 16, 3
    rows = (1 << 15) + extra
    assert (rows - 1) * d > 2**31
    try:
        x = torch.empty(rows, d)
    except RuntimeError as exc:  # e.g. vm.overcommit_memory = 2
        pytest.skip(f"cannot reserve 8 GiB of address space: {exc}")
    g = torch.Generator().manual_seed(0)
    x[-extra:] = torch.rand(extra, d, generator=g) * 2 - 1
    width, num_layers, out, k = 4, 3, 5, 2
    c = reference.chunk_size(d, k)
    starts = reference.split_starts(d, k, num_layers)
    wx = (torch.rand(num_layers, width, c, generator=g) * 2 - 1) * reference.init_bound(c)
    wh = torch.rand(num_layers - 1, width, width, generator=g) * 2 - 1
    b = torch.rand(num_layers, width, generator=g)
    wo = torch.rand(out, num_layers * width, generator=g)
    bo = torch.rand(out, generator=g)
    hyper = (starts, list(range(num_layers)), "tanh", 0.01)
    what = f"backend=cpu B={rows} D={d} (last row starts at element {(rows - 1) * d}) float32"
    h_all, y = torch.ops.spinal_ops.spinal_forward(x, wx, wh, b, wo, bo, *hyper)
    tail = x[-extra:].clone().requires_grad_()
    ref_h, ref_y = reference.spinal_forward(tail, wx, wh, b, wo, bo, *hyper)
    assert_close(y[-extra:], ref_y.detach(), what=f"{what}: output of the last rows")
    assert_close(h_all[-extra:], ref_h.detach(), what=f"{what}: H of the last rows")
    # Gradients: only the last rows get a non-zero grad_y, so the other rows contribute exact zeros.
    grad_y = torch.zeros(rows, out)
    grad_y[-extra:] = torch.rand(extra, out, generator=g)
    params = [t.clone().requires_grad_() for t in (wx, wh, b, wo, bo)]
    _, ref_y2 = reference.spinal_forward(x[-extra:], *params, *hyper)
    expected = torch.autograd.grad(ref_y2, params, grad_y[-extra:])
    got = torch.ops.spinal_ops._spinal_backward(grad_y, None, x, h_all, wx, wh, b, wo, *hyper,
                                               [False, True, True, True, True, True])
    names = ("weight_x", "weight_h", "bias", "head_weight", "head_bias")
    for name, g_got, g_exp in zip(names, got[1:], expected, strict=True):
        assert_close(g_got, g_exp, what=f"{what}: d{name}")


def test_cpu_refuses_2_31_rows_naming_the_limit_and_the_fallback():
    """The row count is the ``k`` of the weight-gradient GEMMs, a 32-bit integer of the BLAS interface: 2^31 rows
    are refused before any work, by the forward and the backward op. x (one column) and H are address space that
    is never touched."""
    require_backend("cpu")
    rows = 2**31
    try:
        x, h_all = torch.empty(rows, 1), torch.empty(rows, 2)
    except RuntimeError as exc:  # e.g. vm.overcommit_memory = 2
        pytest.skip(f"cannot reserve 24 GiB of address space: {exc}")
    wx, wh, b = torch.zeros(1, 2, 1), torch.zeros(0, 2, 2), torch.zeros(1, 2)
    hyper = ([0], [0], "relu", 0.01)
    match = rf"cpu backend: the number of rows of x \(B\) must be at most 2\^31 - 1.*got {rows}.*reference"
    with pytest.raises(ValueError, match=match):
        torch.ops.spinal_ops.spinal_forward(x, wx, wh, b, None, None, *hyper)
    with pytest.raises(ValueError, match=match):
        torch.ops.spinal_ops._spinal_backward(None, h_all, x, h_all, wx, wh, b, None, *hyper, [True] * 6)


# ------------------------------------------------------------------------------------------- very large heads

LARGE_HEAD = Case(33, 40, 2, 16, 3, out=10_000)


@pytest.mark.parametrize("backend", backends("reference", "cpu"))
def test_head_with_10000_outputs(backend):
    require_backend(backend)
    check_against_reference(backend, LARGE_HEAD, torch.float32, seed=2, cot_seed=3)


# The Triton kernels tile the head over outputs on their wide path (chosen for heads this large): no limit on
# out_features. (w = 100 used to exceed Triton's 2^20-element tile cap with the whole head row in one tile.)
@pytest.mark.triton
@pytest.mark.parametrize("width", [8, 100], ids=["w8", "w100"])
def test_triton_head_with_10000_outputs(width):
    require_backend("triton")
    check_against_reference("triton", Case(3, 20, 2, width, 2, out=10_000), torch.float32, seed=2, cot_seed=3)


# ------------------------------------------------------------------------------- past the old triton tile limits

@pytest.mark.triton
@pytest.mark.parametrize("case", [
    pytest.param(Case(3, 20, 2, 1100, 2), id="w1100"),
    pytest.param(Case(3, 20, 2, 8, 2, out=70_000), id="out70000"),
])
def test_triton_wide_layers_run_and_match_the_reference(case):
    """Past the sizes where a whole width or head row fits one Triton tile (2^20 elements: w > 1024, or
    padded(w) * padded(out) > 2^20) the triton backend runs, on its wide path, and agrees with the reference in
    the output and every gradient. (Its one remaining limit, 32-bit offsets inside a weight tensor, is tested in
    tests/test_triton.py.)"""
    require_backend("triton")
    check_against_reference("triton", case, torch.float32, seed=2, cot_seed=3)


# --------------------------------------------------------------------------------------- errors from the ops


def _op_args(dtype=torch.float32):
    case = Case(7, 13, 3, 5, 4)
    x, p = make_inputs(case, dtype)
    starts = reference.split_starts(case.in_features, case.num_splits, case.num_layers)
    return [x.detach(), *(p[k].detach() for k in ("weight_x", "weight_h", "bias", "head_weight", "head_bias")),
            starts, list(case.slots), "relu", 0.01]


def _set(i, fn):
    def mutate(args):
        args[i] = fn(args[i])

    return mutate


# (id, mutation of the forward op's arguments, what the message must contain after the backend name)
BAD_ARGUMENTS = [
    ("weight_h-shape", _set(2, lambda t: t[:, :, :-1].contiguous()), r"weight_h.*\[3, 5, 5\]"),
    ("weight_x-dtype", _set(1, lambda t: t.double()), r"weight_x.*(Float|float32)"),
    ("start-range", _set(6, lambda s: [0, 4, 99, 0]), r"starts\[2\].*\[0, 13\)"),
    ("slots-range", _set(7, lambda s: [0, 1, 4, 3]), r"slots\[2\] must be in \[1, 4\)"),
    ("activation", _set(8, lambda a: "swish"), r"activation.*relu.*silu.*swish"),
    ("x-layout", _set(0, lambda t: t.t().contiguous().t()), r"x must be contiguous"),
    ("dtype", lambda a: a.__setitem__(slice(0, 6), [t.to(torch.float8_e4m3fn) for t in a[:6]]),
     r"(?=.*[Ff]loat8)(?=.*float32).*(x|dtype)"),
]
OP_BACKENDS = {"cpu": "spinal_forward", "triton": "spinal_forward_triton"}


def _error_cases():
    for backend in OP_BACKENDS:
        for name, mutate, match in BAD_ARGUMENTS:
            yield pytest.param(backend, mutate, match, id=f"{backend}-{name}")


@pytest.mark.parametrize("backend,mutate,match", list(_error_cases()))
def test_op_errors_name_backend_argument_and_supported_values(backend, mutate, match):
    require_backend(backend)
    ops = triton_ops() if backend == "triton" else torch.ops.spinal_ops
    args = _op_args()
    mutate(args)
    op = getattr(ops, OP_BACKENDS[backend])
    with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"{backend} backend.*{match}"):
        op(*args)
