"""The Triton ops, registered when :mod:`spinal_ops.triton_kernels` is imported.

``spinal_ops::spinal_forward_triton`` and ``spinal_ops::_spinal_backward_triton`` (``torch.library.triton_op``,
defined by :func:`spinal_ops.ops.define_op_pair`, as the gemm backend's ops are) mirror the native ops one to one
(same arguments, same outputs; see ``csrc/spinal_ops.cpp``) and share their fake kernels and their autograd formula.
Their arguments go through the same checks as the native ops' (``csrc/spinal_args.cpp``), naming the triton
backend.
"""

from __future__ import annotations

import torch

from .. import ops as _spinal
from .backward import spinal_bwd_triton
from .forward import spinal_fwd_triton

spinal_forward_op = _spinal.define_op_pair("triton", torch.library.triton_op, spinal_fwd_triton, spinal_bwd_triton)
