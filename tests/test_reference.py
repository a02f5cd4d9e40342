"""The reference (and every backend) against original-style nn.Linear chains, loaded with from_linears."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backends, require_backend
from original import CustomizableSpinal, HalvesHead, TiedRegressionSpinal, packed_grads

import spinal_ops
from spinal_ops import SpinalLinear, reference

# (id, constructor of the original module, from_linears keyword arguments, rows)
ORIGINALS = [
    ("halves-D16-w5", lambda: HalvesHead(16, 5, 3), dict(num_splits=2, split_mode="alternate"), 9),
    ("halves-D13-w4", lambda: HalvesHead(13, 4, 2), dict(num_splits=2, split_mode="alternate"), 5),
    ("cyclic-K8-wrap", lambda: CustomizableSpinal(20, 8, 4, 11, 3), dict(num_splits=8), 6),  # c = 2 (round 2.5), wraps
    ("cyclic-D13-K3", lambda: CustomizableSpinal(13, 3, 5, 6, 4), dict(num_splits=3), 7),
    ("shared", lambda: CustomizableSpinal(12, 2, 4, 5, 3, shared=True), dict(num_splits=2), 7),
    ("L31", lambda: CustomizableSpinal(10, 2, 3, 31, 2), dict(num_splits=2), 4),
    ("L1", lambda: CustomizableSpinal(10, 2, 3, 1, 2), dict(num_splits=2), 4),
    ("hidden", lambda: CustomizableSpinal(14, 2, 6, 4, 0, head=False), dict(num_splits=2), 5),
    ("leaky-regression", lambda: CustomizableSpinal(8, 2, 50, 6, 1, "leaky_relu", 0.1),
     dict(num_splits=2, activation="leaky_relu", negative_slope=0.1), 33),
    # the regression script as written: fc1, fc2, fc3, fc4, fc3, fc4 (tied), LeakyReLU, alternating halves
    ("tied-regression", lambda: TiedRegressionSpinal(4, 50, 1),
     dict(num_splits=2, split_mode="alternate", activation="leaky_relu"), 33),
    ("gelu-nobias", lambda: CustomizableSpinal(9, 2, 4, 3, 2, "gelu", bias=False),
     dict(num_splits=2, activation="gelu"), 5),
]


@pytest.mark.parametrize("backend", backends("reference", "cpu", "gemm", "triton"))
@pytest.mark.parametrize("make,kwargs,rows", [o[1:] for o in ORIGINALS], ids=[o[0] for o in ORIGINALS])
def test_reproduces_original_chain(backend, make, kwargs, rows):
    require_backend(backend)
    torch.manual_seed(0)
    original = make().double()
    layers, head = original.linears()
    x_features = original.in_features
    module = SpinalLinear.from_linears(x_features, layers, head, **kwargs)
    x = torch.randn(rows, x_features, dtype=torch.float64)

    x_orig = x.clone().requires_grad_()
    y_orig = original(x_orig)
    cot = torch.randn_like(y_orig)
    y_orig.backward(cot)
    chunk = reference.chunk_size(x_features, kwargs["num_splits"])
    expected = packed_grads(layers, head, chunk)

    x_mod = x.clone().requires_grad_()
    with spinal_ops.use_backend(backend):
        y_mod = module(x_mod)
    y_mod.backward(cot)
    what = f"{backend}/{type(original).__name__}"
    assert_close(y_mod.detach(), y_orig.detach(), what=f"{what} output")
    assert_close(x_mod.grad, x_orig.grad, what=f"{what} grad x")
    for name, grad in expected.items():
        if grad.numel() == 0:  # weight_h of a single sub-layer: no parameters, nothing to compare
            continue
        assert_close(getattr(module, name).grad, grad, what=f"{what} grad {name}")


def test_split_starts():
    assert reference.split_starts(13, 3, 5, "cyclic") == [0, 4, 8, 12, 3]
    assert reference.split_starts(16, 2, 5, "alternate") == [0, 8, 0, 8, 0]
    assert reference.split_starts(16, 2, 5, "cyclic") == [0, 8, 0, 8, 0]  # the modes agree when D == K * c
    assert reference.chunk_size(9, 2) == 4  # round(4.5) == 4, as numpy's round
    assert reference.chunk_size(11, 2) == 6
    with pytest.raises(ValueError, match="alternate.*12 > 11"):
        reference.split_starts(11, 2, 4, "alternate")
    with pytest.raises(ValueError, match="split_mode must be one of"):
        reference.split_starts(11, 2, 4, "zigzag")


def test_chunk_indices_wrap():
    assert reference.chunk_columns(5, 3, 4).tolist() == [3, 4, 0, 1]
