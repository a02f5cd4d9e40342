"""Dropout and BatchNorm1d heads, autocast, and swapping a model's head.

The dropout / batch-norm heads are compared with literal ``nn.Sequential`` blocks written like the VGG and
transfer-learning scripts (``Dropout -> Linear -> BatchNorm1d -> ReLU`` per sub-layer, ``Dropout -> Linear``
head), loaded with ``SpinalLinear.from_linears``: train mode runs unfused and must match them bit for bit
(same seed, same dropout masks); eval mode folds the batch norms into the fused weights and must match to
rounding on every backend.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import assert_close, backends
from original import BlockHead, packed_grads
from torch import nn

import spinal_ops
from spinal_ops import SpinalLinear, reference


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One dropout / batch-norm head built as the scripts write it (BlockHead) and as a SpinalLinear."""

    name: str
    in_features: int  # D
    num_splits: int  # K
    width: int  # w
    num_layers: int  # L
    out: int
    dropout: float
    batch_norm: bool
    activation: str
    shared: bool
    head: bool
    split: str  # "halves" or "tiled" (BlockHead)


HEADS = {h.name: h for h in [
    HeadSpec("vgg-halves", 16, 2, 6, 4, 5, 0.5, True, "relu", False, True, "halves"),
    HeadSpec("tiled-K3-leaky", 13, 3, 5, 5, 3, 0.3, True, "leaky_relu", False, True, "tiled"),
    HeadSpec("shared", 12, 2, 4, 5, 3, 0.25, True, "relu", True, True, "tiled"),
    HeadSpec("hidden-tanh", 11, 2, 5, 3, 0, 0.2, True, "tanh", False, False, "tiled"),
    HeadSpec("dropout-only", 10, 2, 4, 3, 4, 0.5, False, "relu", False, True, "tiled"),
    HeadSpec("batchnorm-only", 10, 2, 4, 3, 4, 0.0, True, "gelu", False, True, "tiled"),
]}


def _build(spec: HeadSpec, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    orig = BlockHead(spec.in_features, spec.num_splits, spec.width, spec.num_layers, spec.out, spec.dropout,
                     batch_norm=spec.batch_norm, activation=spec.activation, negative_slope=0.2, shared=spec.shared,
                     head=spec.head, split=spec.split).to(dtype)
    with torch.no_grad():  # non-trivial batch-norm state, so that folding has something to fold
        for n in orig.norms():
            n.weight.uniform_(0.5, 1.5)
            n.bias.uniform_(-0.5, 0.5)
            n.running_mean.uniform_(-0.3, 0.3)
            n.running_var.uniform_(0.5, 2.0)
    return orig, SpinalLinear.from_linears(spec.in_features, orig.blocks(), orig.fc_out, num_splits=orig.num_splits,
                                           split_mode="cyclic" if orig.split == "tiled" else "alternate")


def _grads(model_params, x):
    return [x.grad] + [p.grad for p in model_params]


def _norm_pairs(spec: HeadSpec, orig: BlockHead, spinal: SpinalLinear) -> list:
    """``(original, spinal)`` batch norms, one pair per distinct original module (shared blocks repeat one),
    after asserting that the layer has batch norms exactly where the spec has them, as many as the original."""
    expected = list(dict.fromkeys(orig.norms()))
    if not spec.batch_norm:
        assert not expected and not spinal.norms, f"{spec.name}: batch norms without batch_norm in the spec"
        return []
    assert expected and spinal.norms is not None and len(spinal.norms) == len(expected), (
        f"{spec.name}: {0 if spinal.norms is None else len(spinal.norms)} batch norms, the original has "
        f"{len(expected)}")
    return list(zip(expected, spinal.norms, strict=True))


def _reads_of_a_column(spec: HeadSpec) -> int:
    """How many sub-layers read one column of x, at most."""
    c = int(np.round(spec.in_features / spec.num_splits))  # BlockHead's chunk
    if spec.split == "halves":
        return math.ceil(spec.num_layers / spec.num_splits)
    return math.ceil(spec.num_layers * c / spec.in_features)


@pytest.mark.parametrize("spec", list(HEADS.values()), ids=lambda h: h.name)
def test_train_mode_matches_original_blocks_bitwise(spec):
    """Output, parameter gradients, batch-norm statistics and gradients bit for bit the original's. So is dx where
    a column of x feeds at most two sub-layers; where it feeds three or more, its gradients are summed in another
    order than autograd sums the original's (a + b + c grouped differently), so dx is compared to rounding."""
    orig, spinal = _build(spec)
    orig.train()
    spinal.train()
    x = torch.randn(9, spec.in_features, dtype=torch.float64)
    for step in range(2):  # two steps: running statistics are updated the same way too
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        ya = orig(xa)
        torch.manual_seed(100 + step)
        yb = spinal(xb)
        assert torch.equal(ya, yb), f"{spec.name} step {step}: train-mode output differs from the original blocks " \
            f"(max diff {(ya - yb).abs().max().item():.3e})"
        ya.square().sum().backward()
        yb.square().sum().backward()
        if _reads_of_a_column(spec) <= 2:
            assert torch.equal(xb.grad, xa.grad), f"{spec.name} train step {step}: grad x not bitwise equal"
        else:
            assert_close(xb.grad, xa.grad, what=f"{spec.name} train step {step} grad x")
    layers, head = orig.linears()
    expected = packed_grads(layers, head, orig.chunk)
    got = dict(spinal.named_parameters())
    for name, ref in expected.items():
        assert torch.equal(got[name].grad, ref), (
            f"{spec.name} train grad {name} (accumulated over two steps) not bitwise equal "
            f"(max diff {(got[name].grad - ref).abs().max().item():.3e})")
    for i, (a, b) in enumerate(_norm_pairs(spec, orig, spinal)):
        pairs = {"running_mean": (a.running_mean, b.running_mean), "running_var": (a.running_var, b.running_var),
                 "weight grad": (a.weight.grad, b.weight.grad), "bias grad": (a.bias.grad, b.bias.grad)}
        for name, (ref, val) in pairs.items():
            assert torch.equal(val, ref), f"{spec.name} batch norm {i} {name} not bitwise equal"
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) >= 2, (
            f"{spec.name} batch norm {i}: {int(b.num_batches_tracked)} batches tracked, original "
            f"{int(a.num_batches_tracked)}")


@pytest.mark.parametrize("backend", backends("reference", "cpu", "triton"))
@pytest.mark.parametrize("spec", list(HEADS.values()), ids=lambda h: h.name)
def test_eval_mode_folds_batch_norm_on_every_backend(spec, backend, monkeypatch):
    if backend not in spinal_ops.available_backends():
        pytest.skip(f"backend {backend!r} not available here")
    orig, spinal = _build(spec)
    orig.eval()
    spinal.eval()

    def unfused(*args, **kwargs):
        raise AssertionError("eval mode ran the unfused blocks instead of the fused op")

    monkeypatch.setattr(reference, "spinal_forward_blocks", unfused)
    x = torch.randn(7, spec.in_features, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya = orig(xa)
    with spinal_ops.use_backend(backend):
        yb = spinal(xb)
    what = f"{spec.name}/{backend} eval"
    assert_close(yb.detach(), ya.detach(), what=f"{what} output")
    _assert_backward_matches(spec, orig, spinal, (xa, ya), (xb, yb), what)


def _assert_backward_matches(spec: HeadSpec, orig, spinal: SpinalLinear, original: tuple, layer: tuple, what: str):
    """One backward of the same random cotangent through the original blocks and the layer (each an ``(x, y)`` pair):
    the gradients of x, of the packed weights and of the batch norms' affine parameters within the tolerance rule."""
    (xa, ya), (xb, yb) = original, layer
    cot = torch.randn(ya.shape, dtype=ya.dtype)
    ya.backward(cot)
    yb.backward(cot)
    assert_close(xb.grad, xa.grad, what=f"{what} grad x")
    layers, head = orig.linears()
    got = dict(spinal.named_parameters())
    for name, ref in packed_grads(layers, head, orig.chunk).items():
        assert_close(got[name].grad, ref, what=f"{what} grad {name}")
    for i, (a, b) in enumerate(_norm_pairs(spec, orig, spinal)):
        assert_close(b.weight.grad, a.weight.grad, what=f"{what} grad batch norm {i} weight")
        assert_close(b.bias.grad, a.bias.grad, what=f"{what} grad batch norm {i} bias")


def _folded_in_graph(spinal: SpinalLinear, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode layer with its batch norms folded by plain autograd ops (reference.fold_batch_norm's default)."""
    wx, wh, b = reference.fold_batch_norm(spinal.weight_x, spinal.weight_h, spinal.bias, *spinal._batch_norm_affine())
    return spinal_ops.ops.run(x, (wx, wh, b, spinal.head_weight, spinal.head_bias), spinal._spec, "folded in graph")


def _step_grads(model, call, x, cot) -> dict:
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    call(model, xg).backward(cot)
    return {"x": xg.grad} | {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture
def fold_rows_at_any_size(monkeypatch):
    """ops._fold_rows for the small weights of these tests too (it takes weights of FOLD_ROWS_MIN_BYTES and more),
    and for the layers whose batch norms would fold out of weight_x (SpinalLinear._folds_columns)."""
    monkeypatch.setattr(spinal_ops.ops, "FOLD_ROWS_MIN_BYTES", 0)
    monkeypatch.setattr(SpinalLinear, "_folds_columns", lambda self, scale, shift: False)


def _buffer_pointers(spinal: SpinalLinear) -> set[int]:
    return {buffer.data_ptr() for kept in spinal.__dict__["_fold_buffers"].entries.values() for buffer, _ in kept}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("spec", [HEADS["vgg-halves"], HEADS["shared"], HEADS["hidden-tanh"]], ids=lambda h: h.name)
def test_eval_mode_training_steps_fold_into_kept_buffers(spec, dtype, fold_rows_at_any_size):
    """Eval-mode batch norms with autograd fold into buffers reused from step to step, and the fold's backward (the
    _scale_rows_backward_inplace op on CPU, in place on the layer op's gradient) gives the gradients of the fold in
    plain autograd ops: the weights' gradients bit for bit (one product per element in both), the batch norms'
    within the tolerance rule (row sums in another order)."""
    _, pointers = _steps_match_in_graph_fold(spec, dtype, _folded_in_graph)
    assert len(pointers) == 2, f"{spec.name}: the folded weight_x and weight_h took {len(pointers)} buffers in 3 steps"


def _steps_match_in_graph_fold(spec: HeadSpec, dtype, in_graph) -> tuple[SpinalLinear, set[int]]:
    """Three eval-mode steps with autograd of a layer and of its copy run through ``in_graph`` (the same fold in plain
    autograd ops): every gradient bit for bit the copy's, the batch norms' within the tolerance rule. Returns the
    layer and the data pointers of the fold buffers it held over the steps."""
    _, spinal = _build(spec, dtype=dtype)
    spinal.eval()
    ref = copy.deepcopy(spinal)
    pointers = set()
    for step in range(3):
        x = torch.randn(6, spec.in_features, dtype=dtype)
        cot = torch.randn(6, spec.out or spec.num_layers * spec.width, dtype=dtype)
        got = _step_grads(spinal, lambda m, xg: m(xg), x, cot)
        want = _step_grads(ref, in_graph, x, cot)
        assert got.keys() == want.keys()
        for name, g in got.items():
            what = f"{spec.name} {dtype} step {step} grad {name}"
            if name.startswith("norms."):
                assert_close(g, want[name], what=what)
            else:
                assert torch.equal(g, want[name]), f"{what}: not bit for bit the in-graph fold's"
        pointers |= _buffer_pointers(spinal)
    return spinal, pointers


def test_eval_mode_two_forwards_before_one_backward_fold_into_two_buffers(fold_rows_at_any_size):
    """A product a live graph still holds is never overwritten: the second call folds into a buffer of its own."""
    _, spinal = _build(HEADS["vgg-halves"], dtype=torch.float64)
    spinal.eval()
    ref = copy.deepcopy(spinal)
    x = torch.randn(5, 16, dtype=torch.float64)

    def twice(model, xg, call):
        return call(model, xg) + 2 * call(model, 0.5 * xg)

    got = _step_grads(spinal, lambda m, xg: twice(m, xg, lambda mm, v: mm(v)), x, torch.ones(5, 5, dtype=torch.float64))
    want = _step_grads(ref, lambda m, xg: twice(m, xg, _folded_in_graph), x, torch.ones(5, 5, dtype=torch.float64))
    for name, g in got.items():
        assert_close(g, want[name], what=f"two forwards, one backward: grad {name}")
    kept = spinal.__dict__["_fold_buffers"].entries
    assert sorted(len(v) for v in kept.values()) == [2, 2] and len(_buffer_pointers(spinal)) == 4, (
        "the two products of each weight did not get buffers of their own")


@pytest.mark.parametrize("fold", ["into weight_x", "out of weight_x"])
def test_eval_mode_fold_is_twice_differentiable(fold, monkeypatch):
    """create_graph through the fold (ops._fold_rows, rows or columns): the first derivatives (x, the weights, the batch
    norms) and the second (of their squared norms, with respect to the weights and batch norms) are the in-graph
    fold's."""
    monkeypatch.setattr(spinal_ops.ops, "FOLD_ROWS_MIN_BYTES", 0)
    in_graph = _folded_out_of_weight_x_in_graph
    if fold == "into weight_x":
        monkeypatch.setattr(SpinalLinear, "_folds_columns", lambda self, scale, shift: False)
        in_graph = _folded_in_graph
    _, spinal = _build(HEADS["tiled-K3-leaky"], dtype=torch.float64)
    spinal.eval()
    ref = copy.deepcopy(spinal)
    x = torch.randn(4, 13, dtype=torch.float64)
    grads = {}
    for name, model, call in (("fold_rows", spinal, lambda m, v: m(v)), ("in graph", ref, in_graph)):
        xg = x.clone().requires_grad_()
        params = [p for p in model.parameters() if p.requires_grad]
        first = torch.autograd.grad(call(model, xg).square().sum(), [xg, *params], create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), params, allow_unused=True)
        grads[name] = [g.detach() for g in first], second
    for order, (got, want) in enumerate(zip(grads["fold_rows"], grads["in graph"], strict=True), start=1):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert (a is None) == (b is None), f"derivative {order}, input {i}: present in one only"
            if a is not None:
                assert_close(a, b, what=f"derivative {order}, input {i}")


def test_eval_mode_fold_buffers_follow_the_weights(fold_rows_at_any_size):
    """The fold's buffers take the weights' device and dtype (not torch's default device), and .to() / .double()
    drops them with the inference fold, so no copy of the old weights stays alive."""
    _, spinal = _build(HEADS["vgg-halves"], dtype=torch.float32)
    spinal.eval()
    x = torch.randn(3, 16)
    with torch.device("meta"):  # a default device other than the weights'
        spinal(x).sum().backward()
    assert {b.device.type for kept in spinal.__dict__["_fold_buffers"].entries.values() for b, _ in kept} == {"cpu"}
    with torch.no_grad():
        spinal(x)
    spinal.double()
    assert "_fold_buffers" not in spinal.__dict__ and "_fold_cache" not in spinal.__dict__
    spinal(x.double()).sum().backward()
    assert {b.dtype for kept in spinal.__dict__["_fold_buffers"].entries.values() for b, _ in kept} == {torch.float64}


HIDDEN_RELU = HeadSpec("hidden-relu", 11, 2, 5, 3, 0, 0.2, True, "relu", False, False, "tiled")
IDENTITY = dataclasses.replace(HEADS["vgg-halves"], name="vgg-halves-identity", activation="identity")


def _set_norm_weight(spec: HeadSpec, orig, spinal, value: float) -> None:
    """Entry 2 of batch norm 1's weight set to ``value`` in the original blocks and in the layer."""
    with torch.no_grad():
        for norm in _norm_pairs(spec, orig, spinal)[1]:
            norm.weight[2] = value


def _record_folds(monkeypatch) -> list:
    """The folds the layer runs, in order: "columns" (reference.fold_batch_norm_columns) or "rows" (fold_batch_norm)."""
    taken = []

    def spy(real, tag):
        def fold(*args, **kwargs):
            taken.append(tag)
            return real(*args, **kwargs)
        return fold

    for name, tag in (("fold_batch_norm_columns", "columns"), ("fold_batch_norm", "rows")):
        monkeypatch.setattr(reference, name, spy(getattr(reference, name), tag))
    return taken


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("case, spec, weight, fold", [
    ("relu", HEADS["vgg-halves"], None, ["columns"]),
    ("leaky_relu", HEADS["tiled-K3-leaky"], None, ["columns"]),
    ("no head", HIDDEN_RELU, None, ["columns"]),
    ("identity", IDENTITY, None, ["columns"]),
    ("a negative scale", HEADS["vgg-halves"], -0.7, ["rows"]),
    ("a zero scale", HEADS["vgg-halves"], 0.0, ["rows"]),
    ("shift / scale overflows", HEADS["vgg-halves"], 1e-320, ["rows"]),
    ("tied slots", HEADS["shared"], None, ["rows"]),
    ("tanh", HEADS["hidden-tanh"], None, ["rows"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_eval_mode_folds_batch_norm_out_of_weight_x_where_it_can(case, spec, weight, fold, grad, monkeypatch):
    """Eval-mode batch norms fold out of weight_x (reference.fold_batch_norm_columns) where the activation is positively
    homogeneous, every scale positive, shift / scale finite and no slot tied, and into it (fold_batch_norm) otherwise;
    either way the layer matches the original blocks: the output and, with autograd, every gradient."""
    orig, spinal = _build(spec)
    if weight is not None:
        _set_norm_weight(spec, orig, spinal, weight)
    orig.eval()
    spinal.eval()
    taken = _record_folds(monkeypatch)
    x = torch.randn(6, spec.in_features, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        ya, yb = orig(xa), spinal(xb)
    assert taken == fold, f"{case}: folds {taken}, expected {fold}"
    assert_close(yb.detach(), ya.detach(), what=f"{case} output")
    if grad:
        _assert_backward_matches(spec, orig, spinal, (xa, ya), (xb, yb), case)


def _folded_out_of_weight_x_in_graph(spinal: SpinalLinear, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode layer with its batch norms folded out of weight_x by plain autograd ops."""
    weight_h, bias, head_weight, out_scale = reference.fold_batch_norm_columns(
        spinal.weight_h, spinal.bias, spinal.head_weight, *spinal._batch_norm_affine())
    out = spinal_ops.ops.run(x, (spinal.weight_x, weight_h, bias, head_weight, spinal.head_bias), spinal._spec,
                             "folded out of weight_x in graph")
    return out if out_scale is None else out * out_scale


@pytest.mark.parametrize("spec", [HEADS["vgg-halves"], HIDDEN_RELU], ids=lambda h: h.name)
def test_eval_mode_training_steps_fold_columns_into_kept_buffers(spec, monkeypatch):
    """Folded out of weight_x with autograd, the weight_h product goes into a buffer reused from step to step
    (ops._fold_rows with columns), and its backward (_scale_rows_backward_inplace with columns) gives the gradients
    of the same fold in plain autograd ops: bit for bit but the batch norms' (column sums in another order)."""
    monkeypatch.setattr(spinal_ops.ops, "FOLD_ROWS_MIN_BYTES", 0)
    spinal, pointers = _steps_match_in_graph_fold(spec, torch.float64, _folded_out_of_weight_x_in_graph)
    kept = spinal.__dict__["_fold_buffers"].entries
    assert list(kept) == [(tuple(spinal.weight_h.shape), torch.float64, True)] and len(pointers) == 1, (
        f"{spec.name}: buffers {list(kept)}, {len(pointers)} in 3 steps; expected one, for weight_h's columns")


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's fallback for the spinal op
def test_eval_mode_fold_under_vmap(fold_rows_at_any_size):
    """Under a functorch transform the fold is the plain product (the Function has no vmap rule): vmap of the layer
    equals the layer on the whole batch."""
    _, spinal = _build(HEADS["vgg-halves"], dtype=torch.float64)
    spinal.eval()
    x = torch.randn(4, 16, dtype=torch.float64)
    mapped = torch.func.vmap(spinal)(x.unsqueeze(1)).squeeze(1)
    assert_close(mapped, spinal(x).detach(), what="vmap of the eval-mode layer with autograd on")


@pytest.mark.parametrize("variant", ["same eps", "one eps differs", "no affine", "mixed affine"])
def test_batch_norm_affine_is_each_norms_own(variant):
    """SpinalLinear._batch_norm_affine (stacked over the slots, or per norm where eps or the affine parameters differ)
    gives, row by row, what each BatchNorm1d computes in eval mode: z * scale + shift == norm(z), bit for bit the
    per-norm formula."""
    torch.manual_seed(0)
    m = SpinalLinear(20, 3, layer_width=5, num_layers=4, batch_norm=True, dtype=torch.float64)
    if variant in ("no affine", "mixed affine"):
        m.norms = nn.ModuleList(nn.BatchNorm1d(5, affine=variant == "mixed affine" and i % 2 == 0).double()
                                for i in range(len(m.norms)))
    for i, n in enumerate(m.norms):
        with torch.no_grad():
            n.running_mean.uniform_(-1, 1)
            n.running_var.uniform_(0.2, 3)
            if n.weight is not None:
                n.weight.uniform_(-2, 2)
                n.bias.uniform_(-1, 1)
        if variant == "one eps differs" and i == 2:
            n.eps = 1e-3
    m.eval()
    scale, shift = m._batch_norm_affine()
    z = torch.randn(7, 5, dtype=torch.float64)
    for j, n in enumerate(m.norms):
        s = 1.0 / torch.sqrt(n.running_var + n.eps)
        s = s * n.weight if n.weight is not None else s
        t = -n.running_mean * s + (n.bias if n.bias is not None else 0)
        assert torch.equal(scale[j], s) and torch.equal(shift[j], t), f"{variant}: slot {j} differs from its norm's"
        assert_close(z * scale[j] + shift[j], n(z), what=f"{variant}: slot {j} vs BatchNorm1d (eval)")


def test_fold_batch_norm_is_exact_in_float64():
    torch.manual_seed(0)
    L, w, c = 3, 4, 5
    wx, wh, b = torch.randn(L, w, c, dtype=torch.float64), torch.randn(L - 1, w, w, dtype=torch.float64), None
    bn = [nn.BatchNorm1d(w).double().eval() for _ in range(L)]
    for n in bn:
        with torch.no_grad():
            n.weight.uniform_(0.5, 2)
            n.bias.uniform_(-1, 1)
            n.running_mean.uniform_(-1, 1)
            n.running_var.uniform_(0.1, 3)
    m = SpinalLinear(9, 2, bias=False, layer_width=w, num_layers=L, batch_norm=True, dtype=torch.float64)
    m.norms = nn.ModuleList(bn)
    scale, shift = m._batch_norm_affine()
    fx, fh, fb = reference.fold_batch_norm(wx, wh, b, scale, shift)
    x, h = torch.randn(6, c, dtype=torch.float64), torch.randn(6, w, dtype=torch.float64)
    for i in range(L):
        z = x @ wx[i].T + (h @ wh[i - 1].T if i else 0)
        folded = x @ fx[i].T + (h @ fh[i - 1].T if i else 0) + fb[i]
        assert_close(folded, bn[i](z), what=f"folded sub-layer {i} vs Linear -> BatchNorm1d (eval)")


def test_dropout_zero_and_no_batch_norm_keep_the_fast_path(monkeypatch):
    m = SpinalLinear(10, 3, dropout=0.0, batch_norm=False)
    assert m.norms is None and m._blocks is False

    def slow(*args, **kwargs):
        raise AssertionError("the plain layer left the fused fast path")

    monkeypatch.setattr(SpinalLinear, "_forward_blocks", slow)
    m(torch.randn(4, 10))
    assert set(m.state_dict()) == {"weight_x", "weight_h", "bias", "head_weight", "head_bias"}


def test_dropout_is_random_in_train_mode_and_identity_in_eval():
    m = SpinalLinear(20, 4, layer_width=8, dropout=0.5)
    plain = SpinalLinear(20, 4, layer_width=8)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(64, 20)
    m.train()
    a, b = m(x), m(x)
    assert not torch.equal(a, b), "two train-mode calls with dropout gave the same output"
    m.eval()
    assert torch.equal(m(x), plain(x)), "eval-mode dropout is not the identity on the fused path"
    m.dropout = 0.0
    m.train()
    assert m._blocks is False and torch.equal(m(x), plain(x)), "setting dropout = 0 did not restore the fast path"


def test_batch_norm_state_dict_and_modes():
    a = SpinalLinear(13, 3, layer_width=5, num_splits=3, dropout=0.1, batch_norm=True)
    a.train()
    a(torch.randn(16, 13))  # moves the running statistics
    keys = set(a.state_dict())
    for k in ("norms.0.weight", "norms.0.bias", "norms.3.running_mean", "norms.3.running_var",
              "norms.3.num_batches_tracked"):
        assert k in keys, f"{k} missing from the state dict: {sorted(keys)}"
    b = SpinalLinear(13, 3, layer_width=5, num_splits=3, dropout=0.1, batch_norm=True)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    assert all(not n.training for n in b.norms), ".eval() did not reach the batch norms"
    x = torch.randn(4, 13)
    assert torch.equal(a(x), b(x)), "eval outputs differ after a state_dict round trip"
    assert "dropout=0.1" in repr(a) and "BatchNorm1d(5" in repr(a)


def test_frozen_batch_norm_in_train_mode_runs_fused(monkeypatch):
    m = SpinalLinear(12, 3, layer_width=4, batch_norm=True).double()
    with torch.no_grad():
        for n in m.norms:
            n.running_mean.uniform_(-1, 1)
            n.running_var.uniform_(0.5, 2)
    m.train()
    m.norms.eval()  # the usual fine-tuning trick: freeze the statistics
    x = torch.randn(5, 12, dtype=torch.float64)
    unfused = reference.spinal_forward_blocks(x, m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias,
                                              m._spec.starts, m._spec.slot_list, "relu", 0.01, norms=m.norms)

    def boom(*args, **kwargs):
        raise AssertionError("frozen batch norms without dropout ran unfused")

    monkeypatch.setattr(reference, "spinal_forward_blocks", boom)
    assert_close(m(x).detach(), unfused.detach(), what="frozen batch norm, fused vs unfused")


@pytest.mark.parametrize("spec", list(HEADS.values()), ids=lambda h: h.name)
def test_to_blocks_round_trip_is_exact(spec):
    _, spinal = _build(spec)
    layers, head = spinal.to_blocks()
    assert (layers[1] is layers[-1]) == spec.shared
    back = SpinalLinear.from_linears(spec.in_features, layers, head, num_splits=spec.num_splits,
                                     split_mode=spinal.split_mode)
    assert back.dropout == spinal.dropout and (back.norms is None) == (spinal.norms is None)
    assert back.activation == spinal.activation and back.negative_slope == spinal.negative_slope
    for (name, p), (_, q) in zip(spinal.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(p, q), f"{spec.name}: {name} differs after to_blocks -> from_linears"
    with pytest.raises(ValueError, match="use to_blocks"):
        spinal.to_linears()


def _blocks(p_first=0.5, p_rest=0.5, bn=(True, True, True), act=nn.ReLU):
    def blk(fan_in, p, with_bn):
        return nn.Sequential(*([nn.Dropout(p)] if p else []), nn.Linear(fan_in, 4),
                             *([nn.BatchNorm1d(4)] if with_bn else []), act())

    return [blk(5, p_first, bn[0]), blk(9, p_rest, bn[1]), blk(9, p_rest, bn[2])]


@pytest.mark.parametrize(
    "layers,head,kwargs,error,match",
    [
        (_blocks(p_rest=0.3), None, {}, ValueError, r"one dropout probability.*layers\[0\]: 0.5, layers\[1\]: 0.3"),
        (_blocks(), nn.Linear(12, 3), {}, ValueError, r"one dropout probability.*head: 0.0"),
        (_blocks(bn=(True, False, True)), None, {}, ValueError, r"every sub-layer or of none; missing in layers\[1\]"),
        (_blocks(), None, {"activation": "tanh"}, ValueError, r"activation='tanh' but the blocks hold ReLU"),
        ([nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5))], None, {}, ValueError,
         r"layers\[0\] must be nn.Sequential\(\[Dropout,\] Linear.*got nn.Sequential\(Linear, Dropout\)"),
        (_blocks(), nn.Sequential(nn.Dropout(0.5), nn.Linear(12, 3), nn.ReLU()), {}, ValueError,
         r"head must be nn.Sequential\(\[Dropout,\] Linear\); got nn.Sequential\(Dropout, Linear, ReLU\)"),
        ([nn.Conv1d(5, 4, 1)], None, {}, TypeError, r"layers\[0\] must be nn.Linear or nn.Sequential.*Conv1d"),
    ],
    ids=["dropout-mismatch", "head-without-dropout", "batch-norm-missing", "activation-conflict", "block-order",
         "head-with-activation", "not-a-block"],
)
def test_from_blocks_errors_name_the_block(layers, head, kwargs, error, match):
    with pytest.raises(error, match=match):
        SpinalLinear.from_linears(10, layers, head, **kwargs)


def test_bad_dropout_probability():
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\], got 1.5"):
        SpinalLinear(10, 3, dropout=1.5)


# ---------------------------------------------------------------------------------------------------- autocast


def _autocast_dtypes():
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            pass
        dtypes.append(torch.float16)
    except RuntimeError:
        pass
    return dtypes


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["f32-input", "bf16-input"])
@pytest.mark.parametrize("dtype", _autocast_dtypes(), ids=str)
def test_autocast_computes_in_the_autocast_dtype_like_nn_linear(dtype, input_dtype):
    m = SpinalLinear(13, 3, layer_width=5, num_splits=3)
    x = torch.randn(6, 13).to(input_dtype)
    with torch.autocast("cpu", dtype=dtype):
        expected_dtype = nn.Linear(13, 3)(x).dtype
        y = m(x)
        y_functional = spinal_ops.spinal_linear(x, m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias,
                                                num_splits=3)
    assert expected_dtype == dtype
    assert y.dtype == expected_dtype, f"autocast {dtype}: SpinalLinear returned {y.dtype}, nn.Linear {expected_dtype}"
    assert y_functional.dtype == expected_dtype, f"autocast {dtype}: spinal_linear returned {y_functional.dtype}"
    params = [t.detach() for t in (m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias)]
    args = (m._spec.starts, m._spec.slot_list, "relu", 0.01)
    x64 = x.detach().double()
    hi = reference.spinal_forward(x64, *[t.double() for t in params], *args)[1]
    same = reference.spinal_forward(x.to(dtype), *[t.to(dtype) for t in params], *args)[1]
    assert_close(y.detach(), hi, same, what=f"autocast {dtype} output")
    assert_close(y_functional.detach(), hi, same, what=f"autocast {dtype} functional output")
    y.float().sum().backward()
    assert m.weight_x.grad.dtype == torch.float32, f"parameter gradient has dtype {m.weight_x.grad.dtype}"


def test_autocast_leaves_float64_alone_like_nn_linear():
    m = SpinalLinear(10, 3).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nn.Linear(10, 3).double()(x).dtype == torch.float64
        y = m(x)
    assert y.dtype == torch.float64, f"float64 under autocast became {y.dtype}"
    assert torch.equal(y, m(x))


def test_autocast_off_inside_an_autocast_region():
    m = SpinalLinear(10, 3)
    x = torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            y = m(x)
    assert y.dtype == torch.float32 and torch.equal(y, m(x))


@pytest.mark.parametrize("spec", [HEADS["vgg-halves"], HIDDEN_RELU], ids=lambda h: h.name)
@pytest.mark.parametrize("train", [True, False], ids=["train-unfused", "eval-folded"])
def test_autocast_with_batch_norm_heads(train, spec):
    orig, spinal = _build(spec, dtype=torch.float32)
    orig.train(train)
    spinal.train(train)
    x = torch.randn(8, spec.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        ya = orig(x)
        torch.manual_seed(3)
        yb = spinal(x)
    assert yb.dtype == ya.dtype == torch.bfloat16, f"original gives {ya.dtype}, SpinalLinear {yb.dtype}"
    if train:  # the same ops in the same order: identical
        assert torch.equal(ya, yb), f"train-mode autocast output differs, max {(ya - yb).abs().max().item():.3e}"
    else:  # folded weights rounded to bfloat16: the tolerance rule, against the original blocks in float64 (the
        # original under the same autocast is the reference computed in bfloat16)
        hi = copy.deepcopy(orig).double()(x.double())
        assert_close(yb, hi.detach(), ya.detach(), what="eval-mode autocast output (folded batch norms)")


# ---------------------------------------------------------------------------------------------- head swapping


class _ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.body(x))


class _VGGLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 12)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(16, 7))

    def forward(self, x):
        return self.classifier(self.features(x))


class _ViTLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.head = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize(
    "make,name,out,getter",
    [
        (_ResNetLike, "fc", 5, lambda m: m.fc),
        (_VGGLike, "classifier.4", 7, lambda m: m.classifier[4]),
        (_VGGLike, "classifier[-1]", 7, lambda m: m.classifier[-1]),
        (_ViTLike, "head", 4, lambda m: m.head),
        (_ViTLike, "blocks[1]", 4, lambda m: m.blocks[1]),  # the output goes through head
    ],
    ids=["fc", "classifier.4", "classifier[-1]", "head-nobias", "blocks[1]"],
)
def test_replace_linear_swaps_the_named_layer(make, name, out, getter):
    model = make().double().eval()
    old = getter(model)
    new = spinal_ops.replace_linear(model, name, num_layers=3)
    assert getter(model) is new, f"{name}: the model does not hold the returned layer"
    assert isinstance(new, SpinalLinear) and new.num_layers == 3
    assert (new.in_features, new.out_features) == (old.in_features, old.out_features)
    assert new.weight_x.dtype == torch.float64 and new.weight_x.device == old.weight.device
    assert (new.bias is None) == (old.bias is None) and not new.training
    y = model(torch.randn(3, 6, dtype=torch.float64))
    assert y.shape == (3, out)
    assert sum(1 for m in model.modules() if m is old) == 0, f"{name}: the old Linear is still in the model"


@pytest.mark.parametrize(
    "name,error,match",
    [
        ("classifier.9", AttributeError, r"no submodule 'classifier.9' \('classifier' is Sequential with children: "
                                         r"0, 1, 2, 3, 4\)"),
        ("head", AttributeError, r"no submodule 'head' \(the model is _VGGLike with children: features, classifier\)"),
        ("classifier[5]", IndexError, r"index 5 in 'classifier\[5\]' is out of range: 'classifier' is Sequential "
                                      r"with 5 children"),
        ("classifier[-2]", TypeError, r"'classifier\[-2\]' is Dropout, not nn.Linear"),
        ("classifier", TypeError, r"'classifier' is Sequential, not nn.Linear"),
        ("classifier..4", ValueError, r"cannot parse module path 'classifier..4'"),
    ],
    ids=["missing-index-name", "missing-attribute", "index-out-of-range", "not-linear", "container", "bad-path"],
)
def test_replace_linear_errors_name_the_path(name, error, match):
    model = _VGGLike()
    with pytest.raises(error, match=match):
        spinal_ops.replace_linear(model, name)


def test_replace_linear_then_train_a_step():
    torch.manual_seed(0)
    model = _VGGLike()
    spinal_ops.replace_linear(model, "classifier[-1]", dropout=0.2, batch_norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(8, 6), torch.randint(0, 7, (8,))
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    head = model.classifier[-1]
    assert head.weight_x.grad is not None and head.norms[0].weight.grad is not None
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name}: not finite after the step"
        assert not torch.equal(p, before[name]), f"{name}: unchanged by the step"


# ------------------------------------------------------------------------------- folded weights for inference


def test_inference_folds_once_and_refolds_when_a_source_changes(monkeypatch):
    _, spinal = _build(HEADS["vgg-halves"], dtype=torch.float32)
    spinal.eval()
    calls = []
    real = SpinalLinear._fold

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(SpinalLinear, "_fold", counting)
    x = torch.randn(5, 16)

    def fresh():  # what folding now gives, without the cache
        with torch.enable_grad():
            return spinal(x).detach()

    with torch.no_grad():
        first = spinal(x)
        assert torch.equal(spinal(x), first) and len(calls) == 1, f"folded {len(calls)} times for two calls"
        changes = [
            lambda: spinal.norms[1].running_var.mul_(2.0),  # in place: a new version
            lambda: spinal.weight_x.add_(0.1),
            lambda: spinal.head_weight.mul_(1.5),  # folded into when the batch norms fold out of weight_x
            lambda: setattr(spinal.norms[0], "eps", 0.5),  # a number
            lambda: spinal.load_state_dict({k: v * 1.5 if v.is_floating_point() else v
                                            for k, v in spinal.state_dict().items()}),
        ]
        for i, change in enumerate(changes):
            before = spinal(x)
            change()
            after = spinal(x)
            assert not torch.equal(before, after), f"change {i}: inference reused stale folded weights"
            assert torch.equal(after, fresh()), f"change {i}: refolded weights differ from a fresh fold"
    with torch.inference_mode():
        assert torch.equal(spinal(x), fresh())


def test_folded_weights_with_autograd_are_in_the_graph_and_never_cached():
    _, spinal = _build(HEADS["vgg-halves"], dtype=torch.float32)
    spinal.eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        spinal(x)  # a cached fold must not be what autograd sees
    spinal(x).sum().backward()
    assert spinal.norms[0].weight.grad is not None and spinal.weight_x.grad is not None
    copied = copy.deepcopy(spinal).__dict__
    assert "_fold_cache" not in copied and "_fold_buffers" not in copied
