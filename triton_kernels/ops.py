"""The Triton ops, registered when :mod:`spinal_ops.triton_kernels` is imported.

``spinal_ops::spinal_forward_triton`` and ``spinal_ops::_spinal_backward_triton`` mirror the native ops one to one
(same arguments, same outputs; see ``csrc/spinal_ops.cpp``) and share their fake kernels and their autograd
formula (:func:`spinal_ops.ops.register_op_pair`). Their arguments go through the same checks as the native ops'
(``csrc/spinal_args.cpp``, through :func:`spinal_ops.ops.check_args`), naming the triton backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops as _spinal
from .backward import spinal_bwd_triton
from .forward import spinal_fwd_triton


@torch.library.triton_op("spinal_ops::spinal_forward_triton", mutates_args=())
def _spinal_forward_triton(
    x: Tensor, weight_x: Tensor, weight_h: Tensor, bias: Tensor | None, head_weight: Tensor | None,
    head_bias: Tensor | None, starts: list[int], slots: list[int], activation: str, negative_slope: float,
) -> tuple[Tensor, Tensor]:
    _spinal.check_args("triton", x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                       negative_slope)
    return spinal_fwd_triton(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation,
                             negative_slope)


@torch.library.triton_op("spinal_ops::_spinal_backward_triton", mutates_args=())
def _spinal_backward_triton(
    grad_y: Tensor | None, grad_H: Tensor | None, x: Tensor, H: Tensor, weight_x: Tensor, weight_h: Tensor,
    bias: Tensor | None, head_weight: Tensor | None, starts: list[int], slots: list[int], activation: str,
    negative_slope: float, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _spinal.check_args("triton", x, weight_x, weight_h, bias, head_weight, None, starts, slots, activation,
                       negative_slope)
    mask = _spinal.effective_output_mask(output_mask, bias, head_weight)
    return spinal_bwd_triton(grad_y, grad_H, x, H, weight_x, weight_h, bias, head_weight, starts, slots,
                             activation, negative_slope, mask)


_spinal.register_op_pair("spinal_ops::spinal_forward_triton", "spinal_ops::_spinal_backward_triton",
                         torch.ops.spinal_ops._spinal_backward_triton)

spinal_forward_op = torch.ops.spinal_ops.spinal_forward_triton.default
