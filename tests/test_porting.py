"""Porting the original scripts: weight tying in any pattern, chunks from spatial positions, multi-chain networks.

Each structure of the original repository that a user ports is built here as the original writes it (literal
``nn.Linear`` chains, tests/original.py) and loaded into ``SpinalLinear``; outputs and every gradient must agree.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backends, max_error, require_backend, tolerance
from original import Arch2Head, SpinalResNetHead, TiedRegressionSpinal, packed_grads
from torch import nn

import spinal_ops
from spinal_ops import SpinalLinear

PORTING_BACKENDS = backends("reference", "cpu", "gemm", "triton")


# ------------------------------------------------------------------------------------------------ weight tying


def test_tied_regression_pattern_is_read_from_module_identity():
    """The reported port: fc1, fc2, fc3, fc4, fc3, fc4 gives 4 slots and the original's 8801 parameters."""
    torch.manual_seed(0)
    fc1 = nn.Linear(4, 50)
    fc2, fc3, fc4 = (nn.Linear(54, 50) for _ in range(3))
    sp = SpinalLinear.from_linears(8, [fc1, fc2, fc3, fc4, fc3, fc4], nn.Linear(300, 1), split_mode="alternate",
                                   activation="leaky_relu")
    assert sp.weight_slots == (0, 1, 2, 3, 2, 3)
    assert sp.weight_x.shape == (4, 50, 4) and sp.weight_h.shape == (3, 50, 50)
    original = sum(p.numel() for m in (fc1, fc2, fc3, fc4) for p in m.parameters()) + 301
    assert sum(p.numel() for p in sp.parameters()) == original == 8801
    layers, head = sp.to_linears()
    assert layers[2] is layers[4] and layers[3] is layers[5] and len({id(m) for m in layers}) == 4
    for got, want in zip(layers, [fc1, fc2, fc3, fc4, fc3, fc4], strict=True):
        assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)
    assert "weight_slots=[0, 1, 2, 3, 2, 3]" in repr(sp)


@pytest.mark.parametrize("backend", PORTING_BACKENDS)
def test_tied_regression_trains_like_the_original(backend):
    """Two SGD steps of the original regression net and its port: the tied slots' gradients add up exactly as
    the shared modules' do, so the weights stay equal."""
    require_backend(backend)
    torch.manual_seed(1)
    orig = TiedRegressionSpinal(4, 50, 1).double()
    layers, head = orig.linears()
    port = SpinalLinear.from_linears(8, layers, head, split_mode="alternate", activation="leaky_relu")
    opt_o = torch.optim.SGD(orig.parameters(), lr=0.05)
    opt_p = torch.optim.SGD(port.parameters(), lr=0.05)
    x = torch.randn(40, 8, dtype=torch.float64)
    target = torch.randn(40, 1, dtype=torch.float64)
    for step in range(2):
        for opt, model in ((opt_o, orig), (opt_p, port)):
            opt.zero_grad()
            with spinal_ops.use_backend(backend):
                loss = (model(x) - target).square().mean()
            loss.backward()
        expected = packed_grads(layers, head, port.chunk)
        for name, grad in expected.items():
            assert_close(getattr(port, name).grad, grad, what=f"{backend} step {step}: grad {name}")
        opt_o.step()
        opt_p.step()
    back, _ = port.to_linears()
    for got, want in zip(back, layers, strict=True):
        assert_close(got.weight.detach(), want.weight.detach(), what=f"{backend}: weights after two steps")


def test_weight_slots_constructor_and_state_dict_round_trip():
    a = SpinalLinear(13, 3, layer_width=5, num_splits=3, weight_slots=[0, 1, 2, 1, 2])
    assert a.num_layers == 5 and a.weight_x.shape == (3, 5, 4) and a.weight_h.shape == (2, 5, 5)
    assert not a.shared_weights
    b = SpinalLinear(13, 3, layer_width=5, num_splits=3, weight_slots=(0, 1, 2, 1, 2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 13)
    assert torch.equal(a(x), b(x))
    with pytest.raises(RuntimeError, match="size mismatch"):  # a different number of slots does not load
        SpinalLinear(13, 3, layer_width=5, num_splits=3, num_layers=5).load_state_dict(a.state_dict())
    shared = SpinalLinear(13, 3, layer_width=5, num_splits=3, weight_slots=[0, 1, 1, 1])
    assert shared.shared_weights and shared.weight_x.shape[0] == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_slots=[1, 1, 2]), r"weight_slots\[0\] must be 0"),
    (dict(weight_slots=[0, 0, 1]), r"weight_slots\[1\] must be >= 1: slot 0 belongs to sub-layer 0"),
    (dict(weight_slots=[0, 2, 2]), r"slot\(s\) \[1\] unused"),
    (dict(weight_slots=[0, 1, 2], num_layers=4), r"one entry per sub-layer \(num_layers=4\), got 3"),
    (dict(weight_slots=[0, 1, 1], shared_weights=True), "not both"),
    (dict(weight_slots="012"), "sequence of ints"),
    (dict(weight_slots=[0, 1.5]), "sequence of ints"),
])
def test_bad_weight_slots_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SpinalLinear(13, 3, layer_width=5, num_splits=3, **kwargs)


def test_functional_weight_slots_are_checked_against_the_weights():
    m = SpinalLinear(13, 3, layer_width=5, num_splits=3, weight_slots=[0, 1, 2, 1])
    x = torch.randn(2, 13)
    y = spinal_ops.spinal_linear(x, m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias, num_splits=3,
                                 weight_slots=[0, 1, 2, 1])
    assert torch.equal(y, m(x))
    with pytest.raises(ValueError, match=r"weight slots \[0, 1, 1, 1\] needs weight_x of shape \(2, 5, 4\)"):
        spinal_ops.spinal_linear(x, m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias, num_splits=3,
                                 weight_slots=[0, 1, 1, 1])


def test_native_op_checks_the_slot_table():
    m = SpinalLinear(13, 3, layer_width=5, num_splits=3, weight_slots=[0, 1, 2, 1]).double()
    x = torch.randn(2, 13, dtype=torch.float64)
    args = (x, m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias, m._spec.starts)
    op = torch.ops.spinal_ops.spinal_forward
    for slots, match in (([0, 1, 2], "slots must hold one entry per sub-layer"), ([0, 1, 3, 1], r"slots\[2\] must "
                         r"be in \[1, 3\)"), ([1, 1, 2, 1], r"slots\[0\] must be 0"),
                         ([0, 1, 1, 1], "weight slot 2 is used by no sub-layer")):
        with pytest.raises(RuntimeError, match=match):
            op(*args, slots, "relu", 0.01)


def test_first_sublayer_module_cannot_be_reused():
    fc1, fc2 = nn.Linear(4, 5), nn.Linear(9, 5)
    with pytest.raises(ValueError, match=r"layers\[0\] and layers\[2\] are the same nn.Linear"):
        SpinalLinear.from_linears(8, [fc1, fc2, fc1], nn.Linear(15, 1), split_mode="alternate")


def test_tied_blocks_with_batch_norm_round_trip():
    """Whole blocks (Linear + BatchNorm1d + activation) repeated in the original's pattern."""
    torch.manual_seed(2)
    sp = SpinalLinear(12, 3, layer_width=4, num_splits=2, weight_slots=[0, 1, 2, 1, 2], batch_norm=True,
                      dropout=0.1)
    assert len(sp.norms) == 3
    blocks, head = sp.to_blocks()
    assert blocks[1] is blocks[3] and blocks[2] is blocks[4]
    back = SpinalLinear.from_linears(12, blocks, head, num_splits=2)
    assert back.weight_slots == sp.weight_slots
    for name, p in sp.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), name
    untied_norms = [nn.Sequential(b[1], nn.BatchNorm1d(4), nn.ReLU()) for b in blocks]  # Linears tied, norms not
    with pytest.raises(ValueError, match="BatchNorm1d modules must be tied as the Linears are"):
        SpinalLinear.from_linears(12, untied_norms, head[1], num_splits=2)


# ---------------------------------------------------------------------------------------- spatial positions


@pytest.mark.parametrize("backend", PORTING_BACKENDS)
def test_spatial_chunks_recipe_matches_spinal_resnet(backend):
    """The README recipe: move the channels last and flatten, so that chunk i is spatial position i; then an
    alternate split with one chunk per position. Flattening the map as it is (channels first) would compute
    something else: checked too."""
    require_backend(backend)
    torch.manual_seed(3)
    channels, first_hl = 16, 6
    orig = SpinalResNetHead(channels, first_hl, 10).double()
    port = SpinalLinear.from_linears(4 * channels, [orig.fc1, orig.fc1_1, orig.fc1_2, orig.fc1_3], orig.fc_layer,
                                     num_splits=4, split_mode="alternate")
    out1 = torch.randn(5, channels, 2, 2, dtype=torch.float64)
    a, b = out1.clone().requires_grad_(), out1.clone().requires_grad_()
    expected = orig(a)
    with spinal_ops.use_backend(backend):
        got = port(b.permute(0, 2, 3, 1).flatten(1))  # (B, C, 2, 2) -> (B, 4 * C), position-major
        wrong = port(out1.flatten(1))
    assert_close(got.detach(), expected.detach(), what=f"{backend}: spatial recipe output")
    off = max_error(wrong, expected)
    assert off > tolerance(expected, None, wrong.dtype), (
        f"{backend}: flattening channels-first must not match (the test would be vacuous): max abs error {off:.3e}")
    cot = torch.randn_like(expected)
    expected.backward(cot)
    got.backward(cot)
    assert_close(b.grad, a.grad, what=f"{backend}: spatial recipe grad of the feature map")
    for name, grad in packed_grads([orig.fc1, orig.fc1_1, orig.fc1_2, orig.fc1_3], orig.fc_layer, channels).items():
        assert_close(getattr(port, name).grad, grad, what=f"{backend}: spatial recipe grad {name}")


# ----------------------------------------------------------------------------------- several chains (Arch2)


class Arch2Port(nn.Module):
    """The port: one ``SpinalLinear(head=False)`` per chain (a chain reads one input: several chains cannot be one
    op), then the same classifier layers."""

    def __init__(self, orig: Arch2Head):
        super().__init__()
        self.chains = nn.ModuleList(
            SpinalLinear.from_linears(2 * half, list(lins), None, num_splits=2, split_mode="alternate")
            for lins, half in zip(orig.chains, orig.halves, strict=True))
        self.fc2, self.fc3 = orig.fc2, orig.fc3

    def forward(self, x_conv2, x_conv1, x_raw):
        hs = [chain(x) for chain, x in zip(self.chains, (x_conv2, x_conv1, x_raw), strict=True)]
        return self.fc3(torch.relu(self.fc2(torch.cat([hs[2], hs[1], hs[0]], dim=1))))


@pytest.mark.parametrize("backend", PORTING_BACKENDS)
def test_arch2_is_one_hidden_spinal_layer_per_chain(backend):
    require_backend(backend)
    torch.manual_seed(4)
    orig = Arch2Head().double()
    port = Arch2Port(orig)
    inputs = [torch.randn(6, s, dtype=torch.float64) for s in (12, 20, 16)]
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    expected = orig(*a)
    with spinal_ops.use_backend(backend):
        got = port(*b)
    assert_close(got.detach(), expected.detach(), what=f"{backend}: Arch2 output")
    expected.sum().backward()
    got.sum().backward()
    for k, (ga, gb) in enumerate(zip(a, b, strict=True)):
        assert_close(gb.grad, ga.grad, what=f"{backend}: Arch2 grad of input {k}")
    for k, (chain, lins, half) in enumerate(zip(port.chains, orig.chains, orig.halves, strict=True)):
        for name, grad in packed_grads(list(lins), None, half).items():
            assert_close(getattr(chain, name).grad, grad, what=f"{backend}: Arch2 chain {k} grad {name}")
