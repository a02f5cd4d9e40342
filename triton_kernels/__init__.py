"""Triton kernels of spinal_ops (installed as ``spinal_ops.triton_kernels``).

- :func:`spinal_fwd_triton`: the forward, one launch of ``_spinal_fwd_kernel`` (whole chain and head per row
  tile).
- :func:`spinal_bwd_triton`: the backward, at most two launches: ``_spinal_bwd_chain_kernel`` (reverse
  recurrence per row tile: dZ and dx) and ``_spinal_bwd_weights_kernel`` (weight and bias gradients, each
  output tile reduced over all rows in a fixed order: deterministic).

Both launch through ``torch.library.wrap_triton`` so that the ``torch.library.triton_op`` registrations in
:mod:`spinal_ops.ops` (``spinal_ops::spinal_forward_triton`` / ``spinal_backward_triton``) are traceable by
``torch.compile`` on a GPU.

CPU tensors: set ``TRITON_INTERPRET=1`` in the environment *before* Triton is first imported (e.g. before
``import spinal_ops`` and anything else importing triton); the kernels then run in Triton's interpreter
(slow; for testing). Under the interpreter bfloat16 operands are upcast to float32 before ``tl.dot`` (the
interpreter's bf16 dot is broken), and ``torch.compile`` through the Triton ops does not work (FakeTensors
have no data pointer): eager only.

Launch settings (tiles, warps, stages, autotuning, the float32 ieee/tf32 choice) come from
:mod:`spinal_ops.triton_kernels.config`.
"""

from .backward import spinal_bwd_triton
from .forward import spinal_fwd_triton

__all__ = ["spinal_bwd_triton", "spinal_fwd_triton"]
