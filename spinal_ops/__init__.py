"""spinal_ops: fused SpinalNet layers for PyTorch.

``SpinalLinear`` is a drop-in for an ``nn.Linear`` head (``replace_linear`` swaps one into a model in one
line); ``spinal_linear`` is its functional form. Backends (``reference``, ``cpu``, ``cuda``, ``triton``) are
chosen per call by :mod:`spinal_ops.backends`.

Importing the package registers the ops (``torch.ops.spinal_ops.*``) when torch is already imported, the usual
case (``import torch, spinal_ops``). Otherwise torch and the ops load on the first use of any name of the package
(PEP 562), so that ``python -m spinal_ops --help`` starts without torch.
"""

import importlib
import sys

__version__ = "0.1.0"

# name -> submodule that defines it
_EXPORTS = {
    "SpinalLinear": "module",
    "default_layer_width": "module",
    "replace_linear": "replace",
    "spinal_linear": "ops",
    "available_backends": "backends",
    "use_backend": "backends",
    "reference": None,  # the submodule itself
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}.ops")  # loads the native library and registers every op
    where = _EXPORTS[name]
    value = importlib.import_module(f"{__name__}.{name if where is None else where}")
    if where is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if "torch" in sys.modules:
    for _name in _EXPORTS:
        __getattr__(_name)
    del _name
