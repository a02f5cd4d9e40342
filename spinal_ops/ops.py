"""Python-side registrations of the spinal ops, and the functional form.

This is the one Python module that registers fake kernels, autograd formulas and the Triton ops. The native
schemas are defined in ``csrc/spinal_ops.cpp``; the Triton ops mirror them one to one (same arguments, same
outputs), so both families share the fake kernels below. The native ops' autograd is the same formula written
in C++ (``csrc/spinal_autograd.cpp``), which keeps Python off the per-call path of training.

Op contract (2-D ``x``; see :mod:`spinal_ops.reference` for the math):

- ``spinal_forward(x, weight_x, weight_h, bias?, head_weight?, head_bias?, starts, slots, activation,
  negative_slope) -> (H (B, L*w), y (B, out) or (B, 0) in hidden mode)``
- ``_spinal_backward(grad_y?, grad_H?, x, H, weight_x, weight_h, bias?, head_weight?, starts, slots, activation,
  negative_slope, output_mask[6]) -> (dx, dweight_x, dweight_h, dbias, dhead_weight, dhead_bias)``, gradients
  not asked for by ``output_mask`` come back empty.

Saved for backward: ``x``, ``H`` and the weights; nothing else. The backward ops are differentiable (double
backward), from :func:`reference.spinal_backward`, the same math in differentiable PyTorch ops: the native op's
autograd kernel (C++) computes the backward with it whenever the result needs a graph (``create_graph=True``);
the Triton backward op keeps its kernels and differentiates through the vector-Jacobian product of
``reference.spinal_backward`` (``torch.func.vjp``, so any order works).
"""

from __future__ import annotations

import importlib
import warnings

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
        "and cuda backends are unavailable; spinal ops run on reference (and triton)."
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


def _make_backward(backward_op):
    def backward(ctx, grad_h, grad_y):
        x, h_all, weight_x, weight_h, bias, head_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3] and bias is not None, need[4] and head_weight is not None,
                need[5] and ctx.has_head_bias]
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


def _register(forward_name: str, backward_name: str, backward_op=None) -> None:
    """Fake kernels for both ops; autograd too when ``backward_op`` is given (the Triton ops)."""
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(backward_name)(_fake_backward)
    if backward_op is not None:
        torch.library.register_autograd(forward_name, _make_backward(backward_op), setup_context=_setup_context)
        torch.library.register_autograd(backward_name, _backward_of_backward, setup_context=_setup_backward_context)


if NATIVE_IMPORT_ERROR is None:
    backends.record_native_kernels()
    # The native ops carry their autograd in C++ (csrc/spinal_autograd.cpp): same formula, no Python per call. Their
    # backward's derivative recomputes the reference backward through this op (CompositeImplicitAutograd).
    _register("spinal_ops::spinal_forward", "spinal_ops::_spinal_backward")
    torch.library.impl("spinal_ops::_spinal_backward_reference", "CompositeImplicitAutograd")(
        reference.spinal_backward)


# ------------------------------------------------------------------------------------------------- Triton ops


_TRITON_CHECKED: set = set()  # signatures (sizes, dtypes, devices, layouts, hyper-parameters) that passed


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.is_contiguous()) if isinstance(a, Tensor)
                 else tuple(a) if isinstance(a, list) else a for a in args)


def _check_triton_args(*args) -> None:
    """The shared C++ argument checks (csrc/spinal_args.cpp), naming the triton backend in every message; run once
    per signature (they read only sizes, dtypes, devices, layouts and hyper-parameters), then remembered."""
    if NATIVE_IMPORT_ERROR is None:
        key = _signature(args)
        if key in _TRITON_CHECKED:
            return
        torch.ops.spinal_ops._check_args("triton", *args)
        if len(_TRITON_CHECKED) > 4096:
            _TRITON_CHECKED.clear()
        _TRITON_CHECKED.add(key)


def _register_triton() -> None:
    from .triton_kernels import spinal_bwd_triton, spinal_fwd_triton

    @torch.library.triton_op("spinal_ops::spinal_forward_triton", mutates_args=())
    def spinal_forward_triton(
        x: Tensor, weight_x: Tensor, weight_h: Tensor, bias: Tensor | None, head_weight: Tensor | None,
        head_bias: Tensor | None, starts: list[int], slots: list[int], activation: str, negative_slope: float,
    ) -> tuple[Tensor, Tensor]:
        _check_triton_args(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                           negative_slope)
        return spinal_fwd_triton(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                                 negative_slope)

    @torch.library.triton_op("spinal_ops::_spinal_backward_triton", mutates_args=())
    def _spinal_backward_triton(
        grad_y: Tensor | None, grad_H: Tensor | None, x: Tensor, H: Tensor, weight_x: Tensor, weight_h: Tensor,
        bias: Tensor | None, head_weight: Tensor | None, starts: list[int], slots: list[int], activation: str,
        negative_slope: float, output_mask: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        _check_triton_args(x, weight_x, weight_h, bias, head_weight, None, starts, slots, activation,
                           negative_slope)
        return spinal_bwd_triton(grad_y, grad_H, x, H, weight_x, weight_h, bias, head_weight, starts, slots,
                                 activation, negative_slope, output_mask)

    _register("spinal_ops::spinal_forward_triton", "spinal_ops::_spinal_backward_triton",
              torch.ops.spinal_ops._spinal_backward_triton)


_triton_registered = False


def _triton_forward():
    """The Triton forward op, registered on first use (importing Triton is slow and optional)."""
    global _triton_registered
    if not _triton_registered:
        _register_triton()
        _triton_registered = True
    return torch.ops.spinal_ops.spinal_forward_triton


# ------------------------------------------------------------------------------------------------- functional


def _forward_op(backend: str):
    if backend == "cpu" or backend == "cuda":
        return _NATIVE_FORWARD
    if backend == "reference":
        return reference.spinal_forward
    if backend == "triton":
        return _triton_forward()
    raise AssertionError(backend)


_NATIVE_FORWARD = torch.ops.spinal_ops.spinal_forward.default if NATIVE_IMPORT_ERROR is None else None


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
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"spinal_linear: input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"spinal_linear: input must be a floating-point tensor, got dtype {input.dtype}")
    if input.dim() < 1:
        raise ValueError("spinal_linear: input must have at least 1 dimension (*, in_features), got a scalar")
    if torch._C._is_any_autocast_enabled():  # cast first, so that the checks see what will run
        input, (weight_x, weight_h, bias, head_weight, head_bias) = autocast_args(
            input, (weight_x, weight_h, bias, head_weight, head_bias))
    for name, t in (("weight_x", weight_x), ("weight_h", weight_h), ("bias", bias), ("head_weight", head_weight),
                    ("head_bias", head_bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(f"spinal_linear: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
                            "they must match (cast the module with .to(dtype) or the input)")
        if t.device != input.device:
            raise ValueError(f"spinal_linear: {name} is on {t.device} but input is on {input.device}")
    in_features = input.shape[-1]
    if weight_x.dim() != 3:
        raise ValueError(f"spinal_linear: weight_x must be 3-D (Lx, w, c), got shape {tuple(weight_x.shape)}")
    chunk = reference.chunk_size(in_features, num_splits)
    if weight_x.shape[2] != chunk:
        raise ValueError(
            f"spinal_linear: input has {in_features} features, so num_splits={num_splits} gives chunk size "
            f"round({in_features} / {num_splits}) = {chunk}, but weight_x has chunk size {weight_x.shape[2]} "
            f"(shape {tuple(weight_x.shape)})"
        )
    num_layers, slots = resolve_slots(num_layers, shared_weights, weight_slots, weight_x.shape[0], "spinal_linear")
    expected_x, expected_h = reference.num_slots(slots)
    width = weight_x.shape[1]
    if weight_x.shape[0] != expected_x or tuple(weight_h.shape) != (expected_h, width, width):
        raise ValueError(
            f"spinal_linear: num_layers={num_layers} with weight slots {list(slots)} needs weight_x of shape "
            f"({expected_x}, {width}, {chunk}) and weight_h of shape ({expected_h}, {width}, {width}), got "
            f"{tuple(weight_x.shape)} and {tuple(weight_h.shape)}"
        )
    if head_weight is None and head_bias is not None:
        raise ValueError("spinal_linear: head_bias given without head_weight (hidden mode has no head)")
    if head_weight is not None and tuple(head_weight.shape[1:]) != (num_layers * width,):
        raise ValueError(
            f"spinal_linear: head_weight must have shape (out, L*w) = (out, {num_layers * width}), got "
            f"{tuple(head_weight.shape)}"
        )
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"spinal_linear: activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    starts = reference.split_starts(in_features, num_splits, num_layers, split_mode)
    params = tuple(t.contiguous() if t is not None else None
                   for t in (weight_x, weight_h, bias, head_weight, head_bias))
    return apply_spinal(input, params, starts, list(slots), activation, float(negative_slope))


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


def autocast_args(input: Tensor, params: tuple) -> tuple[Tensor, tuple]:
    """``(input, params)`` cast as ``torch.autocast`` casts the arguments of ``nn.Linear``; unchanged when off.

    When autocast is enabled for the input's device type, every floating-point tensor except float64 is cast
    to ``torch.get_autocast_dtype(device_type)`` (CPU: bfloat16 by default; CUDA: float16 or bfloat16), so
    the layer computes and returns that dtype, and gradients flow back to the parameters in their own dtype.
    float64 is left alone, as autocast leaves it. On CPU, the ``cpu`` backend runs float32 and float64
    only, so a bfloat16 or float16 autocast region runs on the ``reference`` backend (see
    :func:`spinal_ops.backends.select_backend`).
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


def apply_spinal(input: Tensor, params: tuple, starts: list[int], slots: list[int], activation: str,
                 negative_slope: float) -> Tensor:
    """Run validated arguments on the chosen backend: ``(*, D) -> (*, out)`` or ``(*, L*w)``.

    ``params`` is ``(weight_x, weight_h, bias, head_weight, head_bias)``, contiguous, of the input's dtype and
    device. :func:`spinal_linear` and :class:`SpinalLinear` validate, then call this (it is on the per-call path
    of every layer, so it does no more than it must). Under ``torch.autocast`` it computes in the autocast
    dtype (:func:`autocast_args`).
    """
    if torch._C._is_any_autocast_enabled():  # the one cheap check when autocast is off
        input, params = autocast_args(input, params)
    backend = select_backend(input.device, input.dtype)
    two_d = input.dim() == 2
    x2d = input if two_d else input.reshape(-1, input.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    h_all, y = _forward_op(backend)(x2d, *params, starts, slots, activation, negative_slope)
    out = h_all if params[3] is None else y
    return out if two_d else out.reshape(*input.shape[:-1], out.shape[-1])
