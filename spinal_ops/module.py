"""``SpinalLinear``: a drop-in for an ``nn.Linear`` classifier head (or a hidden layer) built as a SpinalNet."""

from __future__ import annotations

import torch
from torch import nn

from . import backends, interop, ops, reference
from .ops import check_input, layer_spec, run


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
    with its running statistics into ``weight_x``, ``weight_h`` and ``bias``
    (:func:`spinal_ops.reference.fold_batch_norm`), or, on CPU tensors where the activation is relu, leaky_relu or
    identity, no slot is tied and every scale ``weight / sqrt(running_var + eps)`` is positive, out of ``weight_x``
    into the columns of ``weight_h`` and ``head_weight`` and into ``bias`` (or the output, without a head;
    :func:`spinal_ops.reference.fold_batch_norm_columns`: ``weight_x``, the largest weights, is then used as it is).
    Without autograd (inference) the folded weights are kept and reused until a weight or batch-norm tensor
    changes; with autograd they are folded on every call, for float32 / float64 weights of 1 MB or more on CPU into
    buffers kept with the layer (one more copy of such a weight per product alive at once;
    ``spinal_ops.ops._fold_rows``). Without either, nothing changes on the fused path.

    ``dropout`` may be changed later by assigning the attribute, and ``norms`` replaced (or set to None); the
    other hyper-parameters are read-only attributes (the weights' shapes depend on them).

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
        where = "SpinalLinear"
        if num_layers is None and weight_slots is None:
            num_layers = 4
        if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features < 1:
            raise ValueError(f"{where}: out_features must be an integer >= 1, got {out_features!r}")
        spec = layer_spec(in_features, num_layers=num_layers, num_splits=num_splits, split_mode=split_mode,
                          activation=activation, negative_slope=negative_slope, shared_weights=shared_weights,
                          weight_slots=weight_slots, default_layers=4, where=where)
        num_layers = spec.num_layers
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
            raise ValueError(f"{where}: layer_width must be an integer >= 1, got {layer_width!r}")

        self._spec = spec  # the hyper-parameters, fixed for the layer's life (read-only attributes below)
        self.out_features = out_features
        self.layer_width = layer_width
        self.head = head
        factory = {"device": device, "dtype": dtype}
        x_slots, h_slots = spec.num_slots
        self.weight_x = nn.Parameter(torch.empty(x_slots, layer_width, spec.chunk, **factory))
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
        self.dropout = dropout
        self.reset_parameters()

    # The hyper-parameters (read-only: the weights' shapes and the op arguments depend on them).
    in_features = property(lambda self: self._spec.in_features, doc="D, as nn.Linear's in_features.")
    num_layers = property(lambda self: self._spec.num_layers, doc="L, the number of sub-layers.")
    num_splits = property(lambda self: self._spec.num_splits, doc="K: the chunk size is round(in_features / K).")
    split_mode = property(lambda self: self._spec.split_mode, doc='"cyclic" or "alternate".')
    chunk = property(lambda self: self._spec.chunk, doc="c = round(in_features / num_splits).")
    activation = property(lambda self: self._spec.activation, doc="The sub-layers' activation.")
    negative_slope = property(lambda self: self._spec.negative_slope, doc="The slope of leaky_relu.")
    weight_slots = property(lambda self: self._spec.slots, doc="The weight slot of each sub-layer (L ints).")

    @property
    def shared_weights(self) -> bool:
        """Whether the tying is "SpinalNet SW": sub-layers ``1 .. L-1`` share one slot (``L > 2``)."""
        return self.num_layers > 2 and self.weight_slots == reference.weight_slots(self.num_layers, True)

    @property
    def dropout(self) -> float:
        """Dropout probability before each sub-layer and the head (0: none); may be assigned."""
        return self._dropout

    @dropout.setter
    def dropout(self, p: float) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"SpinalLinear: dropout must be a probability in [0, 1], got {p!r}")
        self._dropout = float(p)

    @property
    def _blocks(self) -> bool:
        """Whether forward goes through :meth:`_forward_blocks` (dropout or batch norms)."""
        return self._dropout > 0 or self.norms is not None

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
        if self._dropout > 0 or self._modules.get("norms") is not None:  # self._blocks, on the per-call path
            check_input(input, "SpinalLinear", self.in_features)
            return self._forward_blocks(input)
        p = self._parameters  # run() checks the input
        try:
            params = (p["weight_x"], p["weight_h"], p["bias"], p["head_weight"], p["head_bias"])
        except KeyError:  # a parametrized (torch.nn.utils.parametrize) or pruned (prune) weight: an attribute
            params = (self.weight_x, self.weight_h, self.bias, self.head_weight, self.head_bias)
        return run(input, params, self._spec, "SpinalLinear")

    def _forward_blocks(self, input: torch.Tensor) -> torch.Tensor:
        """Forward with dropout and/or batch norm: fused when they reduce to an affine map, else unfused."""
        norms = self.norms
        unfused = (self.training and self._dropout > 0) or (
            norms is not None and any(n.training or n.running_var is None for n in norms)
        )
        spec = self._spec
        if unfused:  # plain PyTorch, bit for bit the original blocks
            out = reference.spinal_forward_blocks(
                input.reshape(-1, spec.in_features), self.weight_x, self.weight_h, self.bias, self.head_weight,
                self.head_bias, *spec.op_args, dropout=self._dropout, training=self.training, norms=norms,
                dropout_fn=ops.dropout,
            )
            return out.reshape(*input.shape[:-1], out.shape[-1])
        if norms is None:  # eval-mode dropout is the identity
            return run(input, (self.weight_x, self.weight_h, self.bias, self.head_weight, self.head_bias), spec,
                       "SpinalLinear")
        weight_x, weight_h, bias, head_weight, out_scale = self._folded_weights()
        out = run(input, (weight_x, weight_h, bias, head_weight, self.head_bias), spec, "SpinalLinear")
        return out if out_scale is None else out * out_scale.to(out.dtype)  # the autocast dtype, if any

    def _folded_weights(self) -> tuple:
        """``(weight_x, weight_h, bias, head_weight, out_scale)``: the layer's weights with the eval-mode batch norms
        folded in (:meth:`_fold`), and the scale of the output (None, or ``(L * w,)``: the layer's output times it).

        Without autograd (``torch.no_grad`` / ``torch.inference_mode``: inference) the folded tensors are kept
        and reused until a tensor they come from changes (another tensor object, storage or version: in-place
        updates, ``load_state_dict``, ``.to()``, ``.data`` assignment), so repeated inference does not fold on
        every call. With autograd they are folded on each call, in the graph (``spinal_ops.ops._fold_rows``).
        """
        compiling = torch.compiler.is_compiling()
        if torch.is_grad_enabled() and not compiling and not torch.is_inference_mode_enabled():
            # training: kept buffers, a one-pass backward (ops._fold_rows)
            buffers = self.__dict__.get("_fold_buffers") or self.__dict__.setdefault("_fold_buffers", ops.FoldBuffers())
            return self._fold(lambda w, s: ops._fold_rows(w, s, buffers),
                              lambda w, s: ops._fold_rows(w, s, buffers, columns=True))
        if torch.is_grad_enabled() or compiling:
            return self._fold()
        sources = self._fold_sources()
        stamp = tuple((t.data_ptr(), t._version) if isinstance(t, torch.Tensor) else t for t in sources)
        cached = self.__dict__.get("_fold_cache")  # (sources, stamp, folded)
        if cached is not None and cached[1] == stamp and all(a is b for a, b in zip(cached[0], sources, strict=True)):
            return cached[2]
        folded = self._fold()
        self.__dict__["_fold_cache"] = (sources, stamp, folded)
        return folded

    def _fold(self, scale_rows=reference.scale_rows, scale_columns=reference.scale_columns) -> tuple:
        """The batch norms folded out of ``weight_x`` (:func:`spinal_ops.reference.fold_batch_norm_columns`, its
        ``weight_h`` product by ``scale_columns``) where :meth:`_folds_columns` allows it, else into it
        (:func:`spinal_ops.reference.fold_batch_norm`, its weight products by ``scale_rows``). Returns what
        :meth:`_folded_weights` returns."""
        scale, shift = self._batch_norm_affine()
        if self._folds_columns(scale, shift):
            weight_h, bias, head_weight, out_scale = reference.fold_batch_norm_columns(
                self.weight_h, self.bias, self.head_weight, scale, shift, scale_columns=scale_columns)
            return self.weight_x, weight_h, bias, head_weight, out_scale
        folded = reference.fold_batch_norm(self.weight_x, self.weight_h, self.bias, scale, shift, scale_rows=scale_rows)
        return (*folded, self.head_weight, None)

    def _folds_columns(self, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        """Whether the batch norms fold out of ``weight_x`` (see :func:`spinal_ops.reference.fold_batch_norm_columns`):
        a positively homogeneous activation, one weight slot per sub-layer, every scale positive and the folded bias
        ``b + shift / scale`` finite (it overflows for a scale near zero); on CPU tensors (the check reads the values:
        on a GPU that would wait for the device on every call), and neither under ``torch.compile`` (a branch on
        values) nor inside a ``torch.func`` transform. The values are checked in one reduction (one host read)."""
        spec = self._spec
        if spec.activation not in reference.POSITIVELY_HOMOGENEOUS or spec.slots != tuple(range(spec.num_layers)) or \
                not scale.is_cpu or torch.compiler.is_compiling() or backends.autograd_transformed():
            return False
        with torch.no_grad():
            bias = reference.folded_column_bias(self.bias, scale, shift)
            return bool(((scale > 0) & torch.isfinite(bias)).all())

    def _fold_sources(self) -> list:
        """What the folded weights depend on: the weights and every batch norm's state and eps."""
        out = [self.weight_x, self.weight_h, self.bias, self.head_weight]
        for n in self.norms:
            out += [n.running_mean, n.running_var, n.weight, n.bias, n.eps]
        return out

    def _batch_norm_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)``, each ``(Lx, w)``: eval-mode batch norm of slot ``j`` is ``z * scale[j] + shift[j]``.

        Computed on the stacked statistics, a few ops for all slots (with autograd each op is a graph node, on every
        call): element for element each norm's own ``weight / sqrt(running_var + eps)`` and
        ``bias - running_mean * scale`` (a norm without affine parameters takes weight 1 and bias 0, exactly)."""
        norms = list(self.norms)
        var = torch.stack([n.running_var for n in norms])
        eps = {n.eps for n in norms}
        eps = eps.pop() if len(eps) == 1 else var.new_tensor([n.eps for n in norms]).unsqueeze(1)
        scale = 1.0 / torch.sqrt(var + eps)
        if any(n.weight is not None for n in norms):
            scale = scale * torch.stack([n.weight if n.weight is not None else torch.ones_like(n.running_var)
                                         for n in norms])
        shift = -torch.stack([n.running_mean for n in norms]) * scale
        if any(n.bias is not None for n in norms):
            shift = shift + torch.stack([n.bias if n.bias is not None else torch.zeros_like(n.running_mean)
                                         for n in norms])
        return scale, shift

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double() / .cuda(): the derived tensors (the inference fold, the training fold's buffers) would keep
        # the old weights' device and dtype alive; they are made afresh on the next call.
        self.__dict__.pop("_fold_cache", None)
        self.__dict__.pop("_fold_buffers", None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_fold_cache", None)  # derived; copies and pickles fold afresh
        state.pop("_fold_buffers", None)
        return state

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
    def from_linears(cls, in_features: int, layers: list[nn.Module], head: nn.Module | None = None, *,
                     num_splits: int = 2, split_mode: str = "cyclic", activation: str | None = None,
                     negative_slope: float | None = None) -> SpinalLinear:
        """Build from the original scripts' sub-layers and optional head (:func:`spinal_ops.interop.from_linears`)."""
        return interop.from_linears(cls, in_features, layers, head, num_splits=num_splits, split_mode=split_mode,
                                    activation=activation, negative_slope=negative_slope)

    def to_linears(self) -> tuple[list[nn.Linear], nn.Linear | None]:
        """The equivalent original-script ``nn.Linear`` modules (:func:`spinal_ops.interop.to_linears`)."""
        return interop.to_linears(self)

    def to_blocks(self) -> tuple[list[nn.Sequential], nn.Module | None]:
        """The original-script blocks, with dropout and batch norm (:func:`spinal_ops.interop.to_blocks`)."""
        return interop.to_blocks(self)

