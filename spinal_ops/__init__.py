"""spinal_ops: fused SpinalNet layers for PyTorch.

``SpinalLinear`` is a drop-in for an ``nn.Linear`` head (``replace_linear`` swaps one into a model in one
line); ``spinal_linear`` is its functional form. Backends (``reference``, ``cpu``, ``cuda``, ``triton``) are
chosen per call by :mod:`spinal_ops.backends`.
"""

from . import reference
from .backends import available_backends, use_backend
from .module import SpinalLinear, default_layer_width, replace_linear
from .ops import spinal_linear

__all__ = ["SpinalLinear", "available_backends", "default_layer_width", "reference", "replace_linear", "spinal_linear",
           "use_backend"]
__version__ = "0.1.0"
