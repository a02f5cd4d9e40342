"""Python-side registrations of the spinal ops, and the functional form.

This is the one Python module that registers fake kernels and autograd formulas (for the Triton and gemm ops too,
through :func:`register_op_pair`; those ops themselves are registered in ``triton_kernels/ops.py`` and
``spinal_ops/gemm.py``). The native schemas are defined in ``csrc/spinal_ops.cpp``; the Triton and gemm ops mirror
them one to one (same arguments, same outputs), so every family shares the fake kernels below. The native ops'
autograd is the same formula written in C++ (``csrc/spinal_autograd.cpp``), which keeps Python off the per-call path
of training.

Op contract (2-D ``x``; see :mod:`spinal_ops.reference` for the math):

- ``spinal_forward(x, weight_x, weight_h, bias?, head_weight?, head_bias?, starts, slots, activation,
  negative_slope) -> (H (B, L*w), y (B, out) or (B, 0) in hidden mode)``
- ``_spinal_backward(grad_y?, grad_H?, x, H, weight_x, weight_h, bias?, head_weight?, starts, slots, activation,
  negative_slope, output_mask[6]) -> (dx, dweight_x, dweight_h, dbias, dhead_weight, dhead_bias)``, gradients
  not asked for by ``output_mask`` come back empty.

Saved for backward: ``x``, ``H`` and the weights; nothing else. The backward ops are differentiable (double
backward), from :func:`reference.spinal_backward`, the same math in differentiable PyTorch ops: the native op's
autograd kernel (C++) computes the backward with it whenever the result needs a graph (``create_graph=True``);
the Triton and gemm backward ops keep their kernels and differentiate through the vector-Jacobian product of
``reference.spinal_backward`` (``torch.func.vjp``, so any order works).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import threading
import warnings
import weakref

import torch
from torch import Tensor

from . import backends, reference
from .backends import select_backend


def _load_native() -> ImportError | OSError | None:
    """Load ``spinal_ops._C`` (which registers the native ops); the error when it cannot be loaded.

    A source checkout without a build has no ``_C``: only ``reference`` (and ``triton``) run, silently. A ``_C``
    that exists but fails to load (built against another torch: undefined symbols; a missing CUDA library) warns
    once, naming the torch it was built for, the running one and the rebuild command, and the package runs on the
    other backends.
    """
    try:
        importlib.import_module(f"{__package__}._C")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}._C":
            raise
        return exc
    except (ImportError, OSError) as exc:
        warnings.warn(native_load_message(exc), RuntimeWarning, stacklevel=3)
        return exc
    return None


def native_load_message(exc: BaseException) -> str:
    """What went wrong loading ``spinal_ops._C`` and what to do (the warning, and ``python -m spinal_ops check``)."""
    try:
        from ._build_info import CONFIG

        built = f"torch {CONFIG['torch']}"
    except ImportError:
        built = "an unknown torch (no build record)"
    return (
        f"spinal_ops: the native extension spinal_ops._C failed to load: {exc}. It was built for {built}; this is "
        f"torch {torch.__version__}. Rebuild it against this torch: `pip install --no-build-isolation -e .` in a "
        "source checkout (or `pip install --no-build-isolation --force-reinstall --no-deps .`). Until then the cpu "
        "and cuda backends are unavailable, and so is triton (it needs the native argument checks); spinal ops run on "
        "reference."
    )


NATIVE_IMPORT_ERROR = _load_native()


# ----------------------------------------------------------------------------------------------- fake kernels


def _fake_forward(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation, negative_slope):
    rows = x.shape[0]
    hidden = len(starts) * weight_x.shape[1]
    out = head_weight.shape[0] if head_weight is not None else 0
    return x.new_empty(rows, hidden), x.new_empty(rows, out)


def _fake_backward(grad_y, grad_h, x, h_all, weight_x, weight_h, bias, head_weight, starts, slots, activation,
                   negative_slope, output_mask):
    def like(t, wanted):
        return torch.empty_like(t) if (wanted and t is not None) else x.new_empty(0)

    dhead_bias = (
        x.new_empty(head_weight.shape[0]) if (output_mask[5] and head_weight is not None) else x.new_empty(0)
    )
    return (
        like(x, output_mask[0]),
        like(weight_x, output_mask[1]),
        like(weight_h, output_mask[2]),
        like(bias, output_mask[3]),
        like(head_weight, output_mask[4]),
        dhead_bias,
    )


# --------------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation, negative_slope = inputs
    h_all, _ = output
    ctx.save_for_backward(x, h_all, weight_x, weight_h, bias, head_weight)
    ctx.hyper = (list(starts), list(slots), activation, float(negative_slope))
    ctx.has_head_bias = head_bias is not None
    ctx.set_materialize_grads(False)


def effective_output_mask(output_mask, bias: Tensor | None, head_weight: Tensor | None,
                          has_head_bias: bool = True) -> list[bool]:
    """The backward op's output mask with the gradients of absent tensors dropped (``dbias`` without a bias,
    ``dhead_weight`` and ``dhead_bias`` without a head, ``dhead_bias`` without a head bias).

    The Python side of the one rule; the native ops apply the same in C++ (``csrc/spinal_args.cpp``).
    """
    has_head = head_weight is not None
    return [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]),
            bool(output_mask[3]) and bias is not None, bool(output_mask[4]) and has_head,
            bool(output_mask[5]) and has_head and has_head_bias]


def _make_backward(backward_op):
    def backward(ctx, grad_h, grad_y):
        x, h_all, weight_x, weight_h, bias, head_weight = ctx.saved_tensors
        mask = effective_output_mask(ctx.needs_input_grad[:6], bias, head_weight, ctx.has_head_bias)
        if not any(mask):
            return (None,) * 10
        if head_weight is None or (grad_y is not None and grad_y.shape[1] == 0):
            grad_y = None
        grads = backward_op(
            grad_y.contiguous() if grad_y is not None else None,
            grad_h.contiguous() if grad_h is not None else None,
            x, h_all, weight_x, weight_h, bias, head_weight, *ctx.hyper, mask,
        )
        return tuple(g if m else None for g, m in zip(grads, mask, strict=False)) + (None,) * 4

    return backward


_CHECKED: set = set()  # (backend, signature: sizes, dtypes, devices, layouts, hyper-parameters) that passed


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.is_contiguous()) if isinstance(a, Tensor)
                 else tuple(a) if isinstance(a, list) else a for a in args)


def check_args(backend: str, *args) -> None:
    """The shared argument checks of the ops written in Python (triton, gemm), naming ``backend``: once per
    signature (they read only sizes, dtypes, devices, layouts and hyper-parameters), then remembered. They are the
    native library's (``csrc/spinal_args.cpp``): those backends are available only where ``spinal_ops._C`` is
    loaded (:mod:`spinal_ops.backends`)."""
    if NATIVE_IMPORT_ERROR is not None:
        raise RuntimeError(f"spinal_ops {backend} backend: its ops check their arguments with the native library, "
                           f"which failed to load: {NATIVE_IMPORT_ERROR}")
    key = (backend, _signature(args))
    if key in _CHECKED:
        return
    torch.ops.spinal_ops._check_args(backend, *args)
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED.add(key)


_BACKWARD_TENSOR_ARGS = 8  # grad_y, grad_H, x, H, weight_x, weight_h, bias, head_weight


def _setup_backward_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_BACKWARD_TENSOR_ARGS])
    ctx.hyper = tuple(inputs[_BACKWARD_TENSOR_ARGS:])


def _backward_of_backward(ctx, *grads):
    """The backward op's input gradients: the vector-Jacobian product of :func:`reference.spinal_backward`.

    ``torch.func.vjp`` differentiates with respect to the op's own arguments (not through whatever computed them)
    and stays differentiable under ``create_graph=True``.
    """
    saved = ctx.saved_tensors
    present = [i for i, t in enumerate(saved) if t is not None]

    def backward(*tensors):
        args = list(saved)
        for i, t in zip(present, tensors, strict=True):
            args[i] = t
        return reference.spinal_backward(*args, *ctx.hyper)

    outs, vjp = torch.func.vjp(backward, *(saved[i] for i in present))
    found = vjp(tuple(g if g is not None else torch.zeros_like(o) for o, g in zip(outs, grads, strict=True)))
    result: list[Tensor | None] = [None] * _BACKWARD_TENSOR_ARGS
    for i, g in zip(present, found, strict=True):
        result[i] = g
    return (*result, *(None,) * len(ctx.hyper))


def register_op_pair(forward_name: str, backward_name: str, backward_op=None) -> None:
    """Fake kernels for both ops; autograd too when ``backward_op`` is given (the ops registered from Python:
    :mod:`spinal_ops.triton_kernels.ops`, :mod:`spinal_ops.gemm`)."""
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(backward_name)(_fake_backward)
    if backward_op is not None:
        torch.library.register_autograd(forward_name, _make_backward(backward_op), setup_context=_setup_context)
        torch.library.register_autograd(backward_name, _backward_of_backward, setup_context=_setup_backward_context)


def define_op_pair(backend: str, define, forward_impl, backward_impl):
    """Define ``spinal_ops::spinal_forward_<backend>`` and ``spinal_ops::_spinal_backward_<backend>`` for a backend
    written in Python, with ``define`` (``torch.library.custom_op`` or ``torch.library.triton_op``): the native ops'
    arguments and outputs, their shared checks naming ``backend`` (:func:`check_args`), the normalised output mask,
    fake kernels and autograd (:func:`register_op_pair`). ``forward_impl`` and ``backward_impl`` take the ops'
    arguments (the backward's mask normalised). Returns the forward op."""
    forward_name, backward_name = f"spinal_ops::spinal_forward_{backend}", f"spinal_ops::_spinal_backward_{backend}"

    @define(forward_name, mutates_args=())
    def forward(x: Tensor, weight_x: Tensor, weight_h: Tensor, bias: Tensor | None, head_weight: Tensor | None,
                head_bias: Tensor | None, starts: list[int], slots: list[int], activation: str,
                negative_slope: float) -> tuple[Tensor, Tensor]:
        check_args(backend, x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                   negative_slope)
        return forward_impl(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                            negative_slope)

    @define(backward_name, mutates_args=())
    def backward(grad_y: Tensor | None, grad_H: Tensor | None, x: Tensor, H: Tensor, weight_x: Tensor,
                 weight_h: Tensor, bias: Tensor | None, head_weight: Tensor | None, starts: list[int],
                 slots: list[int], activation: str, negative_slope: float,
                 output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        check_args(backend, x, weight_x, weight_h, bias, head_weight, None, starts, slots, activation,
                   negative_slope)
        mask = effective_output_mask(output_mask, bias, head_weight)
        return backward_impl(grad_y, grad_H, x, H, weight_x, weight_h, bias, head_weight, starts, slots,
                             activation, negative_slope, mask)

    namespace = torch.ops.spinal_ops
    register_op_pair(forward_name, backward_name, getattr(namespace, backward_name.split("::")[1]))
    return getattr(namespace, forward_name.split("::")[1]).default


class _FoldRows(torch.autograd.Function):
    """:func:`reference.scale_rows` (``columns``: :func:`reference.scale_columns`) written into ``buffer``, with a
    backward of one pass (see :func:`_fold_rows`)."""

    @staticmethod
    def forward(weight, scale, buffer, columns):
        # Writes the buffer, which is no input of the graph (it never requires grad, so no mark_dirty) and returns a
        # new tensor on its storage: the one the caller's graph holds, and the one _fold_rows watches.
        return torch.mul(weight, scale.unsqueeze(-2 if columns else -1), out=buffer).detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.columns = inputs[3]

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        need_weight, need_scale = ctx.needs_input_grad[:2]
        columns = ctx.columns
        if torch.is_grad_enabled() or not need_weight or not grad.is_contiguous() or grad._base is not None:
            # differentiable (create_graph), or nothing to scale in place: the same gradients in ATen ops
            dim = -2 if columns else -1
            return (grad * scale.unsqueeze(dim) if need_weight else None,
                    torch.linalg.vecdot(grad, weight, dim=dim) if need_scale else None, None, None)
        grad_scale = torch.ops.spinal_ops._scale_rows_backward_inplace(grad, weight, scale, need_scale, columns)
        return grad, grad_scale if need_scale else None, None, None


# Weights smaller than this fold as plain autograd ops (reference.scale_rows, scale_columns): below it the Function's
# Python costs more than it saves. Measured (fwd+bwd of an eval-mode SpinalLinear(D, 10, layer_width=w, num_layers=4,
# batch_norm=True) at B = 1, 2 threads, AMD EPYC Zen 5, median of 0.7 s, two alternating runs each, microseconds,
# this path / plain): weight_x of 0.5 MB 460, 481 / 454, 441; 1 MB 559, 546 / 610, 600; 2 MB 1071, 1078 / 1223, 1241;
# 4 MB 1136, 1106 / 2200, 2249; 8 MB 2206, 2206 / 4546, 4618.
FOLD_ROWS_MIN_BYTES = 1 << 20
FOLD_BUFFERS_PER_WEIGHT = 4  # products alive at once that keep their buffer (two-crop / siamese steps: 2)


class FoldBuffers:
    """The buffers a layer's folds are written into (:func:`_fold_rows`): per weight shape and dtype, a few buffers,
    each with a weak reference to the product a graph holds; one lock, so that threads sharing the layer never pick
    the same free buffer."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict[tuple, list] = {}


def _fold_rows(weight: Tensor, scale: Tensor, buffers: FoldBuffers, columns: bool = False) -> Tensor:
    """``weight * scale[..., None]`` (:func:`reference.scale_rows`, the same values; ``columns``: ``weight *
    scale[..., None, :]``, :func:`reference.scale_columns`) for a batch norm folded into a layer's weights with
    autograd on, on every training step.

    Private, with one contract: the product must feed one spinal op and nothing else. On CPU, float32 / float64,
    weights of FOLD_ROWS_MIN_BYTES or more, the product is written into one of the layer's ``buffers`` that no graph
    holds any more (else into a new one, kept while there are fewer than FOLD_BUFFERS_PER_WEIGHT), and its backward
    is the ``_scale_rows_backward_inplace`` op: one pass over the weights, the incoming gradient scaled in place
    into the weights' gradient. That gradient is the spinal op's fresh gradient of the product, which nothing else
    holds (hence the contract). Without the buffers and the in-place scaling, each step made three fresh weight-sized
    tensors (the product, its gradient, the weights' gradient) that the C library returned to the system and
    faulted back in on the next step (docs/performance-history.md, "The eval-mode fold"). Elsewhere (smaller
    weights, other devices and dtypes, functorch transforms and forward-mode AD, no native library) it is
    :func:`reference.scale_rows` (``columns``: :func:`reference.scale_columns`).
    """
    if NATIVE_IMPORT_ERROR is not None or not weight.is_cpu or weight.dtype not in (torch.float32, torch.float64) or \
            scale.dtype != weight.dtype or weight.numel() * weight.element_size() < FOLD_ROWS_MIN_BYTES or \
            backends.autograd_transformed():
        return (reference.scale_columns if columns else reference.scale_rows)(weight, scale)
    key = (tuple(weight.shape), weight.dtype, columns)
    with buffers.lock:
        kept = buffers.entries.setdefault(key, [])
        free = next((k for k, (_, product) in enumerate(kept) if product() is None), None)
        if free is not None:
            buffer = kept.pop(free)[0]
        else:  # none yet, or graphs hold every one
            buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
        out = _FoldRows.apply(weight, scale, buffer, columns)
        if len(kept) < FOLD_BUFFERS_PER_WEIGHT:
            kept.append((buffer, weakref.ref(out)))
    return out


def dropout(input: Tensor, p: float) -> Tensor:
    """``F.dropout(input, p, training=True)``, bit for bit, with the same draws from the default CPU generator.

    ``F.dropout`` on CPU is ``input * noise``, ``noise`` = ``empty_like(input).bernoulli_(1 - p).div_(1 - p)``, and
    its ``bernoulli_`` draws one element at a time through the generator (~20 ns an element on the benchmark
    machines: a third to a half of a train-mode head's step). Here, on CPU float32 / float64 with
    ``0 < p < 1``, the noise comes from the ``_dropout_noise_`` op (``csrc/cpu/spinal_dropout.cpp``: the same values,
    the generator left in the same state, ~10x faster), where it matches this PyTorch's own ``bernoulli_``
    (:func:`_noise_matches`; it does not on an Intel CPU with an MKL build, whose ``bernoulli_`` draws with MKL); the
    product and its gradient are the same autograd ops as ``F.dropout``'s. Elsewhere (other devices and dtypes,
    tensor subclasses, ``torch.compile``, ``torch.func`` transforms, no native library) it is ``F.dropout``."""
    if NATIVE_IMPORT_ERROR is not None or type(input) is not Tensor or not input.is_cpu or \
            input.dtype not in (torch.float32, torch.float64) or not 0 < p < 1 or torch.compiler.is_compiling() or \
            backends.autograd_transformed() or not _noise_matches(input.dtype, p):
        return torch.nn.functional.dropout(input, p, training=True)
    noise = torch.empty_like(input)
    torch.ops.spinal_ops._dropout_noise_(noise, p)
    return input * noise


# Private generators' seed for the probe below (any seed does; a fixed one makes a failure reproducible).
_PROBE_SEED = 20070703


@functools.lru_cache(maxsize=64)
def _noise_matches(dtype: torch.dtype, p: float) -> bool:
    """Whether ``_dropout_noise_(t, p)`` gives what this PyTorch's ``t.bernoulli_(1 - p).div_(1 - p)`` gives: the same
    values and the same generator state after, drawn on two private generators of one seed (the default generator
    is not touched). Two draws: 5 elements, then, after one single-word draw, 700 (1400 words from an odd position:
    across two regenerations of the 624-word state, one of them within an element). False where ``bernoulli_`` draws
    otherwise (an MKL build on an Intel CPU)."""
    keep = 1 - p
    theirs, mine = (torch.Generator().manual_seed(_PROBE_SEED) for _ in range(2))
    for n in (5, 700):
        if n == 700:
            torch.rand(1, generator=theirs), torch.rand(1, generator=mine)  # float32 uniform: one 32-bit word
        expected = torch.empty(n, dtype=dtype).bernoulli_(keep, generator=theirs).div_(keep)
        got = torch.empty(n, dtype=dtype)
        torch.ops.spinal_ops._dropout_noise_(got, p, mine)
        if not torch.equal(got, expected):
            return False
    return torch.equal(mine.get_state(), theirs.get_state())


def _fake_dropout_noise_(self, p, generator=None):
    return None


def _fake_scale_rows_backward_inplace(grad, weight, scale, scale_grad, columns=False):
    return scale.new_empty(scale.shape if scale_grad else (0,))


def _fake_cpu_gemm(a, b, trans_a, trans_b):
    return a.new_empty(a.shape[1] if trans_a else a.shape[0], b.shape[0] if trans_b else b.shape[1])


if NATIVE_IMPORT_ERROR is None:
    backends.record_native_kernels()
    torch.library.register_fake("spinal_ops::_cpu_gemm")(_fake_cpu_gemm)
    torch.library.register_fake("spinal_ops::_scale_rows_backward_inplace")(_fake_scale_rows_backward_inplace)
    torch.library.register_fake("spinal_ops::_dropout_noise_")(_fake_dropout_noise_)
    # The native ops carry their autograd in C++ (csrc/spinal_autograd.cpp): same formula, no Python per call. Their
    # backward's derivative recomputes the reference backward through this op (CompositeImplicitAutograd).
    register_op_pair("spinal_ops::spinal_forward", "spinal_ops::_spinal_backward")
    torch.library.impl("spinal_ops::_spinal_backward_reference", "CompositeImplicitAutograd")(
        reference.spinal_backward)


# ------------------------------------------------------------------------------------------------- functional


@dataclasses.dataclass(frozen=True, eq=False)
class LayerSpec:
    """The hyper-parameters of one spinal layer, validated, with the op arguments they give.

    :class:`spinal_ops.SpinalLinear` builds one at construction; :func:`spinal_linear` builds one per call. The
    tensors are checked against it (and against each other) on the way to a kernel, in :func:`run`.
    """

    in_features: int  # D
    num_splits: int  # K
    split_mode: str
    chunk: int  # c = round(D / K)
    num_layers: int  # L
    slots: tuple[int, ...]  # the weight slot of each sub-layer
    activation: str
    negative_slope: float
    starts: list[int]  # op argument: the first input column of each sub-layer's chunk
    slot_list: list[int]  # op argument: ``slots`` as a list
    num_slots: tuple[int, int]  # (S, S - 1): the weight_x and weight_h slots the slot table needs
    # The ops' arguments after the tensors, (starts, slot_list, activation, negative_slope): one read per call.
    op_args: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "op_args", (self.starts, self.slot_list, self.activation, self.negative_slope))


def layer_spec(in_features: int, *, num_layers: int | None, num_splits: int, split_mode: str, activation: str,
               negative_slope: float, shared_weights: bool, weight_slots, default_layers: int,
               where: str) -> LayerSpec:
    """Validate a layer's hyper-parameters (raising ``ValueError`` / ``TypeError`` that name ``where`` and the
    argument) and return them as a :class:`LayerSpec`. ``default_layers``: ``L`` when neither ``num_layers`` nor
    ``weight_slots`` gives it."""
    for name, value in (("in_features", in_features), ("num_splits", num_splits)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    if split_mode not in reference.SPLIT_MODES:
        raise ValueError(f"{where}: split_mode must be one of {reference.SPLIT_MODES}, got {split_mode!r}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    num_layers, slots = resolve_slots(num_layers, shared_weights, weight_slots, default_layers, where)
    chunk = reference.chunk_size(in_features, num_splits)
    starts = reference.split_starts(in_features, num_splits, num_layers, split_mode)
    return LayerSpec(in_features, num_splits, split_mode, chunk, num_layers, slots, activation,
                     float(negative_slope), starts, list(slots), reference.num_slots(slots))


def resolve_slots(num_layers, shared_weights: bool, weight_slots, default_layers: int, where: str):
    """``(num_layers, slot table)`` from the ways a caller may give them; raises naming ``where``.

    ``weight_slots`` (any tying pattern) and ``shared_weights=True`` (the pattern ``[0, 1, ..., 1]``) exclude each
    other. Without either, ``num_layers`` defaults to ``default_layers`` (one slot per sub-layer).
    """
    if weight_slots is not None:
        if shared_weights:
            raise ValueError(f"{where}: give weight_slots or shared_weights=True, not both (shared_weights=True is "
                             "weight_slots=[0, 1, 1, ..., 1])")
        if isinstance(weight_slots, (str, bytes)) or not hasattr(weight_slots, "__len__"):
            raise TypeError(f"{where}: weight_slots must be a sequence of ints, got {weight_slots!r}")
        if num_layers is None:
            num_layers = len(weight_slots)
    elif num_layers is None:
        if shared_weights:
            raise ValueError(f"{where}: num_layers is required with shared_weights=True")
        num_layers = default_layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{where}: num_layers must be an integer >= 1, got {num_layers!r}")
    if weight_slots is None:
        return num_layers, reference.weight_slots(num_layers, shared_weights)
    try:
        return num_layers, reference.check_weight_slots(weight_slots, num_layers)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def check_input(input, where: str, in_features: int | None = None) -> None:
    """``input`` is a floating-point tensor ``(*, in_features)``; raises naming ``where``."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{where}: input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{where}: input must be a floating-point tensor, got dtype {input.dtype}")
    if input.dim() < 1 or (in_features is not None and input.shape[-1] != in_features):
        expected = "(*, in_features)" if in_features is None else f"(*, {in_features}) (in_features)"
        raise ValueError(f"{where}: expected input of shape {expected}, got shape {tuple(input.shape)}")


def spinal_linear(
    input: torch.Tensor,
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    *,
    num_layers: int | None = None,
    num_splits: int = 2,
    split_mode: str = "cyclic",
    activation: str = "relu",
    negative_slope: float = 0.01,
    shared_weights: bool = False,
    weight_slots=None,
) -> torch.Tensor:
    """Functional spinal layer: ``(*, D) -> (*, out)`` (head mode) or ``(*, L*w)`` (hidden mode).

    Parameters
    ----------
    input : Tensor ``(*, D)``, floating point.
    weight_x : Tensor ``(S, w, c)`` with ``c = round(D / num_splits)``: one slot per distinct sub-layer weight
        (``S = L`` by default; ``min(L, 2)`` with ``shared_weights``; ``max(weight_slots) + 1``).
    weight_h : Tensor ``(S - 1, w, w)``: ``weight_h[s - 1]`` is the recurrent weight of slot ``s``.
    bias : Tensor ``(S, w)`` or None.
    head_weight : Tensor ``(out, L * w)``, or None for hidden mode (the output is then ``H``).
    head_bias : Tensor ``(out,)`` or None.
    num_layers : L; taken from ``weight_slots`` or, without tying, from ``weight_x`` when omitted; required with
        ``shared_weights``.
    num_splits, split_mode, activation, negative_slope, shared_weights, weight_slots : see
        :class:`spinal_ops.SpinalLinear`.

    The backend is chosen by :func:`spinal_ops.backends.select_backend` (see :func:`spinal_ops.use_backend`).
    """
    where = "spinal_linear"
    check_input(input, where)
    if not isinstance(weight_x, Tensor) or weight_x.dim() != 3:
        got = f"shape {tuple(weight_x.shape)}" if isinstance(weight_x, Tensor) else type(weight_x).__name__
        raise ValueError(f"{where}: weight_x must be a 3-D tensor (S, w, c), got {got}")
    spec = layer_spec(input.shape[-1], num_layers=num_layers, num_splits=num_splits, split_mode=split_mode,
                      activation=activation, negative_slope=negative_slope, shared_weights=shared_weights,
                      weight_slots=weight_slots, default_layers=weight_x.shape[0], where=where)
    return run(input, (weight_x, weight_h, bias, head_weight, head_bias), spec, where)


def autocast_args(input: Tensor, params: tuple) -> tuple[Tensor, tuple]:
    """``(input, params)`` cast as ``torch.autocast`` casts the arguments of ``nn.Linear``; unchanged when off.

    When autocast is enabled for the input's device type, every floating-point tensor except float64 is cast
    to ``torch.get_autocast_dtype(device_type)`` (CPU: bfloat16 by default; CUDA: float16 or bfloat16), so
    the layer computes and returns that dtype, and gradients flow back to the parameters in their own dtype.
    float64 is left alone, as autocast leaves it. On CPU the ``cpu`` backend runs the bfloat16 or float16 of an
    autocast region with float32 arithmetic (see :func:`spinal_ops.backends.select_backend`).
    """
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return input, params
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.dtype == dtype:
            return t
        return t.to(dtype)

    return cast(input), tuple(cast(t) for t in params)


def _spec_mismatch(params: tuple, spec: LayerSpec, where: str) -> ValueError:
    """The error for weights that do not fit the hyper-parameters (see :func:`run`)."""
    weight_x, weight_h = params[0], params[1]
    if weight_x.dim() == 3 and weight_x.shape[2] != spec.chunk:
        return ValueError(
            f"{where}: input has {spec.in_features} features, so num_splits={spec.num_splits} gives chunk size "
            f"round({spec.in_features} / {spec.num_splits}) = {spec.chunk}, but weight_x has chunk size "
            f"{weight_x.shape[2]} (shape {tuple(weight_x.shape)})"
        )
    expected_x, expected_h = spec.num_slots
    width = weight_x.shape[1] if weight_x.dim() == 3 else "w"
    return ValueError(
        f"{where}: num_layers={spec.num_layers} with weight slots {spec.slot_list} needs weight_x of shape "
        f"({expected_x}, {width}, {spec.chunk}) and weight_h of shape ({expected_h}, {width}, {width}), got "
        f"{tuple(weight_x.shape)} and {tuple(weight_h.shape)}"
    )


def run(input: Tensor, params: tuple, spec: LayerSpec, where: str) -> Tensor:
    """The one way from a layer to a kernel: ``(*, D) -> (*, out)`` or ``(*, L*w)``.

    ``params`` is ``(weight_x, weight_h, bias, head_weight, head_bias)``; ``input`` is checked here (as
    :func:`check_input` checks it, against ``spec.in_features``). Under ``torch.autocast`` the tensors are cast
    here, once (:func:`autocast_args`). The weights are checked against what only the hyper-parameters decide (the
    chunk size, from ``num_splits``, and the slot count, from ``num_layers`` and the tying); everything else about
    the tensors (dtypes, devices, the other sizes, layout) the backend's forward op checks, with the shared checks
    of ``csrc/spinal_args.cpp``. The backend comes from :func:`spinal_ops.backends.select_backend`. This is on the
    per-call path of every layer: it does no more than it must.
    """
    # (Written for the interpreter: each tensor attribute read costs ~50-250 ns, and this runs on every call.)
    shape = input.shape if isinstance(input, Tensor) else None
    if not shape or shape[-1] != spec.in_features or not input.is_floating_point():
        check_input(input, where, spec.in_features)  # raises, naming what is wrong
    if torch._C._is_any_autocast_enabled():  # the one cheap check when autocast is off
        input, params = autocast_args(input, params)
    weight_x, weight_h, bias, head_weight, head_bias = params
    sx, sh = weight_x.shape, weight_h.shape
    if len(sx) != 3 or sx[2] != spec.chunk or sx[0] != spec.num_slots[0] or len(sh) != 3 or \
            sh[0] != spec.num_slots[1]:
        raise _spec_mismatch(params, spec, where)
    if not (weight_x.is_contiguous() and weight_h.is_contiguous() and (bias is None or bias.is_contiguous()) and
            (head_weight is None or head_weight.is_contiguous()) and (head_bias is None or head_bias.is_contiguous())):
        params = tuple(t.contiguous() if t is not None else None for t in params)
    two_d = len(shape) == 2
    x2d = input if two_d else input.reshape(-1, shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if backends._AUTOTUNE and backends.forced_backend() is None and not torch.compiler.is_compiling() and \
            not backends.autograd_transformed():
        backend = _tuned_backend(x2d, params, spec)
    elif input.is_cpu:
        backend = select_backend("cpu", input.dtype)
    else:  # the GPU cost model chooses per problem
        backend = select_backend(input.device, input.dtype, _problem(x2d, params, spec))
    h_all, y = forward_op(backend)(x2d, *params, *spec.op_args)
    out = h_all if head_weight is None else y
    return out if two_d else out.reshape(*shape[:-1], out.shape[-1])


def _problem(x2d: Tensor, params: tuple, spec: LayerSpec) -> tuple:
    """``(config, rows, mode)`` of a call, for the GPU cost model's backend choice."""
    from .configs import SpinalConfig  # not at import: spinal_ops.configs imports this package

    weight_x, _, _, head_weight, _ = params
    config = SpinalConfig("layer", spec.in_features, spec.num_splits, weight_x.shape[1], spec.num_layers,
                          head_weight.shape[0] if head_weight is not None else 0, spec.activation)
    tracked = torch.is_grad_enabled() and (x2d.requires_grad or any(t is not None and t.requires_grad for t in params))
    return config, x2d.shape[0], "fwd+bwd" if tracked else "forward"


# Timed runs per candidate after one warm-up run: at least TUNING_REPEATS, and until TUNING_SECONDS have passed (a
# small problem gets many runs); their median counts. Not the fastest run: a backend whose runs vary widely would win
# on its luckiest one (measured on a 2-core VM: the cpu backend's bfloat16 fwd+bwd of wide-resnet-head at B = 1 took
# 1.8-14 ms over 20 runs, median 2.3 ms; the reference's 2.4-8.5 ms, median 2.6 ms).
TUNING_REPEATS = 3
TUNING_SECONDS = 0.05


def _tuned_backend(x2d: Tensor, params: tuple, spec: LayerSpec) -> str:
    """``SPINAL_OPS_AUTOTUNE=1``: the backend measured fastest for this call's problem, timed on first sight.

    Each candidate (:func:`spinal_ops.backends.tuning_candidates`) runs the call's forward (and, when autograd
    records the call, its backward, through ``torch.autograd.grad`` on detached copies of the inputs: nothing of
    the caller's graph or ``.grad`` is touched) once to warm up, then at least TUNING_REPEATS times and for
    TUNING_SECONDS, timed; the lowest median wins. Under CUDA graph capture the cost-model choice applies
    instead (timing would synchronise the stream)."""
    device = x2d.device
    problem = _problem(x2d, params, spec)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return select_backend(device, x2d.dtype, problem)
    key = (device.type, device.index, x2d.dtype, problem, torch.get_num_threads(),
           torch.get_float32_matmul_precision())
    choice = backends._tuned.get(key)
    if choice is None:
        candidates = backends.tuning_candidates(device.type, x2d.dtype)
        times = {name: _time_backend(name, x2d, params, spec, problem[2]) for name in candidates}
        choice = backends._tuned[key] = min(candidates, key=times.__getitem__)
    return choice


def _time_backend(backend: str, x2d: Tensor, params: tuple, spec: LayerSpec, mode: str) -> float:
    """Median seconds of the timed runs of the call on ``backend`` (forward, or forward and backward)."""
    import statistics
    import time

    op = forward_op(backend)
    args = spec.op_args
    xs = x2d.detach().requires_grad_(x2d.requires_grad)
    ps = tuple(t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in params)
    leaves = [t for t in (xs, *ps) if t is not None and t.requires_grad]
    head = params[3] is not None

    def step():
        if mode == "forward":
            with torch.no_grad():
                op(xs, *ps, *args)
            return
        with torch.enable_grad():
            h_all, y = op(xs, *ps, *args)
            out = y if head else h_all
            torch.autograd.grad(out, leaves, torch.ones_like(out))

    sync = (lambda: torch.cuda.synchronize(x2d.device)) if x2d.is_cuda else (lambda: None)
    step()
    sync()
    runs, began = [], time.perf_counter()
    while len(runs) < TUNING_REPEATS or time.perf_counter() - began < TUNING_SECONDS:
        start = time.perf_counter()
        step()
        sync()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _reference_forward(*args):
    """The reference backend's forward, after the same argument checks the ops run (when the native library is
    loaded: they live in ``csrc/spinal_args.cpp``). Traced (``torch.compile``, ``torch.export``) or inside a
    ``torch.func`` transform (``vmap`` has no batching rule for an op without outputs), it skips them: the plain
    PyTorch ops alone, which fail on mismatched tensors by themselves."""
    if NATIVE_IMPORT_ERROR is None and not torch.compiler.is_compiling() and \
            not torch._C._are_functorch_transforms_active():
        torch.ops.spinal_ops._check_args("reference", *args)
    return reference.spinal_forward(*args)


def forward_op(backend: str):
    """The forward op of ``backend`` (a name :func:`spinal_ops.backends.select_backend` returns)."""
    if backend == "reference":
        return _reference_forward
    if backend == "triton":
        from . import triton_kernels  # importing the package registers the Triton ops

        return triton_kernels.spinal_forward_op
    if backend == "gemm":
        return gemm.spinal_forward_op
    return _NATIVE_FORWARD  # cpu, cuda: one op, dispatched on the tensors' device


_NATIVE_FORWARD = torch.ops.spinal_ops.spinal_forward.default if NATIVE_IMPORT_ERROR is None else None

from . import gemm  # noqa: E402  (registers the gemm backend's ops, which use the registrations above)
