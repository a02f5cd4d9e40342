"""Backend choice: the one place that decides which implementation runs a spinal op.

Backends:

- ``reference``: :mod:`spinal_ops.reference`, plain PyTorch, any device (autograd through PyTorch ops).
- ``cpu``: the fused C++ CPU kernels of ``spinal_ops._C`` (CPU tensors).
- ``cuda``: the hand-written CUDA kernels of ``spinal_ops._C`` (CUDA tensors; built when nvcc is present).
- ``triton``: the Triton kernels (CUDA tensors; CPU tensors when ``TRITON_INTERPRET=1`` was set before
  Triton was imported). Its ops check their arguments with the native library's shared checks, so it needs
  ``spinal_ops._C`` too (any build of it: the CPU-only one will do).
- ``gemm``: :mod:`spinal_ops.gemm`, every product of the layer one call of torch's matrix multiply (cuBLAS on a
  GPU), with its own backward op; any device (like ``triton``, it needs ``spinal_ops._C`` for its checks). The GPU
  plan for large batches.

Automatic choice: the fastest available for the tensor's device and dtype, except inside a ``torch.func`` transform
or forward-mode AD, where it is ``reference`` (:func:`autograd_transformed`). CPU tensors: ``cpu``, which runs
float32, float64, bfloat16 and float16. CUDA tensors: given the call's problem (layer sizes, rows, forward or
training), the fastest of ``cuda``, ``triton``, ``gemm`` and ``reference`` by the GPU cost model
(:func:`spinal_ops.gpu_model.choose_backend`, one decision per device, precision and problem, cached); without it
(and under ``torch.compile``, which traces the choice as a constant) ``cuda``, then ``triton``, then ``gemm``,
then ``reference``.
``SPINAL_OPS_BACKEND`` (read once, at import) and :func:`use_backend` (a context manager, which wins over the
variable) force one.

``SPINAL_OPS_AUTOTUNE=1`` (read once, at import; like ``torch.backends.cudnn.benchmark``) replaces the automatic
choice by a measurement: the first call of each problem (device, dtype, layer sizes, rows, forward or training,
threads) times every backend that can run it (:func:`tuning_candidates`) on the call's own tensors and keeps the
fastest for the rest of the process (:func:`spinal_ops.ops.run`). Not under ``torch.compile`` or CUDA graph capture
(the choice above applies there), and never over a forced backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os

import torch
import torch.autograd.forward_ad as _forward_ad

BACKENDS = ("reference", "cpu", "cuda", "triton", "gemm")

_ENV_BACKEND = os.environ.get("SPINAL_OPS_BACKEND") or None
_AUTOTUNE = os.environ.get("SPINAL_OPS_AUTOTUNE", "0") == "1"
_tuned: dict[tuple, str] = {}  # problem -> the backend measured fastest (SPINAL_OPS_AUTOTUNE=1)
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("spinal_ops_backend", default=None)


# Facts about this process, fixed at import so that torch.compile traces backend choice as constants.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_native_keys: frozenset[str] = frozenset()
_automatic: dict[tuple, str] = {}  # (device type, dtype) -> automatic choice; facts above never change


def record_native_kernels() -> None:
    """Note which dispatch keys have native kernels (called once ``spinal_ops._C`` is loaded)."""
    global _native_keys
    _automatic.clear()
    _native_keys = frozenset(
        key for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key("spinal_ops::spinal_forward", key)
    )


def _native_kernel(dispatch_key: str) -> bool:
    return dispatch_key in _native_keys


def _native_loaded() -> bool:
    """``spinal_ops._C`` is loaded (every build of it has the CPU kernels and the shared argument checks)."""
    return bool(_native_keys)


def cpu_kernel_isa() -> str | None:
    """The instruction set the ``cpu`` backend's kernels run here (``"avx512_bf16"``: the AVX-512 kernels and the
    bfloat16 pair products; ``"avx512"``, ``"avx2"`` or ``"baseline"``: the widest this CPU supports, capped by
    ``SPINAL_OPS_CPU_ISA``), or None without the native library."""
    return torch.ops.spinal_ops._cpu_isa() if _native_kernel("CPU") else None


def triton_importable() -> bool:
    """Triton is installed (checked without importing it)."""
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _TRITON_INTERPRET


_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The candidates for a device type, fastest first by default: the static automatic choice takes the first that runs
# the tensors; autotuning and the GPU cost model pick among them.
CANDIDATES = {"cuda": ("cuda", "triton", "gemm", "reference"), "cpu": ("cpu", "reference")}


def _serves(name: str, device_type: str, dtype: torch.dtype | None = None) -> bool:
    """Whether backend ``name`` can run on tensors of ``device_type`` (and ``dtype``) in this process."""
    if name == "reference":
        return True
    if name == "cpu":
        return device_type == "cpu" and _native_kernel("CPU") and (dtype is None or dtype in _CPU_DTYPES)
    if name == "cuda":
        return device_type == "cuda" and _native_kernel("CUDA")
    if name == "triton":
        if not (triton_importable() and _native_loaded()):
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())
    if name == "gemm":
        return _native_loaded()
    return False


def available_backends() -> list[str]:
    """Names of the backends usable in this process (for some device that this process has)."""
    names = ["reference"]
    if _native_kernel("CPU"):
        names.append("cpu")
    has_gpu = torch.cuda.is_available()
    if has_gpu and _native_kernel("CUDA"):
        names.append("cuda")
    if triton_importable() and _native_loaded() and (has_gpu or triton_interpreted()):
        names.append("triton")
    if _native_loaded():
        names.append("gemm")
    return names


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown spinal_ops backend {name!r}; valid names: {', '.join(BACKENDS)}")
    usable = available_backends()
    if name not in usable:
        raise RuntimeError(
            f"spinal_ops backend {name!r} is not available in this process; available: {', '.join(usable)}"
            + (" (the triton backend needs spinal_ops._C, and TRITON_INTERPRET=1 set before import for CPU tensors)"
               if name == "triton" else "")
        )


@contextlib.contextmanager
def use_backend(name: str):
    """Force backend ``name`` for spinal ops run inside the ``with`` block (this thread / task only).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` for one not available here; both list the
    valid names.
    """
    _check_name(name)
    token = _forced.set(name)
    try:
        yield name
    finally:
        _forced.reset(token)


def autotune_enabled() -> bool:
    """``SPINAL_OPS_AUTOTUNE=1`` was set at import: the automatic choice is measured per problem."""
    return _AUTOTUNE


def autograd_transformed() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``, ``hessian``, ``vmap``)
    or forward-mode AD (a ``torch.autograd.forward_ad.dual_level``) is active: the automatic choice is then
    ``reference``, whose plain PyTorch ops every transform supports. The fused ops' autograd (C++ for the native ops,
    ``torch.library`` for the others) has no forward-mode formula and no functorch rules."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def forced_backend() -> str | None:
    """The backend :func:`use_backend` or ``SPINAL_OPS_BACKEND`` forces here, or None."""
    return _forced.get() or _ENV_BACKEND


def tuning_candidates(device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The backends autotuning times for ``device_type`` tensors of ``dtype``: those that run them here (Triton
    only on a GPU: its interpreter is a correctness tool)."""
    return tuple(name for name in CANDIDATES["cuda" if device_type == "cuda" else "cpu"]
                 if _serves(name, device_type, dtype))


def select_backend(device: torch.device | str, dtype: torch.dtype | None = None, problem=None) -> str:
    """The backend that runs a spinal op on tensors of ``device`` (a device or its type, ``"cpu"``, ``"cuda"``) and
    ``dtype``: forced, or the fastest available.

    The ``cpu`` backend runs float32, float64, bfloat16 and float16 (the last two with float32 arithmetic); other
    dtypes on CPU go to ``reference`` automatically, and so does every call inside a ``torch.func`` transform or
    forward-mode AD (:func:`autograd_transformed`). ``problem``: ``(config, rows, mode)`` of the call (a
    :class:`spinal_ops.configs.SpinalConfig` of the layer, the batch rows, ``"forward"`` or ``"fwd+bwd"``); on a
    CUDA ``device`` (a ``torch.device``) the automatic choice is then the GPU cost model's for that problem. Under
    ``torch.compile`` the choice is made once, when the graph is traced, without the problem (change
    :func:`use_backend` before compiling, not inside a compiled region).
    """
    device_type = device if isinstance(device, str) else device.type
    name = _select(device_type, dtype)
    if problem is None or device_type != "cuda" or isinstance(device, str) or _forced.get() or _ENV_BACKEND \
            or torch.compiler.is_compiling() or autograd_transformed():
        return name
    return _gpu_choice(device, dtype, *problem)


def _gpu_choice(device: torch.device, dtype: torch.dtype | None, config, rows: int, mode: str) -> str:
    """The GPU cost model's backend for one call on CUDA ``device`` among the backends available for ``dtype``."""
    from . import gpu_model

    available = tuple(name for name in gpu_model.PLANS if _serves(name, "cuda", dtype))
    return gpu_model.choose_backend(config, rows, _device_key(device.index), gpu_model.math_of(dtype or
                                    torch.get_default_dtype()), mode, available)


@functools.cache
def _device_key(index: int | None) -> str:
    """The GPU cost model's entry for CUDA device ``index`` (None: the current device), once per device."""
    from . import gpu_model

    return gpu_model.device_key(torch.cuda.get_device_properties(index if index is not None else
                                                                 torch.cuda.current_device()))


# A constant for torch.compile: dynamo calls it while tracing instead of tracing into it (dynamo before torch 2.14
# cannot trace ContextVar.get).
@torch.compiler.assume_constant_result
def _select(device_type: str, dtype: torch.dtype | None) -> str:
    forced = _forced.get() or _ENV_BACKEND
    if forced is None:
        # autograd_transformed(), inline: this runs on every call of a layer
        if torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0:
            return "reference"
        key = (device_type, dtype)
        choice = _automatic.get(key)
        if choice is None:
            order = CANDIDATES["cuda" if device_type == "cuda" else "cpu"]
            choice = _automatic[key] = next(name for name in order if _serves(name, device_type, dtype))
        return choice
    if forced not in BACKENDS:
        raise ValueError(
            f"SPINAL_OPS_BACKEND={forced!r} is not a spinal_ops backend; valid names: {', '.join(BACKENDS)}"
        )
    if not _serves(forced, device_type, dtype):
        what = f"{device_type} tensors of dtype {dtype}" if dtype is not None else f"{device_type} tensors"
        raise RuntimeError(
            f"spinal_ops backend {forced!r} cannot run {what}; backends for them: "
            f"{', '.join(b for b in BACKENDS if _serves(b, device_type, dtype))}"
            + (" (the cpu backend runs float32, float64, bfloat16 and float16)" if forced == "cpu" else "")
        )
    return forced
