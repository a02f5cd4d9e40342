"""The ``gemm`` backend: the spinal layer as calls of the GEMM library, one op pair with its own backward.

Every product of the layer is one call of torch's matrix multiply on the tensors' device (cuBLAS on a GPU, the BLAS
torch links on a CPU), written straight into its place in the outputs; the activations run in place. What it is
for: large batches on a GPU, where by the cost model (no GPU has measured it) a vendor GEMM at tensor-core rate beats
the fused kernels' one-CTA-per-row-tile chain, and where the eager chain it replaces pays for its ``cat`` copies, its
per-op graph nodes and the intermediates autograd saves. At small batches its host cost (a Python call per product)
loses to the fused kernels; the GPU cost model (:mod:`spinal_ops.gpu_model`) records these same calls and weighs
both.

Forward, per sub-layer ``i`` (``H_i`` the ``i``-th column block of ``H``, written in place)::

    H_i  = b[s] + x[:, idx_i] @ Wx[s].T          (one addmm on a view of x; a wrapping chunk is two column
                                                   ranges of x: an addmm and an addmm_)
    H_i += h_{i-1} @ Wh[s-1].T                   (i >= 1: one addmm into H_i, beta = 1)
    H_i  = act(H_i)                               (in place)
    y    = bo + H @ Wo.T                          (one addmm)

Backward (:func:`spinal_backward_gemm`), ``dZ`` kept in one ``(B, L*w)`` buffer::

    dZ    = G @ Wo (+ grad_H)                     then for i = L-1 .. 0:
    dZ_i *= act'(Z_i)                             (the activation's backward kernel, in place; Z_i recomputed
                                                   with the forward's own calls where act' needs it)
    dZ_{i-1} += dZ_i @ Wh[s-1]                    (one addmm, beta = 1)
    dWx[s] (+)= dZ_i.T @ x[:, idx_i],  dWh[s-1] (+)= dZ_i.T @ h_{i-1},  db[s] (+)= dZ_i.sum(0)
    dx[:, idx_i] (+)= dZ_i @ Wx[s]                (into dx's column blocks: no gather, no scatter, no atomics)
    dWo = G.T @ H,  dbo = G.sum(0)

Intermediates are in the storage dtype (as in the eager chain); the GEMMs accumulate as the library does (float32 for
16-bit inputs). Deterministic where the library is: cuBLAS for a fixed device, stream and workspace configuration
(PyTorch's ``CUBLAS_WORKSPACE_CONFIG`` note), the CPU BLAS for a fixed thread count. Saved for backward: ``x`` and
``H``, as for the fused ops; the backward is differentiable through :func:`spinal_ops.reference.spinal_backward`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference


def _activate_(z: Tensor, activation: str, negative_slope: float) -> None:
    """``z = act(z)`` in place, the values of :func:`reference.activate`."""
    if activation == "relu":
        torch.relu_(z)
    elif activation == "leaky_relu":
        F.leaky_relu_(z, negative_slope)
    elif activation == "tanh":
        z.tanh_()
    elif activation == "sigmoid":
        z.sigmoid_()
    elif activation == "silu":
        F.silu(z, inplace=True)
    elif activation == "gelu":
        z.copy_(F.gelu(z))
    elif activation != "identity":
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")


def _times_activation_grad_(grad: Tensor, h: Tensor, z: Tensor | None, activation: str,
                            negative_slope: float) -> None:
    """``grad *= act'(Z)`` in place, in one pass: the activation's own backward kernel (what autograd runs for it),
    from ``h = act(Z)`` or, where :func:`reference.needs_preactivation`, from ``z``."""
    aten = torch.ops.aten
    if activation == "relu":
        aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad)
    elif activation == "leaky_relu":
        from_h = negative_slope >= 0.0
        aten.leaky_relu_backward.grad_input(grad, h if from_h else z, negative_slope, from_h, grad_input=grad)
    elif activation == "tanh":
        aten.tanh_backward.grad_input(grad, h, grad_input=grad)
    elif activation == "sigmoid":
        aten.sigmoid_backward.grad_input(grad, h, grad_input=grad)
    elif activation == "gelu":
        aten.gelu_backward.grad_input(grad, z, grad_input=grad)
    elif activation == "silu":
        aten.silu_backward.grad_input(grad, z, grad_input=grad)
    elif activation != "identity":
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")


@functools.lru_cache(maxsize=1024)
def _pieces(start: int, chunk: int, in_features: int) -> tuple[tuple[int, int, int], ...]:
    """The column ranges of ``x`` a chunk reads, as ``(first column of x, columns, first column of the chunk)``: one,
    or two where the chunk wraps past column ``D - 1``."""
    if start + chunk <= in_features:
        return ((start, chunk, 0),)
    head = in_features - start
    return ((start, head, 0), (0, chunk - head, head))


def _preactivation(out: Tensor, x: Tensor, weight_x: Tensor, weight_h: Tensor, bias: Tensor | None,
                   h_prev: Tensor | None, start: int, slot: int) -> Tensor:
    """``Z_i`` of one sub-layer written into ``out``: the forward's calls, which the backward repeats where ``act'``
    needs ``Z`` (so the two agree bit for bit)."""
    wx = weight_x[slot]
    for n, (col, size, k0) in enumerate(_pieces(start, wx.shape[1], x.shape[1])):
        xs, ws = x.narrow(1, col, size), wx.narrow(1, k0, size).T
        if n > 0:
            out.addmm_(xs, ws)
        elif bias is not None:
            torch.addmm(bias[slot], xs, ws, out=out)
        else:
            torch.mm(xs, ws, out=out)
    if h_prev is not None:
        out.addmm_(h_prev, weight_h[slot - 1].T)
    return out


def spinal_forward_gemm(x: Tensor, weight_x: Tensor, weight_h: Tensor, bias: Tensor | None,
                        head_weight: Tensor | None, head_bias: Tensor | None, starts: list[int], slots: list[int],
                        activation: str, negative_slope: float) -> tuple[Tensor, Tensor]:
    """The forward (the ``spinal_forward`` op's arguments and outputs), one GEMM call per product."""
    rows = x.shape[0]
    width = weight_x.shape[1]
    h_all = x.new_empty(rows, len(starts) * width)
    for i, (start, slot) in enumerate(zip(starts, slots, strict=True)):
        h_i = h_all.narrow(1, i * width, width)
        h_prev = h_all.narrow(1, (i - 1) * width, width) if i > 0 else None
        _activate_(_preactivation(h_i, x, weight_x, weight_h, bias, h_prev, start, slot), activation,
                   negative_slope)
    if head_weight is None:
        return h_all, x.new_empty(rows, 0)
    if head_bias is not None:
        return h_all, torch.addmm(head_bias, h_all, head_weight.T)
    return h_all, h_all @ head_weight.T


@functools.lru_cache(maxsize=256)
def _dx_plan(starts: tuple[int, ...], chunk: int, in_features: int) -> tuple[tuple[tuple[bool, ...], ...], tuple]:
    """How ``dx`` is assembled from the chunks' column ranges (:func:`_pieces`): per sub-layer and range, whether its
    product is the first written to those columns (a plain GEMM into them) rather than added; and the column ranges
    no chunk reads (zeroed). Ranges that repeat an earlier one add to it; a range that overlaps an earlier one only
    partly (chunks of a cyclic split that does not divide D) makes every product add into zeros (the one range
    ``(0, D)``)."""
    written: list[tuple[int, int]] = []
    first = []
    for s in starts:
        flags = []
        for col, size, _ in _pieces(s, chunk, in_features):
            span = (col, col + size)
            if span in written:
                flags.append(False)
            elif all(span[1] <= a or span[0] >= b for a, b in written):
                flags.append(True)
                written.append(span)
            else:
                return (tuple(tuple(False for _ in _pieces(t, chunk, in_features)) for t in starts),
                        ((0, in_features),))
        first.append(tuple(flags))
    gaps, edge = [], 0
    for a, b in sorted(written):
        if a > edge:
            gaps.append((edge, a - edge))
        edge = max(edge, b)
    if edge < in_features:
        gaps.append((edge, in_features - edge))
    return tuple(first), tuple(gaps)


def _slot_gemm(out: Tensor, first: bool, a: Tensor, b: Tensor) -> None:
    """``out = a @ b`` for a slot's first term, ``out += a @ b`` for the next ones (tied slots)."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def spinal_backward_gemm(grad_y: Tensor | None, grad_H: Tensor | None, x: Tensor, H: Tensor, weight_x: Tensor,
                         weight_h: Tensor, bias: Tensor | None, head_weight: Tensor | None, starts: list[int],
                         slots: list[int], activation: str, negative_slope: float,
                         output_mask: list[bool]) -> tuple[Tensor, ...]:
    """The backward (the ``_spinal_backward`` op's arguments and outputs; ``output_mask`` already normalised by
    :func:`spinal_ops.ops.effective_output_mask`), one GEMM call per product."""
    rows, in_features = x.shape
    width, chunk = weight_x.shape[1], weight_x.shape[2]
    num_layers = len(starts)
    def empty():  # one per gradient not asked for: an op's outputs may not alias each other
        return x.new_empty(0)

    dwo, dbo = empty(), empty()
    if output_mask[4]:
        dwo = grad_y.T @ H if grad_y is not None else torch.zeros_like(head_weight)
    if output_mask[5]:
        dbo = grad_y.sum(0) if grad_y is not None else head_weight.new_zeros(head_weight.shape[0])
    if not any(output_mask[:4]):
        return empty(), empty(), empty(), empty(), dwo, dbo
    if grad_y is not None:
        dz = torch.addmm(grad_H, grad_y, head_weight) if grad_H is not None else grad_y @ head_weight
    else:
        dz = grad_H.clone() if grad_H is not None else H.new_zeros(rows, num_layers * width)
    blocks = [dz.narrow(1, i * width, width) for i in range(num_layers)]
    hs = [H.narrow(1, i * width, width) for i in range(num_layers)]
    need_z = reference.needs_preactivation(activation, negative_slope)
    for i in reversed(range(num_layers)):
        z = None
        if need_z:
            z = _preactivation(H.new_empty(rows, width), x, weight_x, weight_h, bias, hs[i - 1] if i else None,
                               starts[i], slots[i])
        _times_activation_grad_(blocks[i], hs[i], z, activation, negative_slope)
        if i > 0:
            blocks[i - 1].addmm_(blocks[i], weight_h[slots[i] - 1])
    seen_x, seen_h = set(), set()
    dwx = torch.empty_like(weight_x) if output_mask[1] else empty()
    dwh = torch.empty_like(weight_h) if output_mask[2] else empty()
    db = torch.empty_like(bias) if output_mask[3] else empty()
    untied = list(slots) == list(range(num_layers))
    if output_mask[3] and untied:  # sub-layer i owns bias slot i: every slot's sum in one reduction over the rows
        torch.sum(dz.view(rows, num_layers, width), 0, out=db)
    for i, (start, slot) in enumerate(zip(starts, slots, strict=True)):
        if output_mask[1]:
            for col, size, k0 in _pieces(start, chunk, in_features):
                _slot_gemm(dwx[slot].narrow(1, k0, size), slot not in seen_x, blocks[i].T, x.narrow(1, col, size))
        if output_mask[3] and not untied:
            if slot in seen_x:
                db[slot].add_(blocks[i].sum(0))
            else:
                torch.sum(blocks[i], 0, out=db[slot])
        seen_x.add(slot)
        if i > 0 and output_mask[2]:
            _slot_gemm(dwh[slot - 1], slot not in seen_h, blocks[i].T, hs[i - 1])
            seen_h.add(slot)
    dx = empty()
    if output_mask[0]:
        first, gaps = _dx_plan(tuple(starts), chunk, in_features)
        dx = x.new_empty(rows, in_features)
        for start, size in gaps:
            dx.narrow(1, start, size).zero_()
        for i, (start, slot) in enumerate(zip(starts, slots, strict=True)):
            for (col, size, k0), write in zip(_pieces(start, chunk, in_features), first[i], strict=True):
                _slot_gemm(dx.narrow(1, col, size), write, blocks[i], weight_x[slot].narrow(1, k0, size))
    return dx, dwx, dwh, db, dwo, dbo


# ------------------------------------------------------------------------------------------------------ the ops


def _define_ops():
    from . import ops  # which imports this module at its end, once its registrations are defined

    return ops.define_op_pair("gemm", torch.library.custom_op, spinal_forward_gemm, spinal_backward_gemm)


spinal_forward_op = _define_ops()  # spinal_ops::spinal_forward_gemm and _spinal_backward_gemm
