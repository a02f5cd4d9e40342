"""SpinalLinear as a module: construction, state, conversions, and errors for bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch import nn
from torch.nn.utils import prune

import spinal_ops
from spinal_ops import SpinalLinear


def test_repr_shows_every_hyper_parameter():
    m = SpinalLinear(20, 3, layer_width=6, num_layers=5, num_splits=3, split_mode="cyclic", activation="leaky_relu",
                     negative_slope=0.2, shared_weights=True)
    text = repr(m)
    for part in ("in_features=20", "out_features=3", "bias=True", "layer_width=6", "num_layers=5", "num_splits=3",
                 "split_mode='cyclic'", "activation='leaky_relu'", "negative_slope=0.2", "shared_weights=True",
                 "head=True"):
        assert part in text, f"{part} missing from {text}"


def test_parameter_shapes_and_defaults():
    m = SpinalLinear(512, 10)
    assert m.layer_width == 64 and m.chunk == 256
    assert m.weight_x.shape == (4, 64, 256) and m.weight_h.shape == (3, 64, 64)
    assert m.bias.shape == (4, 64) and m.head_weight.shape == (10, 256) and m.head_bias.shape == (10,)
    shared = SpinalLinear(512, 10, shared_weights=True, num_layers=6)
    assert shared.weight_x.shape[0] == 2 and shared.weight_h.shape[0] == 1
    hidden = SpinalLinear(30, 24, head=False, num_layers=4)
    assert hidden.layer_width == 6 and hidden.head_weight is None and hidden(torch.randn(2, 30)).shape == (2, 24)
    nobias = SpinalLinear(30, 4, bias=False)
    assert nobias.bias is None and nobias.head_bias is None


def test_init_bounds_follow_nn_linear():
    m = SpinalLinear(200, 10, layer_width=30, num_layers=3)
    bound0 = 1 / 100**0.5
    bound1 = 1 / 130**0.5
    assert m.weight_x[0].abs().max() <= bound0 and m.weight_x[0].abs().max() > 0.9 * bound0
    assert m.weight_x[1].abs().max() <= bound1 and m.weight_h.abs().max() <= bound1
    assert m.head_weight.abs().max() <= 1 / 90**0.5


def test_state_dict_round_trip():
    a = SpinalLinear(13, 3, num_splits=3, layer_width=5)
    b = SpinalLinear(13, 3, num_splits=3, layer_width=5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 13)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"weight_x", "weight_h", "bias", "head_weight", "head_bias"}


class _Twice(nn.Module):
    def forward(self, w):
        return 2 * w


def test_parametrized_weights_are_what_the_layer_runs():
    """``torch.nn.utils.parametrize`` (weight norm, spectral norm, custom parametrizations) moves a parameter into
    ``parametrizations.<name>.original`` and computes the weight on access: the layer runs the computed weights and
    the gradient reaches the original."""
    torch.manual_seed(0)
    m = SpinalLinear(13, 3, num_splits=3, layer_width=5).double()
    original_x = m.weight_x.detach().clone()
    torch.nn.utils.parametrizations.weight_norm(m, "head_weight")
    torch.nn.utils.parametrize.register_parametrization(m, "weight_x", _Twice())
    plain = SpinalLinear(13, 3, num_splits=3, layer_width=5).double()
    with torch.no_grad():
        for name in ("weight_h", "bias", "head_weight", "head_bias"):
            getattr(plain, name).copy_(getattr(m, name))
        plain.weight_x.copy_(2 * original_x)
    x = torch.randn(4, 13, dtype=torch.float64)
    y = m(x)
    assert torch.equal(y, plain(x))
    y.square().sum().backward()
    assert m.parametrizations.weight_x.original.grad.abs().sum() > 0
    assert m.parametrizations.head_weight.original0.grad is not None


def test_pruned_weights_are_what_the_layer_runs():
    """``torch.nn.utils.prune`` replaces a parameter by ``<name>_orig`` and sets the masked weight as a plain attribute
    before each call: the layer runs the masked weight, and the gradient reaches ``<name>_orig``."""
    torch.manual_seed(0)
    m = SpinalLinear(13, 3, num_splits=3, layer_width=5)
    prune.l1_unstructured(m, "weight_x", amount=0.5)
    plain = SpinalLinear(13, 3, num_splits=3, layer_width=5)
    with torch.no_grad():
        for name in ("weight_x", "weight_h", "bias", "head_weight", "head_bias"):
            getattr(plain, name).copy_(getattr(m, name))
    assert (m.weight_x == 0).sum() >= m.weight_x.numel() // 2
    x = torch.randn(4, 13)
    y = m(x)
    assert torch.equal(y, plain(x))
    y.sum().backward()
    assert m.weight_x_orig.grad is not None


def test_to_dtype():
    m = SpinalLinear(13, 3, num_splits=3, layer_width=5).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(torch.randn(2, 13, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared"])
@pytest.mark.parametrize("head", [True, False], ids=["head", "hidden"])
def test_linears_round_trip_is_exact(shared, head):
    m = SpinalLinear(17, 20 if not head else 4, layer_width=5, num_layers=4, num_splits=3, shared_weights=shared,
                     head=head, activation="tanh")
    layers, head_lin = m.to_linears()
    assert len(layers) == 4 and (head_lin is None) == (not head)
    assert (layers[1] is layers[3]) == shared
    back = SpinalLinear.from_linears(17, layers, head_lin, num_splits=3, activation="tanh")
    assert back.shared_weights == shared
    for (name, p), (back_name, q) in zip(m.named_parameters(), back.named_parameters(), strict=True):
        assert name == back_name, f"parameter {name} came back as {back_name}"
        assert torch.equal(p, q), name
    x = torch.randn(3, 17)
    assert torch.equal(m(x), back(x))


def test_swap_a_models_final_linear():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    model[-1] = SpinalLinear(model[-1].in_features, model[-1].out_features)
    out = model(torch.randn(6, 8))
    assert out.shape == (6, 5)
    out.sum().backward()
    assert model[-1].weight_x.grad is not None


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "build,call,error,match",
    [
        (lambda: SpinalLinear(10, 3), lambda m: m(_x(4, 9)), ValueError,
         r"expected input of shape \(\*, 10\).*\(4, 9\)"),
        (lambda: SpinalLinear(10, 3), lambda m: m(_x(4, 10, dtype=torch.float64)), RuntimeError,
         r"weight_x must have the dtype of x \(Double\), got Float"),
        (lambda: SpinalLinear(10, 3), lambda m: m(torch.ones(4, 10, dtype=torch.int64)), TypeError,
         "floating-point.*torch.int64"),
        (lambda: SpinalLinear(10, 3, activation="swish"), None, ValueError, "activation must be one of.*'swish'"),
        (lambda: SpinalLinear(10, 3, num_layers=0), None, ValueError, "num_layers must be an integer >= 1, got 0"),
        (lambda: SpinalLinear(10, 25, head=False, num_layers=4), None, ValueError,
         "out_features=25 is not divisible by num_layers=4"),
        (lambda: SpinalLinear(10, 25, head=False, num_layers=4, layer_width=5), None, ValueError,
         r"4 \* 5 = 20, got 25"),
        (lambda: SpinalLinear(11, 3, split_mode="alternate"), None, ValueError, r"2 \* 6 = 12 > 11"),
        (lambda: SpinalLinear(10, 3, split_mode="zigzag"), None, ValueError, "split_mode must be one of"),
        (lambda: SpinalLinear(3, 3, num_splits=7), None, ValueError, "chunk size"),
    ],
    ids=["wrong-last-dim", "dtype-mismatch", "integer-input", "unknown-activation", "no-layers", "indivisible-hidden",
         "hidden-width-mismatch", "alternate-overflow", "unknown-split-mode", "chunk-zero"],
)
def test_bad_input_errors(build, call, error, match):
    with pytest.raises(error, match=match):
        m = build()
        call(m)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="unknown spinal_ops backend 'tpu'; valid names: reference, cpu, cuda, triton"):
        with spinal_ops.use_backend("tpu"):
            pass


def test_unavailable_backend_lists_available_ones():
    if "cuda" in spinal_ops.available_backends():
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match="'cuda' is not available.*available: reference"):
        with spinal_ops.use_backend("cuda"):
            pass


def test_use_backend_restores_previous_choice():
    with spinal_ops.use_backend("reference"):
        with spinal_ops.use_backend("reference"):
            pass
        assert spinal_ops.backends.select_backend(torch.device("cpu")) == "reference"
    default = "cpu" if "cpu" in spinal_ops.available_backends() else "reference"
    assert spinal_ops.backends.select_backend(torch.device("cpu")) == default


def test_functional_checks_chunk_size():
    m = SpinalLinear(10, 3, layer_width=4)
    with pytest.raises(ValueError, match=r"chunk size round\(12 / 2\) = 6, but weight_x has chunk size 5"):
        spinal_ops.spinal_linear(_x(2, 12), m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias)


def test_functional_matches_module():
    m = SpinalLinear(10, 3, layer_width=4, num_layers=3, shared_weights=True, activation="silu")
    x = _x(5, 10)
    y = spinal_ops.spinal_linear(x, m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias, num_layers=3,
                                 shared_weights=True, activation="silu")
    assert_close(y.detach(), m(x).detach(), what="functional vs module")


@pytest.mark.parametrize("which", range(5))
def test_non_contiguous_weights_run_as_their_contiguous_copies(which):
    """Any one of the five tensors given as a non-contiguous view (a transposed copy transposed back): the result
    and the gradients are bitwise those of the contiguous tensors."""
    m = SpinalLinear(10, 3, layer_width=4, num_layers=3)
    x = _x(5, 10)
    params = [p.detach() for p in (m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias)]
    strided = list(params)
    t = params[which]
    strided[which] = (t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1 else
                      torch.stack([t, t], 1)[:, 0])
    assert not strided[which].is_contiguous() and torch.equal(strided[which], t)
    runs = []
    for tensors in (params, strided):
        leaves = [p.clone().requires_grad_() if p.is_contiguous() else p.requires_grad_() for p in tensors]
        y = spinal_ops.spinal_linear(x, *leaves, num_layers=3)
        y.square().sum().backward()
        runs.append((y.detach(), [p.grad for p in leaves]))
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
