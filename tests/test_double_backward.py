"""Double backward on every backend: gradients of gradients (gradient penalties, Hessian-vector products, MAML).

The backward ops are differentiable through ``reference.spinal_backward`` (the backward written out in
differentiable PyTorch ops). Checked here: that function against autograd of the reference forward; gradgradcheck
in float64 on cpu and triton; second-order gradients of every backend against the reference backend's (which
differentiates the forward twice through plain PyTorch). ``opcheck`` on the backward ops with inputs that require
grad is in tests/test_opcheck.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    GRADCHECK,
    Case,
    assert_close,
    backends,
    device_of,
    functional_kwargs,
    make_inputs,
    require_backend,
)

import spinal_ops
from spinal_ops import reference

PARAMS = ("weight_x", "weight_h", "bias", "head_weight", "head_bias")
SECOND_ORDER_BACKENDS = backends("cpu", "gemm", "triton", "cuda")
DEVICE = {name: device_of(name) for name in ("cpu", "gemm", "triton", "cuda")}

# Every activation (each act' is differentiated), head and hidden mode, tied slots, wrapping chunks, no bias.
SECOND_ORDER_CASES = [
    Case(5, 13, 3, 4, 4, activation="tanh"),
    Case(4, 9, 2, 3, 3, activation="sigmoid", head=False),
    Case(4, 10, 2, 3, 5, activation="gelu", tie=(0, 1, 2, 1, 2)),
    Case(3, 7, 2, 3, 3, activation="silu", shared=True, bias=False),
    Case(4, 8, 2, 5, 6, activation="leaky_relu", negative_slope=0.1, tie=(0, 1, 2, 3, 2, 3), split_mode="alternate"),
    Case(3, 8, 2, 3, 3, activation="leaky_relu", negative_slope=-0.2),
    Case(4, 8, 2, 3, 3, activation="relu"),
    Case(4, 8, 2, 3, 2, activation="identity"),
]
GRADGRAD_CASES = [c for c in SECOND_ORDER_CASES if c.activation not in ("relu", "leaky_relu")]  # smooth everywhere


def spinal_linear_of(case, x, params):
    return spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))


def _second_order(case: Case, backend: str, device: str):
    """Gradients of ``|dL/dx|^2 + |dL/dW|^2`` (L = a fixed random projection of the output) w.r.t. x and all
    parameters: a gradient penalty on every input, differentiated once more."""
    x, params = make_inputs(case, torch.float64, device=device, seed=5)
    leaves = {"x": x, **{k: v for k, v in params.items() if v is not None}}
    with spinal_ops.use_backend(backend):
        y = spinal_linear_of(case, x, params)
    cot = torch.rand(y.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device)
    first = torch.autograd.grad((y * cot).sum(), list(leaves.values()), create_graph=True, allow_unused=True)
    penalty = sum(g.square().sum() for g in first if g is not None)
    second = torch.autograd.grad(penalty, list(leaves.values()), allow_unused=True)
    return dict(zip(leaves, second, strict=True))


@pytest.mark.parametrize("case", SECOND_ORDER_CASES, ids=lambda c: c.id)
def test_reference_backward_is_autograd_of_the_forward(case):
    x, params = make_inputs(case, torch.float64, seed=2)
    p = [params[k] for k in PARAMS]
    starts, slots = case.layer_args()
    H, y = reference.spinal_forward(x, *p, starts, slots, case.activation, case.negative_slope)
    g = torch.Generator().manual_seed(3)
    grad_h = torch.rand(H.shape, generator=g, dtype=torch.float64)
    grad_y = torch.rand(y.shape, generator=g, dtype=torch.float64) if case.head else None
    outs = (H, y) if case.head else (H,)
    cots = (grad_h, grad_y) if case.head else (grad_h,)
    leaves = [t for t in [x, *p[:4]] if t is not None]
    expected = dict(zip(["x", *[k for k in PARAMS[:4] if params[k] is not None]],
                        torch.autograd.grad(outs, leaves, cots, allow_unused=True), strict=True))
    got = reference.spinal_backward(grad_y, grad_h, x, H, *p[:4], starts, slots, case.activation,
                                    case.negative_slope, [True] * 6)
    for name, g in zip(["x", "weight_x", "weight_h", "bias", "head_weight", "head_bias"], got, strict=True):
        if name in expected:
            e = expected[name] if expected[name] is not None else torch.zeros_like(g)
            assert_close(g, e, what=f"reference.spinal_backward {case.id}: d{name}")
    if case.head:
        assert_close(got[5], grad_y.sum(0), what=f"reference.spinal_backward {case.id}: dhead_bias")


@pytest.mark.parametrize("backend", SECOND_ORDER_BACKENDS)
@pytest.mark.parametrize("case", SECOND_ORDER_CASES, ids=lambda c: c.id)
def test_second_order_gradients_match_the_reference(backend, case):
    require_backend(backend)
    device = DEVICE[backend]
    expected = _second_order(case, "reference", device)
    got = _second_order(case, backend, device)
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        g = got[name]
        if e is None:
            assert g is None or not g.any(), f"{backend} {case.id}: d2/d{name} should be zero"
            continue
        assert_close(g, e, what=f"{backend} {case.id}: second-order gradient of {name}")


def _gradgradcheck(case: Case, backend: str, names) -> bool:
    """gradgradcheck over ``x`` and the parameters ``names`` (the others held constant)."""
    x, params = make_inputs(case, torch.float64, device=DEVICE[backend], seed=4)
    fixed = {k: (v.detach() if v is not None else None) for k, v in params.items()}

    def fn(x_, *tensors):
        with spinal_ops.use_backend(backend):
            return spinal_linear_of(case, x_, {**fixed, **dict(zip(names, tensors, strict=True))})

    return torch.autograd.gradgradcheck(fn, (x, *[params[k] for k in names]), **GRADCHECK)


@pytest.mark.parametrize("backend", backends("cpu", "cuda"))
@pytest.mark.parametrize("case", GRADGRAD_CASES, ids=lambda c: c.id)
def test_gradgradcheck(backend, case):
    require_backend(backend)
    case = case.replace(rows=2)
    assert _gradgradcheck(case, backend, [k for k in PARAMS if k != "bias" or case.bias])


# The interpreter runs a few hundred launches per gradgradcheck input element: two tiny problems, every tensor
# kind (input, input weight, recurrent weight, head) once.
@pytest.mark.triton
@pytest.mark.parametrize("case,names", [
    (Case(2, 5, 2, 2, 3, out=2, activation="tanh", tie=(0, 1, 1)), ["weight_h", "head_weight"]),
    (Case(1, 5, 2, 2, 3, activation="gelu", head=False), ["weight_x"]),
], ids=lambda v: v.id if isinstance(v, Case) else "-".join(v))
def test_gradgradcheck_triton(case, names):
    require_backend("triton")
    assert _gradgradcheck(case, "triton", names)
