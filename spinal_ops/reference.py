"""The executable specification of a spinal layer, in plain differentiable PyTorch.

Every backend (C++ CPU, CUDA, Triton) is checked against this module, and every benchmark compares with
it. It follows DESIGN.md section 1 literally and favours clarity over speed.

Shapes (``B`` rows, ``D`` input features, ``L`` sub-layers of width ``w``, chunk size ``c``):

- ``x``        ``(B, D)``
- ``weight_x`` ``(Lx, w, c)``  ``Lx = L``, or ``min(L, 2)`` with shared weights
- ``weight_h`` ``(Lh, w, w)``  ``Lh = L - 1``, or ``min(L - 1, 1)`` with shared weights
- ``bias``     ``(Lx, w)`` or ``None``
- ``head_weight`` ``(out, L * w)`` or ``None`` (hidden mode), ``head_bias`` ``(out,)`` or ``None``

Sub-layer ``i`` reads the ``c`` columns ``(starts[i] + j) mod D``; its input weight lives in slot
``x_slot(i)`` of ``weight_x`` and ``bias``, its recurrent weight (``i >= 1``) in slot ``h_slot(i)`` of
``weight_h``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "identity", "gelu", "silu")
SPLIT_MODES = ("cyclic", "alternate")


def chunk_size(in_features: int, num_splits: int) -> int:
    """``c = round(D / K)`` with Python's ``round`` (as the original ``int(np.round(D / K))``)."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    c = int(round(in_features / num_splits))
    if c < 1:
        raise ValueError(
            f"chunk size round(in_features / num_splits) = round({in_features} / {num_splits}) is 0; "
            f"num_splits must be at most {2 * in_features - 1} for in_features={in_features}"
        )
    return c


def split_starts(in_features: int, num_splits: int, num_layers: int, split_mode: str = "cyclic") -> list[int]:
    """First input column of each sub-layer's chunk (chunks wrap past column ``D - 1``).

    ``cyclic``: ``s_i = (i * c) mod D`` (the original customizable model, which tiles ``x``).
    ``alternate``: ``s_i = (i mod K) * c`` (the original fixed heads); needs ``K * c <= D``.
    """
    c = chunk_size(in_features, num_splits)
    if split_mode == "cyclic":
        return [(i * c) % in_features for i in range(num_layers)]
    if split_mode == "alternate":
        if num_splits * c > in_features:
            raise ValueError(
                f"split_mode='alternate' needs num_splits * chunk <= in_features, got "
                f"{num_splits} * {c} = {num_splits * c} > {in_features}; use split_mode='cyclic'"
            )
        return [(i % num_splits) * c for i in range(num_layers)]
    raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {split_mode!r}")


def x_slot(i: int, shared_weights: bool) -> int:
    """Slot of ``weight_x``/``bias`` used by sub-layer ``i``."""
    return min(i, 1) if shared_weights else i


def h_slot(i: int, shared_weights: bool) -> int:
    """Slot of ``weight_h`` used by sub-layer ``i >= 1``."""
    return 0 if shared_weights else i - 1


def num_slots(num_layers: int, shared_weights: bool) -> tuple[int, int]:
    """``(Lx, Lh)``: how many ``weight_x`` and ``weight_h`` slots a layer of ``num_layers`` has."""
    if shared_weights:
        return min(num_layers, 2), min(num_layers - 1, 1)
    return num_layers, num_layers - 1


def activate(z: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    """The sub-layer activation (``gelu`` is the exact, erf-based one of ``nn.GELU()``)."""
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "identity":
        return z
    if activation == "gelu":
        return F.gelu(z)
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def chunk_columns(in_features: int, start: int, chunk: int, device=None) -> torch.Tensor:
    """Column indices ``(start + j) mod D`` of one chunk, ``j = 0 .. chunk - 1``."""
    return (start + torch.arange(chunk, device=device)) % in_features


def spinal_forward(
    x: torch.Tensor,
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    head_weight: torch.Tensor | None,
    head_bias: torch.Tensor | None,
    starts: list[int],
    activation: str,
    negative_slope: float,
    shared_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spinal chain on 2-D ``x``: returns ``(H, y)``.

    ``H`` ``(B, L * w)`` is the concatenation of the sub-layer outputs; ``y`` ``(B, out)`` is the head
    output, or an empty ``(B, 0)`` tensor in hidden mode (``head_weight is None``).
    """
    num_layers = len(starts)
    d = x.shape[1]
    c = weight_x.shape[2]
    outs = []
    h = None
    for i, s in enumerate(starts):
        xi = x.index_select(1, chunk_columns(d, s, c, x.device))
        z = xi @ weight_x[x_slot(i, shared_weights)].T
        if i > 0:
            z = z + h @ weight_h[h_slot(i, shared_weights)].T
        if bias is not None:
            z = z + bias[x_slot(i, shared_weights)]
        h = activate(z, activation, negative_slope)
        outs.append(h)
    H = torch.cat(outs, dim=1) if num_layers > 1 else outs[0]
    if head_weight is None:
        return H, x.new_empty(x.shape[0], 0)
    y = H @ head_weight.T
    if head_bias is not None:
        y = y + head_bias
    return H, y


def flops_per_row(in_chunk: int, width: int, num_layers: int, out_features: int) -> int:
    """Forward FLOPs per row of the fused layer (DESIGN.md section 2)."""
    return 2 * (num_layers * in_chunk * width + (num_layers - 1) * width * width + num_layers * width * out_features)


def dense_flops_per_row(in_features: int, width: int, num_layers: int, out_features: int) -> int:
    """Forward FLOPs per row of ``nn.Linear(D, L*w)`` + ``nn.Linear(L*w, out)``, the layer it replaces."""
    return 2 * (in_features * num_layers * width + num_layers * width * out_features)


def init_bound(fan_in: int) -> float:
    """``nn.Linear``'s default init: weights and biases uniform in ``+-1/sqrt(fan_in)``."""
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


# ------------------------------------------------------------------------------------ dropout and batch norm


def spinal_forward_blocks(
    x: torch.Tensor,
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    head_weight: torch.Tensor | None,
    head_bias: torch.Tensor | None,
    starts: list[int],
    activation: str,
    negative_slope: float,
    shared_weights: bool,
    *,
    dropout: float = 0.0,
    training: bool = False,
    norms=None,
) -> torch.Tensor:
    """The chain as the original VGG / transfer-learning heads build it, block by block, on 2-D ``x``.

    Sub-layer ``i``: ``Dropout(p) -> Linear -> norms[x_slot(i)] -> act`` on ``cat([x_chunk_i, h_{i-1}])``;
    head: ``Dropout(p) -> Linear`` on ``H``. Returns ``y`` ``(B, out)``, or ``H`` ``(B, L * w)`` in hidden mode.

    Dropout runs only when ``training`` and ``dropout > 0``; it draws its masks in the order and shapes of
    the original ``nn.Sequential`` blocks (``(B, c)``, then ``(B, c + w)`` per sub-layer, then ``(B, L * w)``
    for the head), so with the same seed the result is the original's, bit for bit. ``norms`` is ``None`` or
    one callable per ``weight_x`` slot (the ``nn.BatchNorm1d`` modules, which use their own train/eval mode
    and update their own running statistics). Plain differentiable PyTorch: this is the path that runs when
    dropout or batch norm cannot be fused (train mode).
    """
    d = x.shape[1]
    c = weight_x.shape[2]
    outs = []
    h = None
    for i, s in enumerate(starts):
        slot = x_slot(i, shared_weights)
        if s + c <= d:  # a view, as the original blocks slice x (BLAS may round a strided operand differently)
            inp = x[:, s : s + c]
        else:
            inp = x.index_select(1, chunk_columns(d, s, c, x.device))
        weight = weight_x[slot]
        if i > 0:
            inp = torch.cat([inp, h], dim=1)
            weight = torch.cat([weight, weight_h[h_slot(i, shared_weights)]], dim=1)
        if training and dropout > 0:
            inp = F.dropout(inp, dropout, training=True)
        z = F.linear(inp, weight, bias[slot] if bias is not None else None)
        if norms is not None:
            z = norms[slot](z)
        h = activate(z, activation, negative_slope)
        outs.append(h)
    H = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if head_weight is None:
        return H
    if training and dropout > 0:
        H = F.dropout(H, dropout, training=True)
    return F.linear(H, head_weight, head_bias)


def fold_batch_norm(
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold an eval-mode batch norm after each sub-layer's Linear into the packed weights.

    ``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``, both ``(Lx, w)``,
    one row per ``weight_x`` slot. ``BN(z) = z * scale + shift`` with ``z = Wx x + Wh h + b`` gives
    ``Wx' = Wx * scale``, ``Wh' = Wh * scale`` (``weight_h`` slot ``j`` serves ``weight_x`` slot ``j + 1``) and
    ``b' = b * scale + shift = (b - mean) * scale + beta``. Returns ``(weight_x', weight_h', bias')``.
    """
    wx = weight_x * scale.unsqueeze(2)
    wh = weight_h * scale[1:].unsqueeze(2)
    b = shift if bias is None else bias * scale + shift
    return wx, wh, b
