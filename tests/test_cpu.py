"""The fused C++ CPU backend against the reference: outputs, every gradient, gradcheck, opcheck, compile."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CASES,
    COLUMN_SPLIT_CASES,
    Case,
    assert_close,
    functional_kwargs,
    make_inputs,
    require_backend,
    run_and_grad,
)

import spinal_ops
from spinal_ops import SpinalLinear, reference

pytestmark = pytest.mark.usefixtures("_cpu_backend")


@pytest.fixture
def _cpu_backend():
    require_backend("cpu")


def _run(backend, case, x, params):
    def fn(x, **p):
        with spinal_ops.use_backend(backend):
            return spinal_ops.spinal_linear(x, **p, **functional_kwargs(case))

    return run_and_grad(fn, x, params)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES + COLUMN_SPLIT_CASES, ids=[c.id for c in CASES + COLUMN_SPLIT_CASES])
def test_matches_reference(case, dtype):
    x, params = make_inputs(case, dtype)
    out, grads = _run("cpu", case, x, params)
    x64, p64 = make_inputs(case, torch.float64)
    ref_out, ref_grads = _run("reference", case, x64, p64)
    same_out, same_grads = _run("reference", case, x, params) if dtype != torch.float64 else (ref_out, ref_grads)
    what = f"cpu/{case.id}/{dtype}"
    assert_close(out, ref_out, same_out, what=f"{what} output")
    for name, ref in ref_grads.items():
        if ref is None:  # weight_h of L = 1 has no elements
            assert grads[name] is None or grads[name].numel() == 0, f"{what} grad {name}: expected empty"
            continue
        assert_close(grads[name], ref, same_grads[name], what=f"{what} grad {name}")


GRADCHECK = [
    Case(3, 7, 2, 3, 3, activation=act, head=head, shared=shared, negative_slope=0.3)
    for act in reference.ACTIVATIONS
    for head in (True, False)
    for shared in (False, True)
] + [Case(3, 7, 2, 3, 5, tie=(0, 1, 2, 1, 2), activation="tanh")]


@pytest.mark.parametrize("case", GRADCHECK, ids=[c.id for c in GRADCHECK])
def test_gradcheck(case):
    x, params = make_inputs(case, torch.float64, seed=3)
    names = [k for k, v in params.items() if v is not None]

    def fn(x, *tensors):
        with spinal_ops.use_backend("cpu"):
            return spinal_ops.spinal_linear(x, **dict(zip(names, tensors, strict=False)), **functional_kwargs(case))

    assert torch.autograd.gradcheck(fn, (x, *[params[n] for n in names]), eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(case, dtype=torch.float64):
    x, p = make_inputs(case, dtype)
    starts, slots = case.layer_args()
    return (x.detach().requires_grad_(), p["weight_x"], p["weight_h"], p["bias"], p["head_weight"], p["head_bias"],
            starts, slots, case.activation, case.negative_slope)


OPCHECK = [CASES[0], CASES[6], CASES[7], CASES[8].replace(layout="contiguous"), CASES[10]]


@pytest.mark.parametrize("case", OPCHECK, ids=[c.id for c in OPCHECK])
def test_opcheck_forward(case):
    torch.library.opcheck(torch.ops.spinal_ops.spinal_forward.default, _op_args(case))


@pytest.mark.parametrize("case", OPCHECK, ids=[c.id for c in OPCHECK])
@pytest.mark.parametrize("mask", [[True] * 6, [True, False, False, False, False, False],
                                  [False, True, True, True, True, True]], ids=["all", "dx", "weights"])
def test_opcheck_backward(case, mask):
    x, wx, wh, b, wo, bo, starts, slots, act, slope = _op_args(case)
    h_all, y = torch.ops.spinal_ops.spinal_forward(x, wx, wh, b, wo, bo, starts, slots, act, slope)
    grad_y = torch.randn_like(y) if wo is not None else None
    grad_h = torch.randn_like(h_all)
    mask = [m and t is not None for m, t in zip(mask, (x, wx, wh, b, wo, bo), strict=False)]
    args = (grad_y, grad_h, x.detach(), h_all.detach(), wx.detach(), wh.detach(), b.detach() if b is not None else None,
            wo.detach() if wo is not None else None, starts, slots, act, slope, mask)
    torch.library.opcheck(torch.ops.spinal_ops._spinal_backward.default, args)
    grads = torch.ops.spinal_ops._spinal_backward(*args)
    for wanted, g, t in zip(mask, grads, (x, wx, wh, b, wo, bo), strict=False):
        assert (g.shape == t.shape) if wanted else g.numel() == 0, "output mask not honoured"


def test_backward_matches_reference_on_its_own():
    case = CASES[4]
    x, wx, wh, b, wo, bo, starts, slots, act, slope = _op_args(case)
    h_all, y = reference.spinal_forward(x, wx, wh, b, wo, bo, starts, slots, act, slope)
    grad_y, grad_h = torch.randn_like(y), torch.randn_like(h_all)
    expected = torch.autograd.grad((h_all, y), (x, wx, wh, b, wo, bo), (grad_h, grad_y))
    got = torch.ops.spinal_ops._spinal_backward(grad_y, grad_h, x.detach(), h_all.detach(), wx.detach(), wh.detach(),
                                               b.detach(), wo.detach(), starts, slots, act, slope, [True] * 6)
    names = ("x", "weight_x", "weight_h", "bias", "head_weight", "head_bias")
    for name, g, e in zip(names, got, expected, strict=False):
        assert_close(g, e, what=f"cpu backward op grad {name} (grad_y and grad_H both given)")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 20)
        self.head = SpinalLinear(20, 5, layer_width=7, num_layers=3, num_splits=3, activation="gelu")

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    net = _Net()
    compiled = torch.compile(net, fullgraph=True, backend="inductor")
    for rows in (8, 13):  # a new batch size after the first compile
        x = torch.randn(rows, 6)
        eager = net(x)
        (g_eager,) = torch.autograd.grad(eager.square().sum(), [net.head.weight_x])
        with spinal_ops.use_backend("cpu"):
            got = compiled(x)
        (g_got,) = torch.autograd.grad(got.square().sum(), [net.head.weight_x])
        assert_close(got.detach(), eager.detach(), what=f"compiled cpu forward rows={rows}")
        assert_close(g_got, g_eager, what=f"compiled cpu backward rows={rows}")


def test_saves_only_x_and_H():
    case = Case(33, 40, 2, 6, 5, out=4)
    x, params = make_inputs(case, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), spinal_ops.use_backend("cpu"):
        spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
    known = {x.data_ptr()} | {p.data_ptr() for p in params.values() if p is not None}  # views of x count as x
    extra = sum(t.numel() for t in saved if t.data_ptr() not in known)
    assert extra <= case.rows * case.num_layers * case.width, f"saved {extra} values beyond x and the weights"


def test_nan_stays_in_its_row():
    m = SpinalLinear(10, 3, layer_width=4, num_layers=5)
    x = torch.randn(6, 10)
    x[2, 7] = float("nan")
    with spinal_ops.use_backend("cpu"):
        y = m(x)
    assert torch.isnan(y[2]).all()
    assert not torch.isnan(y[[0, 1, 3, 4, 5]]).any()


def test_many_rows_match_reference():
    m = SpinalLinear(12, 4, layer_width=5, num_layers=3, dtype=torch.float64)
    x = torch.randn(70_000, 12, dtype=torch.float64)
    with spinal_ops.use_backend("cpu"):
        got = m(x)
    with spinal_ops.use_backend("reference"):
        ref = m(x)
    assert_close(got, ref, what="cpu 70,000 rows")


@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10), (3, 4, 10)], ids=["empty", "empty-3d", "3d"])
def test_leading_dims_like_linear(shape):
    m = SpinalLinear(10, 3, layer_width=4, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    with spinal_ops.use_backend("cpu"):
        y = m(x)
    assert y.shape == (*shape[:-1], 3)
    with spinal_ops.use_backend("reference"):
        ref = m(x)
    assert_close(y, ref, what=f"cpu leading dims {shape}")
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_other_dtypes_go_to_the_reference_or_raise_when_forced():
    m = SpinalLinear(10, 3, layer_width=4, dtype=torch.bfloat16)
    x = torch.randn(2, 10, dtype=torch.bfloat16)
    assert spinal_ops.backends.select_backend(x.device, x.dtype) == "reference"
    with spinal_ops.use_backend("reference"):
        expected = m(x)
    assert torch.equal(m(x), expected)
    with pytest.raises(RuntimeError, match="'cpu' cannot run cpu tensors of dtype torch.bfloat16.*float32 and float64"):
        with spinal_ops.use_backend("cpu"):
            m(x)
    with pytest.raises(RuntimeError, match="x must be float32 or float64, got BFloat16"):  # the op itself checks too
        torch.ops.spinal_ops.spinal_forward(x, m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias,
                                            [0, 5, 0, 5], [0, 1, 2, 3], "relu", 0.01)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(2, a[2][:, :-1].contiguous()),
         r"weight_h must have shape \[3, 5, 5\], got \[3, 4, 5\]"),
        (lambda a: a.__setitem__(1, a[1].float()), "weight_x must have the dtype of x \\(Double\\), got Float"),
        (lambda a: a.__setitem__(6, [0, 4, 99, 0, 0]), r"starts\[2\] must be in \[0, 13\), got 99"),
        (lambda a: a.__setitem__(8, "swish"), "activation must be one of .*got 'swish'"),
        (lambda a: a.__setitem__(0, a[0].t()), "x must be 2-D|x must be contiguous"),
    ],
    ids=["weight_h-shape", "weight_x-dtype", "start-range", "activation", "x-layout"],
)
def test_op_argument_errors(mutate, match):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(CASES[0])]
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.spinal_ops.spinal_forward(*args)
