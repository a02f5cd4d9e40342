"""Conversion between :class:`spinal_ops.SpinalLinear` and the original SpinalNet scripts' modules.

The original scripts build a spinal head from ``nn.Linear`` sub-layers (or ``nn.Sequential`` blocks with dropout,
batch norm and an activation) called in a chain; :func:`from_linears` reads such modules into one layer (weights
copied exactly, tying kept), :func:`to_linears` and :func:`to_blocks` write a layer back out. ``SpinalLinear``
exposes them as ``SpinalLinear.from_linears``, ``.to_linears()`` and ``.to_blocks()``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import reference

if TYPE_CHECKING:
    from .module import SpinalLinear


def from_linears(
    cls: type[SpinalLinear],
    in_features: int,
    layers: list[nn.Module],
    head: nn.Module | None = None,
    *,
    num_splits: int = 2,
    split_mode: str = "cyclic",
    activation: str | None = None,
    negative_slope: float | None = None,
) -> SpinalLinear:
    """Build from the original scripts' sub-layers and optional head.

    Each of ``layers`` is an ``nn.Linear`` or an original block ``nn.Sequential([Dropout,] Linear,
    [BatchNorm1d,] [activation])``; ``head`` is an ``nn.Linear``, ``nn.Sequential([Dropout,] Linear)`` or
    None for a hidden layer. ``layers[0]``'s Linear has ``in_features == c``, the others ``c + w`` (chunk
    columns first, then the previous output, as ``torch.cat([x_chunk, h_prev], 1)``); the head's is
    ``L * w``. A module object repeated means tied weights, in any pattern: ``[fc1, fc2, fc3, fc4, fc3, fc4]``
    gives ``weight_slots=(0, 1, 2, 3, 2, 3)``, ``[fc1, fc2, fc2, fc2]`` shared weights; the slots are
    numbered in order of first appearance. ``layers[0]`` cannot appear again (its input is narrower).

    Dropout modules must all have one probability (before every sub-layer and the head); batch norms are
    on every sub-layer or none (copied with their running statistics, eps and momentum). ``activation`` and
    ``negative_slope`` default to what the blocks' activation modules say, else ``"relu"`` and 0.01; given
    explicitly, they must agree with those modules. Weights are copied (exact); the result is on the device
    and dtype of ``layers[0]``'s Linear.
    """
    where = "SpinalLinear.from_linears"
    layers = list(layers)
    if not layers:
        raise ValueError(f"{where}: layers must hold at least one nn.Linear, got none")
    blocks = [_parse_block(block, f"layers[{i}]", is_head=False) for i, block in enumerate(layers)]
    head_block = _parse_block(head, "head", is_head=True) if head is not None else None
    linears = [b.linear for b in blocks]
    chunk = reference.chunk_size(in_features, num_splits)
    width = linears[0].out_features
    bias = linears[0].bias is not None
    for i, lin in enumerate(linears[1:], start=1):
        if lin is linears[0]:
            raise ValueError(
                f"{where}: layers[0] and layers[{i}] are the same nn.Linear, but sub-layer 0 takes the chunk alone "
                f"(in_features = c = {chunk}) and sub-layer {i} the chunk and the previous output (c + w = "
                f"{chunk + width}); one module cannot serve both"
            )
    slots = _slot_table(linears)
    for i, lin in enumerate(linears):
        fan_in = chunk if i == 0 else chunk + width
        if lin.in_features != fan_in or lin.out_features != width:
            raise ValueError(
                f"{where}: layers[{i}] must be Linear({fan_in}, {width}) for in_features="
                f"{in_features}, num_splits={num_splits}; got Linear({lin.in_features}, {lin.out_features})"
            )
        if (lin.bias is not None) != bias:
            raise ValueError(f"{where}: all layers (and the head) must agree on bias")
    num_layers = len(linears)
    head_lin = head_block.linear if head_block is not None else None
    if head_lin is not None:
        if head_lin.in_features != num_layers * width:
            raise ValueError(
                f"{where}: head must have in_features = L * w = {num_layers * width}, got {head_lin.in_features}"
            )
        if (head_lin.bias is not None) != bias:
            raise ValueError(f"{where}: all layers (and the head) must agree on bias")

    # Dropout: one probability everywhere.
    named = [(f"layers[{i}]", b) for i, b in enumerate(blocks)] + ([("head", head_block)] if head_block else [])
    probs = {name: b.dropout for name, b in named}
    if len(set(probs.values())) > 1:
        listed = ", ".join(f"{name}: {p}" for name, p in probs.items())
        raise ValueError(f"{where}: SpinalLinear has one dropout probability before every sub-layer and the "
                         f"head; the blocks have different ones ({listed})")
    dropout = blocks[0].dropout

    # Activation: from the blocks, agreeing with the arguments.
    found = {(b.activation if b.activation is None else b.activation[0]) for b in blocks}
    if len(found) > 1:
        raise ValueError(f"{where}: the sub-layer blocks disagree on the activation: "
                         + ", ".join(f"layers[{i}]: {b.activation_text}" for i, b in enumerate(blocks)))
    if blocks[0].activation is not None:
        block_act, block_slope = blocks[0].activation
        slopes = {b.activation[1] for b in blocks}
        if len(slopes) > 1:
            raise ValueError(f"{where}: the sub-layer blocks disagree on the LeakyReLU negative_slope: "
                             f"{sorted(slopes)}")
        if activation is not None and activation != block_act:
            raise ValueError(f"{where}: activation={activation!r} but the blocks hold "
                             f"{blocks[0].activation_text} ({block_act!r})")
        if negative_slope is not None and block_act == "leaky_relu" and negative_slope != block_slope:
            raise ValueError(f"{where}: negative_slope={negative_slope} but the blocks hold "
                             f"{blocks[0].activation_text}")
        activation = block_act
        if block_act == "leaky_relu":
            negative_slope = block_slope
    activation = "relu" if activation is None else activation
    negative_slope = 0.01 if negative_slope is None else negative_slope

    # Batch norm: on every sub-layer or none, tied exactly as the weights are.
    norms = [b.norm for b in blocks]
    if any(n is None for n in norms) and any(n is not None for n in norms):
        raise ValueError(f"{where}: BatchNorm1d must follow the Linear of every sub-layer or of none; "
                         "missing in " + ", ".join(f"layers[{i}]" for i, n in enumerate(norms) if n is None))
    batch_norm = norms[0] is not None
    if batch_norm:
        for i, n in enumerate(norms):
            if n.num_features != width:
                raise ValueError(f"{where}: layers[{i}] has BatchNorm1d({n.num_features}) after a Linear of "
                                 f"width {width}; expected BatchNorm1d({width})")
        if _slot_table(norms) != slots:
            raise ValueError(f"{where}: the BatchNorm1d modules must be tied as the Linears are (repeat the whole "
                             f"block): the Linears' pattern is {list(slots)}, the BatchNorm1d's "
                             f"{list(_slot_table(norms))}")

    ref = linears[0].weight
    module = cls(
        in_features, head_lin.out_features if head_lin is not None else num_layers * width, bias,
        layer_width=width, num_layers=num_layers, num_splits=num_splits, split_mode=split_mode,
        activation=activation, negative_slope=negative_slope, weight_slots=slots, head=head_lin is not None,
        dropout=dropout, batch_norm=batch_norm, device=ref.device, dtype=ref.dtype,
    )
    with torch.no_grad():
        for slot in range(module.weight_x.shape[0]):
            lin = linears[slots.index(slot)]
            module.weight_x[slot].copy_(lin.weight[:, :chunk])
            if slot >= 1:
                module.weight_h[slot - 1].copy_(lin.weight[:, chunk:])
            if bias:
                module.bias[slot].copy_(lin.bias)
            if batch_norm:
                module.norms[slot] = copy.deepcopy(norms[slots.index(slot)])
        if head_lin is not None:
            module.head_weight.copy_(head_lin.weight)
            if bias:
                module.head_bias.copy_(head_lin.bias)
    return module



def to_linears(layer: SpinalLinear) -> tuple[list[nn.Linear], nn.Linear | None]:
    """The equivalent original-script modules: ``(layers, head)`` (head None in hidden mode).

    Tied sub-layers are the same module object, in the layer's pattern (``weight_slots``). Weights are copies.
    A layer with dropout or batch norm raises ``ValueError`` (use :meth:`to_blocks`, which keeps them).
    """
    if layer._blocks:
        raise ValueError("SpinalLinear.to_linears: this layer has dropout or batch norm, which plain nn.Linear "
                         "modules cannot hold; use to_blocks()")
    return _linears(layer)

def to_blocks(layer: SpinalLinear) -> tuple[list[nn.Sequential], nn.Module | None]:
    """The original-script blocks: ``(layers, head)`` with ``layers[i] = nn.Sequential([Dropout,] Linear,
    [BatchNorm1d,] activation)`` and ``head = nn.Sequential(Dropout, Linear)`` (just the Linear without
    dropout; None in hidden mode). Copies; tied sub-layers are one module object, in the layer's pattern.
    :meth:`from_linears` reads them back exactly.
    """
    linears, head = _linears(layer)
    made = []
    for slot in range(layer.weight_x.shape[0]):
        parts = [nn.Dropout(layer.dropout)] if layer.dropout > 0 else []
        parts.append(linears[slot])
        if layer.norms is not None:
            parts.append(copy.deepcopy(layer.norms[slot]))
        parts.append(_activation_module(layer.activation, layer.negative_slope))
        made.append(nn.Sequential(*parts))
    blocks = [made[s] for s in layer.weight_slots]
    if head is not None and layer.dropout > 0:
        head = nn.Sequential(nn.Dropout(layer.dropout), head)
    return blocks, head

def _linears(layer: SpinalLinear) -> tuple[list[nn.Linear], nn.Linear | None]:
    factory = {"device": layer.weight_x.device, "dtype": layer.weight_x.dtype}
    has_bias = layer.bias is not None
    made: list[nn.Linear] = []
    with torch.no_grad():
        for slot in range(layer.weight_x.shape[0]):
            fan_in = layer.chunk if slot == 0 else layer.chunk + layer.layer_width
            lin = nn.Linear(fan_in, layer.layer_width, bias=has_bias, **factory)
            if slot == 0:
                lin.weight.copy_(layer.weight_x[0])
            else:
                lin.weight.copy_(torch.cat([layer.weight_x[slot], layer.weight_h[slot - 1]], dim=1))
            if has_bias:
                lin.bias.copy_(layer.bias[slot])
            made.append(lin)
        layers = [made[s] for s in layer.weight_slots]
        head = None
        if layer.head_weight is not None:
            head = nn.Linear(layer.head_weight.shape[1], layer.out_features, bias=has_bias, **factory)
            head.weight.copy_(layer.head_weight)
            if has_bias:
                head.bias.copy_(layer.head_bias)
    return layers, head



# ------------------------------------------------------------------------------------ parsing original blocks


def _slot_table(modules) -> tuple[int, ...]:
    """The tying pattern of a list of modules by identity: slots numbered in order of first appearance."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(id(m), len(first)) for m in modules)


_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                       nn.Identity: "identity", nn.GELU: "gelu", nn.SiLU: "silu"}


def _activation_module(name: str, negative_slope: float) -> nn.Module:
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return next(kind for kind, n in _ACTIVATION_MODULES.items() if n == name)()


class _Block:
    """One original sub-layer (or head) block, taken apart."""

    def __init__(layer, linear, dropout=0.0, norm=None, activation=None, activation_text="no activation module"):
        layer.linear = linear
        layer.dropout = dropout
        layer.norm = norm
        layer.activation = activation  # (name, negative_slope) or None
        layer.activation_text = activation_text


def _parse_block(block: nn.Module, where: str, is_head: bool) -> _Block:
    layout = "[Dropout,] Linear" if is_head else "[Dropout,] Linear, [BatchNorm1d,] [activation]"
    prefix = f"SpinalLinear.from_linears: {where}"
    if isinstance(block, nn.Linear):
        return _Block(block)
    if not isinstance(block, nn.Sequential):
        raise TypeError(f"{prefix} must be nn.Linear or nn.Sequential({layout}), got {type(block).__name__}")
    parts = list(block)
    names = ", ".join(type(m).__name__ for m in parts)
    found = _Block(None)
    i = 0
    if i < len(parts) and isinstance(parts[i], nn.Dropout):
        found.dropout = float(parts[i].p)
        i += 1
    if i < len(parts) and isinstance(parts[i], nn.Linear):
        found.linear = parts[i]
        i += 1
    if not is_head and i < len(parts) and isinstance(parts[i], nn.BatchNorm1d):
        found.norm = parts[i]
        i += 1
    if not is_head and i < len(parts) and type(parts[i]) in _ACTIVATION_MODULES:
        act = parts[i]
        name = _ACTIVATION_MODULES[type(act)]
        if name == "gelu" and act.approximate != "none":
            raise ValueError(f"{prefix}: GELU(approximate={act.approximate!r}) is not supported; "
                             "SpinalLinear's gelu is the exact one")
        found.activation = (name, float(act.negative_slope) if name == "leaky_relu" else None)
        found.activation_text = repr(act)
        i += 1
    if found.linear is None or i != len(parts):
        raise ValueError(f"{prefix} must be nn.Sequential({layout}); got nn.Sequential({names})")
    return found
