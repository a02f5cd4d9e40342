"""``SpinalLinear``: a drop-in for an ``nn.Linear`` classifier head (or a hidden layer) built as a SpinalNet."""

from __future__ import annotations


import torch
from torch import nn

from . import reference
from .ops import apply_spinal, spinal_linear


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
    num_layers : int
        ``L >= 1`` sub-layers.
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
        Sub-layers ``1 .. L-1`` share one set of weights (the original "SpinalNet SW").
    head : bool
        Classifier head (``True``) or hidden layer (``False``).

    Attributes
    ----------
    weight_x : ``(Lx, w, c)``; ``weight_h`` : ``(Lh, w, w)``; ``bias`` : ``(Lx, w)`` or None;
    head_weight : ``(out_features, L * w)`` or None; head_bias : ``(out_features,)`` or None.
    ``Lx = L`` and ``Lh = L - 1``, or ``min(L, 2)`` and ``min(L - 1, 1)`` with shared weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        layer_width: int | None = None,
        num_layers: int = 4,
        num_splits: int = 2,
        split_mode: str = "cyclic",
        activation: str = "relu",
        negative_slope: float = 0.01,
        shared_weights: bool = False,
        head: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_layers", num_layers), ("num_splits", num_splits)):
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

        self.in_features = in_features
        self.out_features = out_features
        self.layer_width = layer_width
        self.num_layers = num_layers
        self.num_splits = num_splits
        self.split_mode = split_mode
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.shared_weights = shared_weights
        self.head = head
        self.chunk = reference.chunk_size(in_features, num_splits)
        self._starts = reference.split_starts(in_features, num_splits, num_layers, split_mode)

        factory = {"device": device, "dtype": dtype}
        x_slots, h_slots = reference.num_slots(num_layers, shared_weights)
        self.weight_x = nn.Parameter(torch.empty(x_slots, layer_width, self.chunk, **factory))
        self.weight_h = nn.Parameter(torch.empty(h_slots, layer_width, layer_width, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(x_slots, layer_width, **factory)) if bias else None)
        self.register_parameter(
            "head_weight", nn.Parameter(torch.empty(out_features, num_layers * layer_width, **factory)) if head else None
        )
        self.register_parameter(
            "head_bias", nn.Parameter(torch.empty(out_features, **factory)) if (head and bias) else None
        )
        self.reset_parameters()

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
        p = self._parameters
        params = (p["weight_x"], p["weight_h"], p["bias"], p["head_weight"], p["head_bias"])
        wx = params[0]
        if input.dtype == wx.dtype and input.device == wx.device and wx.is_contiguous():
            # The common case, kept short (it runs on every call): hyper-parameters were validated at
            # construction, and parameters made by this module are contiguous (the kernels check the rest).
            return apply_spinal(input, params, self._starts, self.activation, self.negative_slope,
                                self.shared_weights)
        return spinal_linear(  # validates the input against the parameters, with messages naming both
            input, self.weight_x, self.weight_h, self.bias, self.head_weight, self.head_bias,
            num_layers=self.num_layers, num_splits=self.num_splits, split_mode=self.split_mode,
            activation=self.activation, negative_slope=self.negative_slope, shared_weights=self.shared_weights,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layer_width={self.layer_width}, num_layers={self.num_layers}, num_splits={self.num_splits}, "
            f"split_mode={self.split_mode!r}, activation={self.activation!r}, negative_slope={self.negative_slope}, "
            f"shared_weights={self.shared_weights}, head={self.head}"
        )

    # ------------------------------------------------------------------------------ original-script interop

    @classmethod
    def from_linears(
        cls,
        in_features: int,
        layers: list[nn.Linear],
        head: nn.Linear | None = None,
        *,
        num_splits: int = 2,
        split_mode: str = "cyclic",
        activation: str = "relu",
        negative_slope: float = 0.01,
    ) -> SpinalLinear:
        """Build from the original scripts' sub-layer ``nn.Linear`` list and optional head.

        ``layers[0]`` has ``in_features == c``, the others ``c + w`` (chunk columns first, then the previous
        output, as ``torch.cat([x_chunk, h_prev], 1)``). The same module object repeated for sub-layers
        ``1 ..`` means shared weights. ``head`` is the final ``Linear(L * w, out)``, or None for a hidden layer.
        Weights are copied (exact); the result is on the device and dtype of ``layers[0]``.
        """
        layers = list(layers)
        if not layers:
            raise ValueError("SpinalLinear.from_linears: layers must hold at least one nn.Linear, got none")
        chunk = reference.chunk_size(in_features, num_splits)
        width = layers[0].out_features
        bias = layers[0].bias is not None
        for i, lin in enumerate(layers):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"SpinalLinear.from_linears: layers[{i}] must be nn.Linear, got {type(lin).__name__}")
            fan_in = chunk if i == 0 else chunk + width
            if lin.in_features != fan_in or lin.out_features != width:
                raise ValueError(
                    f"SpinalLinear.from_linears: layers[{i}] must be Linear({fan_in}, {width}) for in_features="
                    f"{in_features}, num_splits={num_splits}; got Linear({lin.in_features}, {lin.out_features})"
                )
            if (lin.bias is not None) != bias:
                raise ValueError("SpinalLinear.from_linears: all layers (and the head) must agree on bias")
        shared = len(layers) > 2 and all(lin is layers[1] for lin in layers[1:])
        num_layers = len(layers)
        if head is not None:
            if head.in_features != num_layers * width:
                raise ValueError(
                    f"SpinalLinear.from_linears: head must have in_features = L * w = {num_layers * width}, "
                    f"got {head.in_features}"
                )
            if (head.bias is not None) != bias:
                raise ValueError("SpinalLinear.from_linears: all layers (and the head) must agree on bias")
        out_features = head.out_features if head is not None else num_layers * width
        ref = layers[0].weight
        module = cls(
            in_features, out_features, bias, layer_width=width, num_layers=num_layers, num_splits=num_splits,
            split_mode=split_mode, activation=activation, negative_slope=negative_slope, shared_weights=shared,
            head=head is not None, device=ref.device, dtype=ref.dtype,
        )
        with torch.no_grad():
            for slot in range(module.weight_x.shape[0]):
                lin = layers[slot]
                module.weight_x[slot].copy_(lin.weight[:, :chunk])
                if slot >= 1:
                    module.weight_h[slot - 1].copy_(lin.weight[:, chunk:])
                if bias:
                    module.bias[slot].copy_(lin.bias)
            if head is not None:
                module.head_weight.copy_(head.weight)
                if bias:
                    module.head_bias.copy_(head.bias)
        return module

    def to_linears(self) -> tuple[list[nn.Linear], nn.Linear | None]:
        """The equivalent original-script modules: ``(layers, head)`` (head None in hidden mode).

        With shared weights, ``layers[1:]`` are the same module object. Weights are copies.
        """
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
            layers = made if not self.shared_weights else made[:1] + [made[1]] * (self.num_layers - 1)
            head = None
            if self.head_weight is not None:
                head = nn.Linear(self.head_weight.shape[1], self.out_features, bias=has_bias, **factory)
                head.weight.copy_(self.head_weight)
                if has_bias:
                    head.bias.copy_(self.head_bias)
        return layers, head
