"""The executable specification of a spinal layer, in plain differentiable PyTorch.

Every backend (C++ CPU, CUDA, Triton) is checked against this module, and every benchmark compares with
it. It follows the math of ``docs/design.md`` literally and favours clarity over speed.

Shapes (``B`` rows, ``D`` input features, ``L`` sub-layers of width ``w``, chunk size ``c``):

- ``x``        ``(B, D)``
- ``weight_x`` ``(S, w, c)``  one slot per distinct sub-layer ``nn.Linear``
- ``weight_h`` ``(S - 1, w, w)``
- ``bias``     ``(S, w)`` or ``None``
- ``head_weight`` ``(out, L * w)`` or ``None`` (hidden mode), ``head_bias`` ``(out,)`` or ``None``

Sub-layer ``i`` reads the ``c`` columns ``(starts[i] + j) mod D``. Its weights live in slot ``slots[i]``: the input
weight and bias in ``weight_x[slots[i]]`` and ``bias[slots[i]]``, the recurrent weight (``i >= 1``) in
``weight_h[slots[i] - 1]`` (the original sub-layer ``nn.Linear`` of slot ``s >= 1`` has weight
``cat([weight_x[s], weight_h[s - 1]], dim=1)``). Slot 0 belongs to sub-layer 0 alone (its input is ``c`` wide,
the others' ``c + w``). ``slots = [0, 1, ..., L-1]``: every sub-layer has its own weights;
``[0, 1, 1, ..., 1]``: shared weights ("SpinalNet SW"); any other table ties sub-layers as the original
scripts do when they call one module at several positions (``fc1, fc2, fc3, fc4, fc3, fc4``).
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


def weight_slots(num_layers: int, shared_weights: bool = False) -> tuple[int, ...]:
    """The slot table of ``num_layers`` sub-layers: ``(0, 1, ..., L-1)``, or ``(0, 1, 1, ..., 1)`` when shared."""
    return tuple(min(i, 1) if shared_weights else i for i in range(num_layers))


def check_weight_slots(slots, num_layers: int) -> tuple[int, ...]:
    """Validate a slot table for ``num_layers`` sub-layers; returns it as a tuple of ints.

    ``slots[i]`` is the weight slot of sub-layer ``i``: ``slots[0] == 0`` (slot 0 belongs to sub-layer 0 alone,
    whose input is narrower), ``slots[i] >= 1`` for ``i >= 1``, and every slot ``0 .. max(slots)`` is used.
    """
    try:
        table = tuple(int(s) for s in slots)
        exact = all(int(s) == s and not isinstance(s, bool) for s in slots)
    except (TypeError, ValueError):
        raise TypeError(f"weight_slots must be a sequence of ints, got {slots!r}") from None
    if not exact:
        raise TypeError(f"weight_slots must be a sequence of ints, got {slots!r}")
    if len(table) != num_layers:
        raise ValueError(f"weight_slots must have one entry per sub-layer (num_layers={num_layers}), got "
                         f"{len(table)}: {list(table)}")
    if table[0] != 0:
        raise ValueError(f"weight_slots[0] must be 0 (sub-layer 0 has its own slot), got {list(table)}")
    for i, s in enumerate(table[1:], start=1):
        if s < 1:
            raise ValueError(f"weight_slots[{i}] must be >= 1: slot 0 belongs to sub-layer 0 alone (its input is "
                             f"c wide, the others' c + w); got {list(table)}")
    unused = sorted(set(range(max(table) + 1)) - set(table))
    if unused:
        raise ValueError(f"weight_slots must use every slot 0 .. {max(table)}; slot(s) {unused} unused in "
                         f"{list(table)} (number the slots consecutively)")
    return table


def num_slots(slots) -> tuple[int, int]:
    """``(Sx, Sh)``: the number of ``weight_x`` and ``weight_h`` slots a slot table needs (``S`` and ``S - 1``)."""
    count = max(slots) + 1
    return count, count - 1


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


def chunk_of(x: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    """Columns ``(start + j) mod D`` of 2-D ``x``, ``j = 0 .. chunk - 1`` (``chunk <= D``): a view of ``x`` when
    they do not wrap, else the two pieces concatenated."""
    d = x.shape[1]
    if start + chunk <= d:
        return x.narrow(1, start, chunk)
    return torch.cat([x.narrow(1, start, d - start), x.narrow(1, 0, start + chunk - d)], dim=1)


def spinal_forward(
    x: torch.Tensor,
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    head_weight: torch.Tensor | None,
    head_bias: torch.Tensor | None,
    starts: list[int],
    slots: list[int],
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spinal chain on 2-D ``x``: returns ``(H, y)``.

    ``H`` ``(B, L * w)`` is the concatenation of the sub-layer outputs; ``y`` ``(B, out)`` is the head
    output, or an empty ``(B, 0)`` tensor in hidden mode (``head_weight is None``).
    """
    num_layers = len(starts)
    c = weight_x.shape[2]
    outs = []
    h = None
    for i, s in enumerate(starts):
        xi = chunk_of(x, s, c)  # a view unless the chunk wraps: no gather kernel on a GPU
        z = xi @ weight_x[slots[i]].T
        if i > 0:
            z = z + h @ weight_h[slots[i] - 1].T
        if bias is not None:
            z = z + bias[slots[i]]
        h = activate(z, activation, negative_slope)
        outs.append(h)
    H = torch.cat(outs, dim=1) if num_layers > 1 else outs[0]
    if head_weight is None:
        return H, x.new_empty(x.shape[0], 0)
    y = H @ head_weight.T
    if head_bias is not None:
        y = y + head_bias
    return H, y


def needs_preactivation(activation: str, negative_slope: float) -> bool:
    """True when ``act'(Z)`` cannot be read off ``h = act(Z)``: gelu, silu, leaky_relu with a negative slope."""
    return activation in ("gelu", "silu") or (activation == "leaky_relu" and negative_slope < 0.0)


def activation_grad(h: torch.Tensor, z: torch.Tensor | None, activation: str, negative_slope: float) -> torch.Tensor:
    """``act'(Z)``, from the output ``h = act(Z)`` or, when :func:`needs_preactivation`, from ``z`` itself.

    Written as a differentiable function of ``h`` (or ``z``), so that differentiating a backward built on it gives
    the second derivative (``d(1 - h^2)/dZ = -2 h act'(Z)`` for tanh, and so on). At ``Z = 0`` it matches
    PyTorch: relu' = 0, leaky_relu' = slope.
    """
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        return cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if activation == "leaky_relu":
        v = z if negative_slope < 0.0 else h
        return torch.where(v > 0, torch.ones_like(v), torch.full_like(v, negative_slope))
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "tanh":
        return 1.0 - h * h
    if activation == "sigmoid":
        return h * (1.0 - h)
    if activation == "identity":
        return torch.ones_like(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def spinal_backward(
    grad_y: torch.Tensor | None,
    grad_H: torch.Tensor | None,
    x: torch.Tensor,
    H: torch.Tensor,
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    head_weight: torch.Tensor | None,
    starts: list[int],
    slots: list[int],
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, ...]:
    """The backward of :func:`spinal_forward` written out, from ``x`` and ``H`` (what the fused ops save).

    ``grad_y (B, out)?`` and ``grad_H (B, L*w)?`` are the incoming gradients. Returns ``(dx, dweight_x, dweight_h,
    dbias, dhead_weight, dhead_bias)``; a gradient ``output_mask`` does not ask for (or whose parameter is
    absent) comes back as an empty tensor, as from the fused backward ops. Plain differentiable PyTorch: the
    fused backends differentiate their backward through this function (double backward).

    With ``G = grad_y``: ``dH = G @ Wo (+ grad_H)``; for ``i = L-1 .. 0``: ``dZ_i = (dH_i + carry) * act'(Z_i)``,
    ``carry = dZ_i @ Wh[slots[i] - 1]``; then ``dx[:, idx_i] += dZ_i @ Wx[slots[i]]``, ``dWx[s] = sum over i of slot
    s of dZ_i.T @ x[:, idx_i]``, ``dWh[s - 1] = sum dZ_i.T @ h_{i-1}``, ``db[s] = sum dZ_i.sum(0)``,
    ``dWo = G.T @ H``, ``dbo = G.sum(0)``. ``Z_i`` is recomputed from ``x`` and ``H`` only where ``act'`` needs it.
    """
    rows, d = x.shape
    width, chunk = weight_x.shape[1], weight_x.shape[2]
    num_layers = len(starts)
    if grad_y is not None and head_weight is None:
        grad_y = None
    d_h = H.new_zeros(rows, num_layers * width)
    if grad_y is not None:
        d_h = d_h + grad_y @ head_weight
    if grad_H is not None:
        d_h = d_h + grad_H
    hs = H.split(width, dim=1) if num_layers > 0 else ()
    cols = [chunk_columns(d, s, chunk, x.device) for s in starts]
    dz: list[torch.Tensor | None] = [None] * num_layers
    carry = None
    for i in reversed(range(num_layers)):
        z = None
        if needs_preactivation(activation, negative_slope):
            z = x.index_select(1, cols[i]) @ weight_x[slots[i]].T
            if i > 0:
                z = z + hs[i - 1] @ weight_h[slots[i] - 1].T
            if bias is not None:
                z = z + bias[slots[i]]
        upstream = d_h[:, i * width : (i + 1) * width]
        if carry is not None:
            upstream = upstream + carry
        dz[i] = upstream * activation_grad(hs[i], z, activation, negative_slope)
        carry = dz[i] @ weight_h[slots[i] - 1] if i > 0 else None

    def empty():
        return x.new_empty(0)

    def slot_sums(like: torch.Tensor, terms) -> torch.Tensor:
        """``like``-shaped: slot ``s`` holds the sum of the ``(s, term)`` pairs of ``terms``, in sub-layer order."""
        parts = [[] for _ in range(like.shape[0])]
        for slot, term in terms:
            parts[slot].append(term)
        if not parts:
            return like.new_zeros(like.shape)
        return torch.stack([sum(p[1:], p[0]) if p else like.new_zeros(like.shape[1:]) for p in parts])

    dx = empty()
    if output_mask[0]:
        dx = x.new_zeros(rows, d)
        for i in range(num_layers):
            dx = dx.index_add(1, cols[i], dz[i] @ weight_x[slots[i]])
    dwx = empty()
    if output_mask[1]:
        dwx = slot_sums(weight_x, [(slots[i], dz[i].T @ x.index_select(1, cols[i])) for i in range(num_layers)])
    dwh = empty()
    if output_mask[2]:
        dwh = slot_sums(weight_h, [(slots[i] - 1, dz[i].T @ hs[i - 1]) for i in range(1, num_layers)])
    db = empty()
    if output_mask[3] and bias is not None:
        db = slot_sums(bias, [(slots[i], dz[i].sum(0)) for i in range(num_layers)])
    dwo = empty()
    dbo = empty()
    if head_weight is not None and output_mask[4]:
        dwo = grad_y.T @ H if grad_y is not None else head_weight.new_zeros(head_weight.shape)
    if head_weight is not None and output_mask[5]:
        dbo = grad_y.sum(0) if grad_y is not None else head_weight.new_zeros(head_weight.shape[0])
    return dx, dwx, dwh, db, dwo, dbo


def flops_per_row(in_chunk: int, width: int, num_layers: int, out_features: int) -> int:
    """Forward FLOPs per row of the fused layer (``docs/design.md``)."""
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
    slots: list[int],
    activation: str,
    negative_slope: float,
    *,
    dropout: float = 0.0,
    training: bool = False,
    norms=None,
    dropout_fn=None,
) -> torch.Tensor:
    """The chain as the original VGG / transfer-learning heads build it, block by block, on 2-D ``x``.

    Sub-layer ``i``: ``Dropout(p) -> Linear -> norms[slots[i]] -> act`` on ``cat([x_chunk_i, h_{i-1}])``;
    head: ``Dropout(p) -> Linear`` on ``H``. Returns ``y`` ``(B, out)``, or ``H`` ``(B, L * w)`` in hidden mode.

    Dropout runs only when ``training`` and ``dropout > 0``; it draws its masks in the order and shapes of
    the original ``nn.Sequential`` blocks (``(B, c)``, then ``(B, c + w)`` per sub-layer, then ``(B, L * w)``
    for the head), so with the same seed the result is the original's, bit for bit. ``dropout_fn(t, p)``, if given,
    applies it instead of ``F.dropout(t, p, training=True)``, with the same values and the same draws from the
    generator (``SpinalLinear`` passes :func:`spinal_ops.ops.dropout`). ``norms`` is ``None`` or
    one callable per weight slot (the ``nn.BatchNorm1d`` modules, which use their own train/eval mode
    and update their own running statistics). Plain differentiable PyTorch: this is the path that runs when
    dropout or batch norm cannot be fused (train mode).
    """
    c = weight_x.shape[2]
    drop = dropout_fn or (lambda t, p: F.dropout(t, p, training=True))
    # Per-slot views by unbind: its backward writes each slot's gradient once (indexing weight_x[slot] per
    # sub-layer would zero-fill a whole weight_x-sized gradient per sub-layer). A slot's Linear weight
    # [Wx | Wh] is concatenated once per call, however many sub-layers share it.
    wx, wh = weight_x.unbind(0), weight_h.unbind(0)
    bs = bias.unbind(0) if bias is not None else None
    linear_weights: dict[int, torch.Tensor] = {0: wx[0]}
    outs = []
    h = None
    for i, s in enumerate(starts):
        slot = slots[i]
        inp = chunk_of(x, s, c)  # a view where it does not wrap, as the original blocks slice x (BLAS may round a
        # strided operand differently)
        if i > 0:
            inp = torch.cat([inp, h], dim=1)
        weight = linear_weights.get(slot)
        if weight is None:
            weight = linear_weights[slot] = torch.cat([wx[slot], wh[slot - 1]], dim=1)
        if training and dropout > 0:
            inp = drop(inp, dropout)
        z = F.linear(inp, weight, bs[slot] if bs is not None else None)
        if norms is not None:
            z = norms[slot](z)
        h = activate(z, activation, negative_slope)
        outs.append(h)
    H = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if head_weight is None:
        return H
    if training and dropout > 0:
        H = drop(H, dropout)
    return F.linear(H, head_weight, head_bias)


def scale_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight * scale[..., None]``: row ``r`` of ``weight`` (``(..., k)``) times ``scale[r]`` (``scale``: ``(...)``).
    """
    return weight * scale.unsqueeze(-1)


def scale_columns(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight * scale[..., None, :]``: column ``j`` of each matrix of ``weight`` (``(..., r, k)``) times
    ``scale[..., j]`` (``scale``: ``(..., k)``)."""
    return weight * scale.unsqueeze(-2)


# The activations with act(s * z) == s * act(z) for every s > 0 (positively homogeneous), which let a batch norm's
# scale move past them (fold_batch_norm_columns).
POSITIVELY_HOMOGENEOUS = ("relu", "leaky_relu", "identity")


def folded_column_bias(bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The bias of :func:`fold_batch_norm_columns`: ``b + shift / scale`` (``shift / scale`` without a bias)."""
    moved = shift / scale
    return moved if bias is None else bias + moved


def fold_batch_norm_columns(
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    head_weight: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    scale_columns=scale_columns,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fold an eval-mode batch norm after each sub-layer's Linear out of ``weight_x``, into the small weights.

    For a positively homogeneous activation (:data:`POSITIVELY_HOMOGENEOUS`), every ``scale > 0`` and one weight
    slot per sub-layer (no tying): ``act(z * s + t) = s * act(z + t / s)``, so sub-layer ``i`` computes
    ``H_i = s_i * G_i`` with ``G_i = act(Wx_i x_i + Wh_i H_{i-1} + b_i + t_i / s_i)`` and
    ``Wh_i H_{i-1} = (Wh_i * s_{i-1}) G_{i-1}`` (column ``k`` of ``Wh_i`` times ``s_{i-1}[k]``): the layer with
    weights ``weight_x`` (unchanged), ``weight_h'`` (columns scaled), ``bias' = b + t / s`` computes ``G``, and
    ``H = G * s`` (``s`` flattened over the sub-layers), which the head reads through ``head_weight' =
    head_weight * s`` (columns). ``fold_batch_norm``'s ``weight_x * scale`` is a pass over the largest weights on every
    call with autograd, and another in its backward; these products are over ``(L-1) * w * w`` and ``out * L * w``
    values. ``scale``, ``shift``: ``(L, w)``. Returns ``(weight_h', bias', head_weight', out_scale)``: with a head,
    ``out_scale`` is None; without one, ``head_weight'`` is None and the layer's output ``G`` times ``out_scale``
    (``(L * w,)``) is ``H``. ``scale_columns`` computes ``weight_h'``: :func:`scale_columns`, or one with the same
    values and another way to its gradients (``SpinalLinear`` in training: ``spinal_ops.ops._fold_rows``).
    """
    wh = scale_columns(weight_h, scale[:-1])
    b = folded_column_bias(bias, scale, shift)
    flat = scale.reshape(-1)
    if head_weight is None:
        return wh, b, None, flat
    return wh, b, head_weight * flat, None


def fold_batch_norm(
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    scale_rows=scale_rows,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold an eval-mode batch norm after each sub-layer's Linear into the packed weights.

    ``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``, both ``(Lx, w)``,
    one row per ``weight_x`` slot. ``BN(z) = z * scale + shift`` with ``z = Wx x + Wh h + b`` gives
    ``Wx' = Wx * scale``, ``Wh' = Wh * scale`` (``weight_h`` slot ``j`` serves ``weight_x`` slot ``j + 1``) and
    ``b' = b * scale + shift = (b - mean) * scale + beta``. Returns ``(weight_x', weight_h', bias')``. ``scale_rows``
    computes the two weight products: :func:`scale_rows`, or one with the same values and another way to its
    gradients (``SpinalLinear`` in training: ``spinal_ops.ops._fold_rows``).
    """
    wx = scale_rows(weight_x, scale)
    wh = scale_rows(weight_h, scale[1:])
    b = shift if bias is None else bias * scale + shift
    return wx, wh, b
