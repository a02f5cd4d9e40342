"""Triton kernels of spinal_ops (installed as ``spinal_ops.triton_kernels``).

- :func:`spinal_fwd_triton` (``triton_kernels/forward.py``): the forward, one launch of ``_spinal_fwd_kernel``
  (whole chain and head per row tile); ``H`` is always stored (the backward reads it).
- :func:`spinal_bwd_triton` (``triton_kernels/backward.py``): the backward, at most two launches:
  ``_spinal_bwd_chain_kernel`` (reverse recurrence per row tile: dZ and dx) and ``_spinal_bwd_weights_kernel``
  (weight and bias gradients, each output tile reduced over all rows in a fixed order: deterministic; its task
  counts computed on the host and passed in). It expects an output mask already normalised by its caller (no
  ``dbias`` without ``bias``, no head gradients without ``head_weight``) and raises a ``ValueError`` on an
  inconsistent one.
- ``triton_kernels/_common.py``: the device helpers both share (activations and their derivatives, the gathered
  input projection, the K-loop, the pre-activation tile).
- ``triton_kernels/settings.py``: the launch settings. :func:`settings.launch_settings` is the one entry the
  launchers call: given the kernel, the problem (:class:`settings.Dims`), the dtype and the device, it returns the
  launch (:class:`settings.Launch`: grid, path, tiles, warps, stages, dtype constexprs, or the autotuner to run),
  with the cost model's constants next to their justification.

Each program of the forward and chain kernels owns a tile of rows and runs the whole chain for them; the two
kernels have two paths, one ``WIDE`` constexpr flag, chosen per layer by :func:`settings.path_plan`:

- fast path (narrow layers): a sub-layer's whole width and the whole head row are single tiles; ``h`` (forward)
  or the carry ``dZ @ Wh`` (backward) stays in registers across sub-layers, and the whole ``w x w`` recurrent
  weight and ``w x out`` head-weight tiles are loaded per sub-layer. Used while those tiles fit the modelled
  shared memory (160 KB) and registers: e.g. fp32 ``w <= 128`` with ``out <= 128``, 16-bit ``w <= 256`` with
  ``out <= 64``; never for ``out > 1024``.
- wide path (everything else): the width is tiled into column tiles and K-steps, the head into output tiles; each
  sub-layer's ``h`` (forward) or ``dZ`` (backward) is written to global memory and read back by the next
  sub-layer after a ``tl.debug_barrier()``. No limit on ``layer_width`` or ``out_features``; the same launch
  counts (forward 1, backward at most 2).

The only size limit left is 32-bit index arithmetic inside weight tensors: fewer than 2^31 rows and fewer than
2^31 elements per weight tensor (:func:`settings.check_index_limits` raises a ``ValueError`` naming the fallback
backends).

Both launch through :func:`settings.launcher` (``torch.library.wrap_triton``; under the interpreter on torch
before 2.13, which rejects interpreted kernels there, the kernel itself), so that the ``torch.library.triton_op``
registrations of :mod:`spinal_ops.triton_kernels.ops` (``spinal_ops::spinal_forward_triton`` /
``_spinal_backward_triton``, registered when this package is imported) are traceable by ``torch.compile`` on a
GPU.

CPU tensors: set ``TRITON_INTERPRET=1`` in the environment *before* Triton is first imported (e.g. before
``import spinal_ops`` and anything else importing triton); the kernels then run in Triton's interpreter
(slow; for testing). Under the interpreter bfloat16 operands are upcast to float32 before ``tl.dot`` (the
interpreter's bf16 dot is broken), and ``torch.compile`` through the Triton ops does not work (FakeTensors
have no data pointer): eager only.
"""

from .backward import spinal_bwd_triton
from .forward import spinal_fwd_triton
from .ops import spinal_forward_op  # registers the Triton ops

__all__ = ["spinal_bwd_triton", "spinal_forward_op", "spinal_fwd_triton"]
