"""``torch.func`` transforms and forward-mode AD through ``SpinalLinear``: the automatic choice runs ``reference``
inside them (``spinal_ops.backends.autograd_transformed``), so every transform works and agrees with the fused
backend's reverse-mode gradients outside them."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import assert_close
from torch.func import functional_call, grad, jacrev, jvp, vmap

import spinal_ops
from spinal_ops import SpinalLinear, backends


def _layer(**kw):
    torch.manual_seed(0)
    return SpinalLinear(18, 3, layer_width=5, num_layers=4, num_splits=3, **kw).double()


def _x(rows=6):
    return torch.randn(rows, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["plain", "eval batch norm"])
def layer(request):
    if request.param == "plain":
        return _layer(activation="tanh")
    m = _layer(dropout=0.25, batch_norm=True)
    with torch.no_grad():
        for n in m.norms:
            n.running_mean.uniform_(-0.5, 0.5)
            n.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_the_automatic_choice_inside_a_transform_is_reference():
    seen = []

    def f(a):
        seen.append(backends.select_backend("cpu", a.dtype))
        return a.sum()

    grad(f)(_x())
    vmap(f)(_x())
    with fwAD.dual_level():
        f(fwAD.make_dual(_x(), _x()))
    with spinal_ops.use_backend("cpu"):  # a forced backend stays forced
        grad(f)(_x())
    assert seen == ["reference", "reference", "reference", "cpu"]
    assert backends.select_backend("cpu", torch.float64) == "cpu"  # outside: the fused kernels


def test_func_grad_matches_autograd_of_the_fused_backend(layer):
    x = _x()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    got = grad(lambda p, a: functional_call(layer, p, (a,)).square().sum(), argnums=(0, 1))(params, x)
    xg = x.clone().requires_grad_()
    loss = layer(xg).square().sum()  # the cpu backend, reverse mode
    want = torch.autograd.grad(loss, [xg, *layer.parameters()])
    names = [name for name, _ in layer.named_parameters()]
    assert_close(got[1], want[0], what="dx")
    for name, w in zip(names, want[1:], strict=True):
        assert_close(got[0][name], w, what=name)


def _jacobian_times(layer, x, t):
    """J t from reverse mode on the fused backend: one backward per output element."""
    xg = x.clone().requires_grad_()
    y = layer(xg)
    rows = []
    for k in range(y.numel()):
        (g,) = torch.autograd.grad(y.reshape(-1)[k], xg, retain_graph=True)
        rows.append((g * t).sum())
    return torch.stack(rows).reshape(y.shape)


def test_jvp_and_forward_mode_ad_match_reverse_mode(layer):
    x, t = _x(3), _x(3).flip(0)
    want = _jacobian_times(layer, x, t)
    _, tangent = jvp(layer, (x,), (t,))
    assert_close(tangent, want, what="torch.func.jvp")
    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x, t))
        assert_close(fwAD.unpack_dual(y).tangent, want, what="forward_ad")
    jac = jacrev(layer)(x)  # (3, out, 3, D)
    assert_close(torch.einsum("iojd,jd->io", jac, t), want, what="jacrev")


def test_vmap_and_per_sample_gradients(layer):
    x = _x()
    assert_close(vmap(layer)(x.unsqueeze(1)).squeeze(1), layer(x).detach(), what="vmap")
    params = {k: v.detach() for k, v in layer.named_parameters()}
    per_sample = vmap(grad(lambda p, a: functional_call(layer, p, (a.unsqueeze(0),)).sum()), in_dims=(None, 0))(
        params, x)
    for r in range(x.shape[0]):
        want = torch.autograd.grad(layer(x[r:r + 1]).sum(), list(layer.parameters()))
        for (name, _), w in zip(layer.named_parameters(), want, strict=True):
            assert_close(per_sample[name][r], w, what=f"{name} of sample {r}")


def test_a_forced_fused_backend_inside_a_transform_raises():
    layer, x = _layer(), _x()
    with spinal_ops.use_backend("cpu"), pytest.raises(RuntimeError, match="functorch"):
        grad(lambda a: layer(a).sum())(x)


def test_forward_mode_ad_through_the_kept_fold_buffers():
    """Dual weights in an eval-mode batch-norm layer whose weights take the kept fold buffers (1 MB or more on CPU,
    ``ops._fold_rows``): the fold is the plain product under forward-mode AD, and the tangent matches reverse mode's
    (``torch.autograd.functional.jvp``, the double-backward trick on the fused backend)."""
    torch.manual_seed(0)
    layer = SpinalLinear(1024, 3, layer_width=256, num_layers=2, batch_norm=True).double().eval()
    with torch.no_grad():
        for n in layer.norms:
            n.running_var.uniform_(0.5, 2.0)
    assert layer.weight_x.numel() * layer.weight_x.element_size() >= 1 << 20
    x = _x(2).repeat(1, 57)[:, :1024]
    params = {k: v.detach() for k, v in layer.named_parameters()}
    v = torch.randn_like(params["weight_x"])

    def f(w):
        return functional_call(layer, {**params, "weight_x": w}, (x,))

    with fwAD.dual_level():
        got = fwAD.unpack_dual(f(fwAD.make_dual(params["weight_x"], v))).tangent
    _, want = torch.autograd.functional.jvp(f, params["weight_x"], v)
    assert_close(got, want, what="forward_ad tangent, weights through the fold")
