"""Forward Triton kernel of the spinal layer (one launch: whole chain and head) and its launcher."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import settings
from ._common import _activate, _dot_k_loop, _input_projection, _mma, _preactivation_tile, activation_code


@triton.jit
def _spinal_fwd_kernel(
    x_ptr,  # (B, D) contiguous, storage dtype
    wx_ptr,  # (Lx, W, C) contiguous
    wh_ptr,  # (Lh, W, W) contiguous (never read when L == 1)
    b_ptr,  # (Lx, W) contiguous, read when HAS_BIAS
    wo_ptr,  # (OUT, L * W) contiguous, read when HAS_HEAD
    bo_ptr,  # (OUT,), read when HAS_HEAD_BIAS
    starts_ptr,  # (L,) int32: chunk i reads columns (starts[i] + j) mod D, j < C
    slots_ptr,  # (L,) int32: sub-layer i uses weight_x[slots[i]], bias[slots[i]], weight_h[slots[i] - 1]
    h_out_ptr,  # (B, L * W) out: H, every sub-layer's h
    y_ptr,  # (B, OUT) out, written when HAS_HEAD
    B,
    D,
    C,
    W,
    L,
    OUT,
    B_BUCKET,  # next power of two of B: the autotuning key (read by nothing else), from settings.launch_settings
    NEG_SLOPE: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_HEAD: tl.constexpr,
    HAS_HEAD_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    BARRIER: tl.constexpr,  # True; False only for the GPU test that shows the wide path's read-back needs it
    BLOCK_W: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Program p owns rows [p * BLOCK_B, (p + 1) * BLOCK_B) and runs the whole chain and head for them: rows are
    # independent in the forward, so programs never synchronise with each other. The path (WIDE), its tiles and
    # the row tile come from settings.launch_settings (the path from settings.path_plan).
    #
    # Fast path (WIDE = False; BLOCK_W >= W, BLOCK_O >= OUT: whole widths per tile, padded lanes masked to zero).
    # Kept in registers for the whole chain: h (BLOCK_B x BLOCK_W, the previous sub-layer's output, rounded to
    # the storage dtype exactly as H stores it) and the head accumulator y (BLOCK_B x BLOCK_O). Per sub-layer
    # the pre-activation z (BLOCK_B x BLOCK_W) is accumulated from the gathered input chunk (K-steps of
    # BLOCK_C columns, wrapping past column D - 1), the recurrent product h @ Wh.T (the whole BLOCK_W x BLOCK_W
    # weight tile) and the bias; h is stored to H and the head adds h @ Wo[:, i-th block].T (a BLOCK_W x BLOCK_O
    # tile).
    #
    # Wide path (WIDE = True; any W and OUT). H in global memory is the working storage: per sub-layer i, for
    # each column tile n of the width (BLOCK_N columns), z = gathered input projection of those columns +
    # h_{i-1} @ Wh.T[:, n] as a K-loop (BLOCK_K steps) over h_{i-1} read back from H + bias; h = act(z) is stored
    # to H. A barrier after each sub-layer makes the stores of all the program's threads visible before
    # the next sub-layer reads them (global memory is coherent within a block after a barrier). Then the head:
    # for each tile of OUT (BLOCK_O columns), y = H @ Wo.T[:, o] as a K-loop over the L*W columns of H, + head
    # bias, stored. On-chip per program: one accumulator tile (BLOCK_B x BLOCK_N, or BLOCK_B x BLOCK_O in the
    # head) and the operand tiles of one K-step; every weight streams from global memory (L2-resident: every
    # program reads the same ones).
    #
    # Assumptions: C <= D; every tile dimension >= 16 (tl.dot); each weight tensor has < 2^31 elements (32-bit
    # weight offsets; row offsets are 64-bit), checked by settings.check_index_limits.
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    hidden = L * W

    if WIDE:
        offs_n = tl.arange(0, BLOCK_N)
        for i in range(0, L):
            xs = tl.load(slots_ptr + i)
            hs = xs - 1
            start = tl.load(starts_ptr + i)
            for n0 in range(0, W, BLOCK_N):
                cols_n = n0 + offs_n
                n_mask = cols_n < W
                z = _preactivation_tile(x_ptr, wx_ptr + xs * W * C, start, h_out_ptr + (i - 1) * W,
                                        wh_ptr + hs * W * W, b_ptr + xs * W, i, rows64, row_mask, cols_n, n_mask, D,
                                        C, W, hidden, HAS_BIAS, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_B, BLOCK_N,
                                        BLOCK_C, BLOCK_K)
                h = _activate(z, NEG_SLOPE, ACT)
                tl.store(h_out_ptr + rows64[:, None] * hidden + i * W + cols_n[None, :],
                         h.to(h_out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
            if BARRIER:
                tl.debug_barrier()  # h_i complete and visible to every thread before sub-layer i + 1 / the head
        if HAS_HEAD:
            offs_o = tl.arange(0, BLOCK_O)
            for o0 in range(0, OUT, BLOCK_O):
                cols_o = o0 + offs_o
                o_mask = cols_o < OUT
                y = tl.zeros((BLOCK_B, BLOCK_O), dtype=ACC_DTYPE)
                # b[k, o] = head_weight[o, k]
                y = _dot_k_loop(y, h_out_ptr, hidden, rows64, row_mask, hidden, wo_ptr, 1, cols_o * hidden, o_mask,
                                DOT_DTYPE, PRECISION, BLOCK_K)
                if HAS_HEAD_BIAS:
                    bo = tl.load(bo_ptr + cols_o, mask=o_mask, other=0.0).to(ACC_DTYPE)
                    y = y + bo[None, :]
                tl.store(y_ptr + rows64[:, None] * OUT + cols_o[None, :], y.to(y_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & o_mask[None, :])
    else:
        cols_w = tl.arange(0, BLOCK_W)
        w_mask = cols_w < W
        cols_o = tl.arange(0, BLOCK_O)
        o_mask = cols_o < OUT
        h = tl.zeros((BLOCK_B, BLOCK_W), dtype=ACC_DTYPE)
        y = tl.zeros((BLOCK_B, BLOCK_O), dtype=ACC_DTYPE)
        for i in range(0, L):
            xs = tl.load(slots_ptr + i)
            hs = xs - 1
            start = tl.load(starts_ptr + i)
            z = tl.zeros((BLOCK_B, BLOCK_W), dtype=ACC_DTYPE)
            z = _input_projection(z, x_ptr, wx_ptr + xs * W * C, start, rows64, row_mask, cols_w, w_mask, D, C,
                                  DOT_DTYPE, PRECISION, BLOCK_C)
            if i > 0:
                # wh_t[k, n] = weight_h[hs][n, k]
                wh_t = tl.load(wh_ptr + hs * W * W + cols_w[None, :] * W + cols_w[:, None],
                               mask=w_mask[:, None] & w_mask[None, :], other=0.0)
                z = _mma(h, wh_t, z, DOT_DTYPE, PRECISION)
            if HAS_BIAS:
                bias = tl.load(b_ptr + xs * W + cols_w, mask=w_mask, other=0.0).to(ACC_DTYPE)
                z = z + bias[None, :]
            h = _activate(z, NEG_SLOPE, ACT)
            h = tl.where(w_mask[None, :], h, 0.0)
            h = h.to(h_out_ptr.dtype.element_ty).to(ACC_DTYPE)
            tl.store(h_out_ptr + rows64[:, None] * hidden + i * W + cols_w[None, :],
                     h.to(h_out_ptr.dtype.element_ty), mask=row_mask[:, None] & w_mask[None, :])
            if HAS_HEAD:
                # wo_t[k, o] = head_weight[o, i * W + k]
                wo_t = tl.load(wo_ptr + cols_o[None, :] * hidden + i * W + cols_w[:, None],
                               mask=w_mask[:, None] & o_mask[None, :], other=0.0)
                y = _mma(h, wo_t, y, DOT_DTYPE, PRECISION)
        if HAS_HEAD:
            if HAS_HEAD_BIAS:
                bo = tl.load(bo_ptr + cols_o, mask=o_mask, other=0.0).to(ACC_DTYPE)
                y = y + bo[None, :]
            tl.store(y_ptr + rows64[:, None] * OUT + cols_o[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & o_mask[None, :])


@functools.cache
def _spinal_fwd_kernel_tuned():
    """The kernel's ``triton.autotune`` wrapper, built on first use (some Triton releases need a GPU driver to
    build one, and importing the kernels must not)."""
    return settings.autotuner("forward")(_spinal_fwd_kernel)


def layer_table(starts, slots, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts, slots)`` as int32 device tensors, views of one ``(2L,)`` tensor, uploaded once per distinct table
    and device and then reused (:func:`settings.cached_layer_table`): no host-to-device copy per call."""
    table = settings.cached_layer_table(tuple(starts), tuple(slots), device)
    return table[: len(starts)], table[len(starts) :]


def spinal_fwd_triton(
    x: torch.Tensor,
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    head_weight: torch.Tensor | None,
    head_bias: torch.Tensor | None,
    starts: list[int],
    slots: list[int],
    activation: str,
    negative_slope: float,
    *,
    barrier: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the spinal layer in one Triton launch.

    Parameters follow the ``spinal_forward`` op (``csrc/spinal_ops.cpp``): ``x (B, D)`` contiguous,
    ``weight_x (S, w, c)``, ``weight_h (S-1, w, w)``, ``bias (S, w)?``, ``head_weight (out, L*w)?``,
    ``head_bias (out,)?``, ``starts`` (L first columns), ``slots`` (L weight slots). Returns
    ``(H (B, L*w), y (B, out) or (B, 0))``.

    ``barrier=False`` (tests only) drops the wide path's barrier between sub-layers.
    """
    rows, in_features = x.shape
    num_layers = len(starts)
    lx, width, chunk = weight_x.shape
    has_head = head_weight is not None
    out = head_weight.shape[0] if has_head else 0
    dims = settings.Dims(rows, in_features, chunk, width, num_layers, out, lx, weight_h.shape[0])
    dims.check()
    h_all = x.new_empty(rows, num_layers * width)
    y = x.new_empty(rows, out)
    if rows == 0:
        return h_all, y
    launch = settings.launch_settings("forward", dims, x.dtype, x.device)
    starts_t, slots_t = layer_table(starts, slots, x.device)
    kernel = _spinal_fwd_kernel_tuned() if launch.autotune else _spinal_fwd_kernel
    with settings.launch_guard(x.device):
        settings.launcher(kernel)[launch.grid](
            x, weight_x, weight_h, bias if bias is not None else x, head_weight if has_head else x,
            head_bias if head_bias is not None else x, starts_t, slots_t, h_all, y if has_head else h_all,
            rows, in_features, chunk, width, num_layers, out, *launch.args,
            NEG_SLOPE=float(negative_slope), ACT=activation_code(activation), HAS_BIAS=bias is not None,
            HAS_HEAD=has_head, HAS_HEAD_BIAS=head_bias is not None, BARRIER=bool(barrier), **launch.meta,
        )
    return h_all, y
