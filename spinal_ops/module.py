"""``SpinalLinear``: a drop-in for an ``nn.Linear`` classifier head (or a hidden layer) built as a SpinalNet."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from . import reference
from .ops import apply_spinal, resolve_slots, spinal_linear


def default_layer_width(in_features: int, num_splits: int) -> int:
    """Default sub-layer width of a head: a quarter of the chunk size, clamped to [16, 512].

    For the heads of the original repository this gives 64 (D = 512, K = 2) and 256 (D = 2048, K = 2): narrow
    enough that the spinal head needs fewer FLOPs than the dense layer, wide enough to carry the features.
    """
    return max(16, min(512, reference.chunk_size(in_features, num_splits) // 4))


class SpinalLinear(nn.Module):
    r"""A SpinalNet layer with a fused forward and backward; a drop-in for ``nn.Linear``.

    ``(*, in_features) -> (*, out_features)``. The input is split into chunks of ``c = round(in_features /
    num_splits)`` columns; sub-layer ``i`` (``L = num_layers`` of them, each ``layer_width`` wide) sees its
    chunk and the previous sub-layer's output, and the outputs are concatenated into ``H`` (``L * w`` wide).

    Parameters
    ----------
    in_features, out_features : int
        As ``nn.Linear``. With ``head=True`` the SpinalNet classifier: ``H`` goes through a final
        ``Linear(L * w, out_features)``. With ``head=False`` (a spinal hidden layer) the output is ``H`` itself
        and ``out_features`` must equal ``num_layers * layer_width``.
    bias : bool
        Biases on every sub-layer and on the head.
    layer_width : int, optional
        Width ``w`` of each sub-layer. Default: head mode :func:`default_layer_width`; hidden mode
        ``out_features // num_layers`` (which must divide).
    num_layers : int, optional
        ``L >= 1`` sub-layers. Default: ``len(weight_slots)``, else 4.
    num_splits : int
        ``K``: the chunk size is ``round(in_features / K)``.
    split_mode : {"cyclic", "alternate"}
        ``cyclic``: sub-layer ``i`` starts at column ``(i * c) mod D`` and chunks wrap (the original
        customizable model). ``alternate``: sub-layer ``i`` starts at ``(i mod K) * c`` (the original fixed
        heads).
    activation : {"relu", "leaky_relu", "tanh", "sigmoid", "identity", "gelu", "silu"}
    negative_slope : float
        Slope of ``leaky_relu``.
    shared_weights : bool
        Sub-layers ``1 .. L-1`` share one set of weights (the original "SpinalNet SW"); the same as
        ``weight_slots=[0, 1, 1, ..., 1]``.
    weight_slots : sequence of int, optional
        Any weight tying: sub-layer ``i`` uses weight slot ``weight_slots[i]`` (its ``weight_x``, ``bias``, batch
        norm and, for ``i >= 1``, ``weight_h[weight_slots[i] - 1]``). Slot 0 belongs to sub-layer 0 alone (its input
        is narrower); the slots are numbered ``0 .. S-1``, each used. E.g. ``[0, 1, 2, 3, 2, 3]``: the original
        regression and transfer-learning scripts, which call ``fc1, fc2, fc3, fc4, fc3, fc4``. Gradients of a tied
        slot add up. Default: every sub-layer has its own weights.
    head : bool
        Classifier head (``True``) or hidden layer (``False``).
    dropout : float
        Probability ``p`` of a ``Dropout`` before each sub-layer's Linear (on ``cat([x_chunk, h_prev])``) and
        before the head (the VGG and transfer-learning heads). Default 0: none.
    batch_norm : bool
        A ``BatchNorm1d(layer_width)`` after each sub-layer's Linear, before the activation (in
        :attr:`norms`, one per weight slot: tied exactly as the weights are).

    With ``dropout > 0`` or ``batch_norm``, train mode runs the blocks unfused, in plain PyTorch
    (:func:`spinal_ops.reference.spinal_forward_blocks`: dropout and batch statistics cannot run inside the
    fused kernels). Eval mode runs fused on any backend: dropout is the identity and each batch norm is folded
    into ``weight_x``, ``weight_h`` and ``bias`` with its running statistics
    (:func:`spinal_ops.reference.fold_batch_norm`). Without either, nothing changes on the fused path.

    ``dropout`` may be changed later by assigning the attribute; whether there are batch norms is fixed at
    construction.

    Under ``torch.autocast`` the layer computes in the autocast dtype, as ``nn.Linear`` does
    (:func:`spinal_ops.ops.autocast_args`).

    Attributes
    ----------
    weight_x : ``(S, w, c)``; ``weight_h`` : ``(S - 1, w, w)``; ``bias`` : ``(S, w)`` or None;
    head_weight : ``(out_features, L * w)`` or None; head_bias : ``(out_features,)`` or None.
    norms : ``nn.ModuleList`` of ``S`` ``nn.BatchNorm1d(w)``, or None.
    weight_slots : tuple of ``L`` ints, the slot of each sub-layer. ``S = max(weight_slots) + 1``: ``L`` without
    tying, ``min(L, 2)`` with shared weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        layer_width: int | None = None,
        num_layers: int | None = None,
        num_splits: int = 2,
        split_mode: str = "cyclic",
        activation: str = "relu",
        negative_slope: float = 0.01,
        shared_weights: bool = False,
        weight_slots=None,
        head: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_layers is None and weight_slots is None:
            num_layers = 4
        num_layers, slots = resolve_slots(num_layers, shared_weights, weight_slots, 4, "SpinalLinear")
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_splits", num_splits)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SpinalLinear: {name} must be an integer >= 1, got {value!r}")
        if split_mode not in reference.SPLIT_MODES:
            raise ValueError(f"SpinalLinear: split_mode must be one of {reference.SPLIT_MODES}, got {split_mode!r}")
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"SpinalLinear: activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
        if head:
            if layer_width is None:
                layer_width = default_layer_width(in_features, num_splits)
        else:
            if layer_width is None:
                if out_features % num_layers != 0:
                    raise ValueError(
                        f"SpinalLinear(head=False): out_features must be num_layers * layer_width; "
                        f"out_features={out_features} is not divisible by num_layers={num_layers}"
                    )
                layer_width = out_features // num_layers
            elif layer_width * num_layers != out_features:
                raise ValueError(
                    f"SpinalLinear(head=False): out_features must equal num_layers * layer_width = "
                    f"{num_layers} * {layer_width} = {num_layers * layer_width}, got {out_features}"
                )
        if not isinstance(layer_width, int) or isinstance(layer_width, bool) or layer_width < 1:
            raise ValueError(f"SpinalLinear: layer_width must be an integer >= 1, got {layer_width!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"SpinalLinear: dropout must be a probability in [0, 1], got {dropout!r}")

        self.in_features = in_features
        self.out_features = out_features
        self.layer_width = layer_width
        self.num_layers = num_layers
        self.num_splits = num_splits
        self.split_mode = split_mode
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.weight_slots = slots
        self._slots = list(slots)  # the op argument
        self.head = head
        self.chunk = reference.chunk_size(in_features, num_splits)
        self._starts = reference.split_starts(in_features, num_splits, num_layers, split_mode)

        factory = {"device": device, "dtype": dtype}
        x_slots, h_slots = reference.num_slots(slots)
        self.weight_x = nn.Parameter(torch.empty(x_slots, layer_width, self.chunk, **factory))
        self.weight_h = nn.Parameter(torch.empty(h_slots, layer_width, layer_width, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(x_slots, layer_width, **factory)) if bias else None)
        self.register_parameter(
            "head_weight",
            nn.Parameter(torch.empty(out_features, num_layers * layer_width, **factory)) if head else None
        )
        self.register_parameter(
            "head_bias", nn.Parameter(torch.empty(out_features, **factory)) if (head and bias) else None
        )
        if batch_norm:
            self.norms = nn.ModuleList(nn.BatchNorm1d(layer_width, **factory) for _ in range(x_slots))
        else:
            self.norms = None
        self.dropout = dropout  # also sets self._blocks
        self.reset_parameters()

    @property
    def shared_weights(self) -> bool:
        """Whether the tying is "SpinalNet SW": sub-layers ``1 .. L-1`` share one slot (``L > 2``)."""
        return self.num_layers > 2 and self.weight_slots == reference.weight_slots(self.num_layers, True)

    @property
    def dropout(self) -> float:
        """Dropout probability before each sub-layer and the head (0: none)."""
        return self._dropout

    @dropout.setter
    def dropout(self, p: float) -> None:
        self._dropout = float(p)
        # One flag read by forward: False keeps the fused fast path exactly as without these features.
        self._blocks = self._dropout > 0 or self.norms is not None

    def reset_parameters(self) -> None:
        """Initialise like the ``nn.Linear`` chain it replaces: uniform in ``+-1/sqrt(fan_in)``."""
        with torch.no_grad():
            for slot in range(self.weight_x.shape[0]):
                fan_in = self.chunk if slot == 0 else self.chunk + self.layer_width
                bound = reference.init_bound(fan_in)
                self.weight_x[slot].uniform_(-bound, bound)
                if slot >= 1:
                    self.weight_h[slot - 1].uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias[slot].uniform_(-bound, bound)
            if self.head_weight is not None:
                bound = reference.init_bound(self.head_weight.shape[1])
                self.head_weight.uniform_(-bound, bound)
                if self.head_bias is not None:
                    self.head_bias.uniform_(-bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            got = tuple(input.shape)
            raise ValueError(
                f"SpinalLinear: expected input of shape (*, {self.in_features}) (in_features), got shape {got}"
            )
        if self._blocks:
            return self._forward_blocks(input)
        p = self._parameters
        params = (p["weight_x"], p["weight_h"], p["bias"], p["head_weight"], p["head_bias"])
        wx = params[0]
        if input.dtype == wx.dtype and input.device == wx.device and wx.is_contiguous():
            # The common case, kept short (it runs on every call): hyper-parameters were validated at
            # construction, and parameters made by this module are contiguous (the kernels check the rest).
            return apply_spinal(input, params, self._starts, self._slots, self.activation, self.negative_slope)
        return self._fused(input, self.weight_x, self.weight_h, self.bias)

    def _fused(self, input, weight_x, weight_h, bias) -> torch.Tensor:
        return spinal_linear(  # validates the input against the parameters, with messages naming both
            input, weight_x, weight_h, bias, self.head_weight, self.head_bias,
            num_layers=self.num_layers, num_splits=self.num_splits, split_mode=self.split_mode,
            activation=self.activation, negative_slope=self.negative_slope, weight_slots=self.weight_slots,
        )

    def _forward_blocks(self, input: torch.Tensor) -> torch.Tensor:
        """Forward with dropout and/or batch norm: fused when they reduce to an affine map, else unfused."""
        norms = self.norms
        unfused = (self.training and self._dropout > 0) or (
            norms is not None and any(n.training or n.running_var is None for n in norms)
        )
        if not unfused:
            if norms is None:  # eval-mode dropout is the identity
                return self._fused(input, self.weight_x, self.weight_h, self.bias)
            scale, shift = self._batch_norm_affine()
            weight_x, weight_h, bias = reference.fold_batch_norm(self.weight_x, self.weight_h, self.bias, scale, shift)
            return self._fused(input, weight_x, weight_h, bias)
        wx = self.weight_x
        if input.dtype != wx.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(f"SpinalLinear: weight_x has dtype {wx.dtype} but input has dtype {input.dtype}; "
                            "they must match (cast the module with .to(dtype) or the input)")
        x2d = input.reshape(-1, self.in_features)
        out = reference.spinal_forward_blocks(
            x2d, wx, self.weight_h, self.bias, self.head_weight, self.head_bias, self._starts, self._slots,
            self.activation, self.negative_slope, dropout=self._dropout, training=self.training, norms=norms,
        )
        return out.reshape(*input.shape[:-1], out.shape[-1])

    def _batch_norm_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)``, each ``(Lx, w)``: eval-mode batch norm of slot ``j`` is ``z * scale[j] + shift[j]``."""
        scales, shifts = [], []
        for n in self.norms:
            scale = 1.0 / torch.sqrt(n.running_var + n.eps)
            if n.weight is not None:
                scale = scale * n.weight
            shift = -n.running_mean * scale
            if n.bias is not None:
                shift = shift + n.bias
            scales.append(scale)
            shifts.append(shift)
        return torch.stack(scales), torch.stack(shifts)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layer_width={self.layer_width}, num_layers={self.num_layers}, num_splits={self.num_splits}, "
            f"split_mode={self.split_mode!r}, activation={self.activation!r}, negative_slope={self.negative_slope}, "
            f"shared_weights={self.shared_weights}, head={self.head}"
        )
        if not self.shared_weights and self.weight_slots != reference.weight_slots(self.num_layers):
            text += f", weight_slots={list(self.weight_slots)}"
        if self._dropout > 0:
            text += f", dropout={self._dropout}"
        return text  # the batch norms print as the child module `norms`

    # ------------------------------------------------------------------------------ original-script interop

    @classmethod
    def from_linears(
        cls,
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

    def to_linears(self) -> tuple[list[nn.Linear], nn.Linear | None]:
        """The equivalent original-script modules: ``(layers, head)`` (head None in hidden mode).

        Tied sub-layers are the same module object, in the layer's pattern (``weight_slots``). Weights are copies.
        A layer with dropout or batch norm raises ``ValueError`` (use :meth:`to_blocks`, which keeps them).
        """
        if self._blocks:
            raise ValueError("SpinalLinear.to_linears: this layer has dropout or batch norm, which plain nn.Linear "
                             "modules cannot hold; use to_blocks()")
        return self._linears()

    def to_blocks(self) -> tuple[list[nn.Sequential], nn.Module | None]:
        """The original-script blocks: ``(layers, head)`` with ``layers[i] = nn.Sequential([Dropout,] Linear,
        [BatchNorm1d,] activation)`` and ``head = nn.Sequential(Dropout, Linear)`` (just the Linear without
        dropout; None in hidden mode). Copies; tied sub-layers are one module object, in the layer's pattern.
        :meth:`from_linears` reads them back exactly.
        """
        linears, head = self._linears()
        made = []
        for slot in range(self.weight_x.shape[0]):
            parts = [nn.Dropout(self._dropout)] if self._dropout > 0 else []
            parts.append(linears[slot])
            if self.norms is not None:
                parts.append(copy.deepcopy(self.norms[slot]))
            parts.append(_activation_module(self.activation, self.negative_slope))
            made.append(nn.Sequential(*parts))
        blocks = [made[s] for s in self.weight_slots]
        if head is not None and self._dropout > 0:
            head = nn.Sequential(nn.Dropout(self._dropout), head)
        return blocks, head

    def _linears(self) -> tuple[list[nn.Linear], nn.Linear | None]:
        factory = {"device": self.weight_x.device, "dtype": self.weight_x.dtype}
        has_bias = self.bias is not None
        made: list[nn.Linear] = []
        with torch.no_grad():
            for slot in range(self.weight_x.shape[0]):
                fan_in = self.chunk if slot == 0 else self.chunk + self.layer_width
                lin = nn.Linear(fan_in, self.layer_width, bias=has_bias, **factory)
                if slot == 0:
                    lin.weight.copy_(self.weight_x[0])
                else:
                    lin.weight.copy_(torch.cat([self.weight_x[slot], self.weight_h[slot - 1]], dim=1))
                if has_bias:
                    lin.bias.copy_(self.bias[slot])
                made.append(lin)
            layers = [made[s] for s in self.weight_slots]
            head = None
            if self.head_weight is not None:
                head = nn.Linear(self.head_weight.shape[1], self.out_features, bias=has_bias, **factory)
                head.weight.copy_(self.head_weight)
                if has_bias:
                    head.bias.copy_(self.head_bias)
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

    def __init__(self, linear, dropout=0.0, norm=None, activation=None, activation_text="no activation module"):
        self.linear = linear
        self.dropout = dropout
        self.norm = norm
        self.activation = activation  # (name, negative_slope) or None
        self.activation_text = activation_text


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


# ---------------------------------------------------------------------------------------- swapping a head

_PATH = re.compile(r"(?:[^.\[\]]+|\[-?\d+\])(?:\.[^.\[\]]+|\[-?\d+\])*")
_PATH_TOKEN = re.compile(r"\[(-?\d+)\]|([^.\[\]]+)")


def replace_linear(model: nn.Module, name: str = "fc", **spinal_kwargs) -> SpinalLinear:
    """Replace the ``nn.Linear`` at ``name`` in ``model`` by a :class:`SpinalLinear` of the same in/out features.

    ``name`` is a dotted path as in ``model.named_modules()`` (``"fc"``, ``"head"``, ``"classifier.6"``), where a
    bracketed index picks a child by position (``"classifier[-1]"``, ``"blocks[2].fc"``). The new layer is
    on the old one's device and dtype, in its train/eval mode, with a bias when it had one (unless
    ``spinal_kwargs`` say otherwise); ``spinal_kwargs`` go to :class:`SpinalLinear`. Returns the new layer
    (already in the model; its parameters are new, so build the optimizer afterwards).

    Raises ``ValueError`` (a path that does not parse), ``AttributeError`` (no such child), ``IndexError``
    (position out of range) or ``TypeError`` (not an ``nn.Linear``), each naming the path.
    """
    where = "replace_linear"
    if not isinstance(name, str) or not _PATH.fullmatch(name):
        raise ValueError(f"{where}: cannot parse module path {name!r}; write e.g. 'fc', 'classifier.6' or "
                         "'classifier[-1]'")
    parent, key, walked = None, None, ""
    current = model
    for index, attr in _PATH_TOKEN.findall(name):
        parent, parent_path = current, repr(walked) if walked else "the model"
        children = list(current._modules)
        if attr:
            walked = f"{walked}.{attr}" if walked else attr
            if attr not in children:
                raise AttributeError(f"{where}: {type(model).__name__} has no submodule {walked!r} ({parent_path} "
                                     f"is {type(parent).__name__} with children: {', '.join(children) or 'none'})")
            key = attr
        else:
            walked = f"{walked}[{index}]"
            if not -len(children) <= int(index) < len(children):
                raise IndexError(f"{where}: index {index} in {walked!r} is out of range: {parent_path} is "
                                 f"{type(parent).__name__} with {len(children)} children")
            key = children[int(index)]
        current = current._modules[key]
    if not isinstance(current, nn.Linear):
        raise TypeError(f"{where}: {walked!r} is {type(current).__name__}, not nn.Linear")
    weight = current.weight
    kwargs = {"bias": current.bias is not None, **spinal_kwargs, "device": weight.device, "dtype": weight.dtype}
    spinal = SpinalLinear(current.in_features, current.out_features, **kwargs)
    spinal.train(current.training)
    setattr(parent, key, spinal)
    return spinal
