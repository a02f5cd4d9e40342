"""Backward Triton kernels of the spinal layer (at most two launches) and their launcher.

Launch 1, ``_spinal_bwd_chain_kernel``: the reverse recurrence per row tile, writing ``dZ`` (a float32 /
float64 scratch ``(B, L*w)``, read again by launch 2) and ``dx``. Fast or wide path as in the forward
(:func:`spinal_ops.triton_kernels.settings.path_plan`).
Launch 2, ``_spinal_bwd_weights_kernel``: ``dweight_x``, ``dbias``, ``dweight_h``, ``dhead_weight``,
``dhead_bias``; every program owns one output tile and reduces it over all rows in a fixed order (tiled for any
width and any number of outputs: it has no fast/wide distinction). Its task counts are computed once, on the host
(:func:`spinal_ops.triton_kernels.settings.weight_tasks`), and passed in.

Both launches take their grid, tiles, warps and stages from
:func:`spinal_ops.triton_kernels.settings.launch_settings`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from spinal_ops.reference import needs_preactivation

from . import settings
from ._common import (
    _act_grad_from_h,
    _act_grad_from_z,
    _dot_k_loop,
    _mma,
    _preactivation_tile,
    activation_code,
)
from .forward import layer_table


@triton.jit
def _spinal_bwd_chain_kernel(
    gy_ptr,  # (B, OUT) incoming gradient of y, read when HAS_GY
    gh_ptr,  # (B, L * W) incoming gradient of H, read when HAS_GH
    x_ptr,  # (B, D) contiguous
    h_ptr,  # (B, L * W): H from the forward
    wx_ptr,  # (Lx, W, C)
    wh_ptr,  # (Lh, W, W)
    b_ptr,  # (Lx, W), read when HAS_BIAS and NEED_Z
    wo_ptr,  # (OUT, L * W), read when HAS_GY
    starts_ptr,  # (L,) int32
    slots_ptr,  # (L,) int32: the weight slot of each sub-layer
    dz_ptr,  # (B, L * W) out, ACC dtype: dZ of every sub-layer
    dx_ptr,  # (B, D) out, written when NEED_DX
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
    HAS_GY: tl.constexpr,
    HAS_GH: tl.constexpr,
    NEED_Z: tl.constexpr,
    NEED_DX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Program p owns rows [p * BLOCK_B, (p + 1) * BLOCK_B), as in the forward; programs never synchronise.
    # Phase 1, sub-layers i = L-1 .. 0: dZ_i = (dH_i + dZ_{i+1} @ Wh[slot(i+1)]) * act'(Z_i), with
    # dH_i = G @ Wo[:, i-th block] (+ grad_H). act' comes from h (loaded from H) or, when NEED_Z (gelu, silu,
    # leaky_relu with a negative slope), from Z recomputed from x, h_{i-1} and the weights exactly as the forward
    # computed it. dZ_i is stored to the scratch (ACC dtype).
    #   Fast path (WIDE = False; BLOCK_W >= W, BLOCK_O >= OUT): kept in registers are the carry dZ_{i+1} @ Wh
    #   (BLOCK_B x BLOCK_W) and G (BLOCK_B x BLOCK_O, loaded once); the whole BLOCK_W x BLOCK_W recurrent and
    #   BLOCK_O x BLOCK_W head-weight tiles are loaded per sub-layer.
    #   Wide path (WIDE = True; any W and OUT): per column tile n of the width (BLOCK_N columns), dH = grad_H tile
    #   + a K-loop over OUT in BLOCK_O steps of G[:, o] @ Wo[o, i*W + n] + a K-loop over the width in BLOCK_K
    #   steps of dZ_{i+1}[:, k] @ Wh[slot(i+1)][k, n], dZ_{i+1} read back from the scratch; act' from the h tile
    #   or from the Z tile recomputed the same way (K-loop over h_{i-1} read from H). A barrier after each
    #   sub-layer makes its dZ stores visible to all of the program's threads before sub-layer i - 1 reads them.
    #   On-chip: the dH, act' (and Z) tiles (BLOCK_B x BLOCK_N) and one K-step's operand tiles.
    # Phase 2 (NEED_DX), after a barrier so this program's dZ stores are visible to all its threads: dx is
    # computed as a gather, column tile by column tile (BLOCK_C columns): dx[:, col] = sum over sub-layers i
    # whose chunk holds col of dZ_i @ Wx[i][:, (col - s_i) mod D], a K-loop over the width in BLOCK_K steps
    # (one step on the fast path, where BLOCK_K = BLOCK_W). Each dx element is written once (zero where no chunk
    # reads the column): no atomics, no pre-zeroing, deterministic.
    # Assumptions: C <= D, tile dimensions >= 16, each weight tensor has < 2^31 elements (32-bit weight
    # offsets; row offsets are 64-bit), checked by settings.check_index_limits.
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    hidden = L * W

    if WIDE:
        offs_n = tl.arange(0, BLOCK_N)
        for t in range(0, L):
            i = L - 1 - t
            xs = tl.load(slots_ptr + i)
            hs = xs - 1
            hs_next = tl.load(slots_ptr + tl.minimum(i + 1, L - 1)) - 1  # weight_h slot of sub-layer i + 1
            start = tl.load(starts_ptr + i)
            for n0 in range(0, W, BLOCK_N):
                cols_n = n0 + offs_n
                n_mask = cols_n < W
                rn_mask = row_mask[:, None] & n_mask[None, :]
                dh = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
                if HAS_GH:
                    dh += tl.load(gh_ptr + rows64[:, None] * hidden + i * W + cols_n[None, :], mask=rn_mask,
                                  other=0.0).to(ACC_DTYPE)
                if HAS_GY:
                    # b[o, n] = head_weight[o, i * W + n]
                    dh = _dot_k_loop(dh, gy_ptr, OUT, rows64, row_mask, OUT, wo_ptr + i * W, hidden, cols_n, n_mask,
                                     DOT_DTYPE, PRECISION, BLOCK_O)
                if i < L - 1:
                    # b[k, n] = weight_h[slot(i + 1)][k, n]: the carry dZ_{i+1} @ Wh
                    dh = _dot_k_loop(dh, dz_ptr + (i + 1) * W, hidden, rows64, row_mask, W,
                                     wh_ptr + hs_next * W * W, W, cols_n, n_mask, DOT_DTYPE, PRECISION, BLOCK_K)
                if NEED_Z:
                    z = _preactivation_tile(x_ptr, wx_ptr + xs * W * C, start, h_ptr + (i - 1) * W,
                                            wh_ptr + hs * W * W, b_ptr + xs * W, i, rows64, row_mask, cols_n, n_mask,
                                            D, C, W, hidden, HAS_BIAS, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_B,
                                            BLOCK_N, BLOCK_C, BLOCK_K)
                    d = _act_grad_from_z(z, NEG_SLOPE, ACT)
                else:
                    h = tl.load(h_ptr + rows64[:, None] * hidden + i * W + cols_n[None, :], mask=rn_mask,
                                other=0.0).to(ACC_DTYPE)
                    d = _act_grad_from_h(h, NEG_SLOPE, ACT)
                dz = tl.where(rn_mask, dh * d, 0.0)
                tl.store(dz_ptr + rows64[:, None] * hidden + i * W + cols_n[None, :], dz, mask=rn_mask)
            tl.debug_barrier()  # dZ_i complete and visible to every thread before sub-layer i - 1 reads it
    else:
        cols_w = tl.arange(0, BLOCK_W)
        w_mask = cols_w < W
        cols_o = tl.arange(0, BLOCK_O)
        o_mask = cols_o < OUT
        rw_mask = row_mask[:, None] & w_mask[None, :]
        if HAS_GY:
            g = tl.load(gy_ptr + rows64[:, None] * OUT + cols_o[None, :], mask=row_mask[:, None] & o_mask[None, :],
                        other=0.0)
        carry = tl.zeros((BLOCK_B, BLOCK_W), dtype=ACC_DTYPE)
        for t in range(0, L):
            i = L - 1 - t
            dh = carry
            if HAS_GH:
                dh += tl.load(gh_ptr + rows64[:, None] * hidden + i * W + cols_w[None, :], mask=rw_mask,
                              other=0.0).to(ACC_DTYPE)
            if HAS_GY:
                # wo[o, k] = head_weight[o, i * W + k]
                wo = tl.load(wo_ptr + cols_o[:, None] * hidden + i * W + cols_w[None, :],
                             mask=o_mask[:, None] & w_mask[None, :], other=0.0)
                dh = _mma(g, wo, dh, DOT_DTYPE, PRECISION)
            xs = tl.load(slots_ptr + i)
            hs = xs - 1
            if NEED_Z:
                start = tl.load(starts_ptr + i)
                # one column tile (BLOCK_W) and one K-step (BLOCK_K = BLOCK_W): the whole recurrent tile
                z = _preactivation_tile(x_ptr, wx_ptr + xs * W * C, start, h_ptr + (i - 1) * W, wh_ptr + hs * W * W,
                                        b_ptr + xs * W, i, rows64, row_mask, cols_w, w_mask, D, C, W, hidden,
                                        HAS_BIAS, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_B, BLOCK_W, BLOCK_C, BLOCK_W)
                d = _act_grad_from_z(z, NEG_SLOPE, ACT)
            else:
                h = tl.load(h_ptr + rows64[:, None] * hidden + i * W + cols_w[None, :], mask=rw_mask,
                            other=0.0).to(ACC_DTYPE)
                d = _act_grad_from_h(h, NEG_SLOPE, ACT)
            dz = tl.where(rw_mask, dh * d, 0.0)
            tl.store(dz_ptr + rows64[:, None] * hidden + i * W + cols_w[None, :], dz, mask=rw_mask)
            if i > 0:
                # wh[n, k] = weight_h[hs][n, k]: carry = dZ_i @ Wh
                wh = tl.load(wh_ptr + hs * W * W + cols_w[:, None] * W + cols_w[None, :],
                             mask=w_mask[:, None] & w_mask[None, :], other=0.0)
                carry = _mma(dz, wh, tl.zeros((BLOCK_B, BLOCK_W), dtype=ACC_DTYPE), DOT_DTYPE, PRECISION)

    if NEED_DX:
        tl.debug_barrier()
        offs_d = tl.arange(0, BLOCK_C)
        for d0 in range(0, D, BLOCK_C):
            cols = d0 + offs_d
            d_mask = cols < D
            n_cols = tl.minimum(D - d0, BLOCK_C)
            acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC_DTYPE)
            for i in range(0, L):
                start = tl.load(starts_ptr + i)
                rel = d0 - start
                rel = tl.where(rel < 0, rel + D, rel)
                # the tile holds a column of chunk i iff its first offset is < C or its offsets wrap to 0
                if (rel < C) | (rel + n_cols > D):
                    xs = tl.load(slots_ptr + i)
                    j = cols - start
                    j = tl.where(j < 0, j + D, j)
                    j_mask = d_mask & (j < C)
                    # b[k, col] = weight_x[xs][k, j(col)]
                    acc = _dot_k_loop(acc, dz_ptr + i * W, hidden, rows64, row_mask, W, wx_ptr + xs * W * C, C, j,
                                      j_mask, DOT_DTYPE, PRECISION, BLOCK_K)
            tl.store(dx_ptr + rows64[:, None] * D + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _reduce_rows(
    acc,  # (BLOCK_M, BLOCK_N)
    vec,  # (BLOCK_M,) running column sum of the left operand (bias gradients)
    a_ptr,  # left operand: a[r, m] at a_ptr + r * a_stride + m
    a_stride,
    m_idx,
    m_mask,
    b_ptr,  # right operand: b[r, n] at b_ptr + r * b_stride + n_col[n]
    b_stride,
    n_col,
    n_mask,
    B,
    WANT_MAT: tl.constexpr,
    WANT_VEC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """acc += a[rows, m].T @ b[rows, n] and vec += a[rows, m].sum(0), over all B rows in order."""
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, B, BLOCK_R):
        r = r0 + offs_r
        r_mask = r < B
        r64 = r.to(tl.int64)
        a = tl.load(a_ptr + r64[:, None] * a_stride + m_idx[None, :], mask=r_mask[:, None] & m_mask[None, :],
                    other=0.0)
        if WANT_MAT:
            b = tl.load(b_ptr + r64[:, None] * b_stride + n_col[None, :], mask=r_mask[:, None] & n_mask[None, :],
                        other=0.0)
            acc = _mma(tl.trans(a), b, acc, DOT_DTYPE, PRECISION)
        if WANT_VEC:
            vec += tl.sum(a.to(ACC_DTYPE), axis=0)
    return acc, vec


@triton.jit
def _spinal_bwd_weights_kernel(
    x_ptr,  # (B, D)
    h_ptr,  # (B, L * W)
    gy_ptr,  # (B, OUT), read when HAS_GY
    dz_ptr,  # (B, L * W) ACC dtype, from the chain kernel
    starts_ptr,  # (L,) int32
    slots_ptr,  # (L,) int32
    dwx_ptr,  # (Lx, W, C) out, when NEED_WX
    db_ptr,  # (Lx, W) out, when NEED_B
    dwh_ptr,  # (Lh, W, W) out, when NEED_WH
    dwo_ptr,  # (OUT, L * W) out, when NEED_WO
    dbo_ptr,  # (OUT,) out, when NEED_BO
    B,
    D,
    C,
    W,
    L,
    OUT,
    TILES_M,  # the task counts, from settings.weight_tasks: tiles of BLOCK_M over W (ranges A and B)
    TILES_N_A,  # tiles of BLOCK_N over C per tile row of range A (1 when only dbias)
    TASKS_A,  # programs of range A: Lx * TILES_M * TILES_N_A, or 0
    TILES_N_B,  # tiles of BLOCK_N over W per tile row of range B
    TASKS_B,  # programs of range B: Lh * TILES_M * TILES_N_B, or 0
    TILES_N_C,  # tiles of BLOCK_N over L * W per tile row of range C (1 when only dhead_bias); C is the rest
    HAS_GY: tl.constexpr,
    NEED_WX: tl.constexpr,
    NEED_B: tl.constexpr,
    NEED_WH: tl.constexpr,
    NEED_WO: tl.constexpr,
    NEED_BO: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program per output tile (BLOCK_M x BLOCK_N; BLOCK_O x BLOCK_N for the head) of one gradient; the 1-D
    # grid is split into three task ranges, in this order (their counts computed on the host, passed in):
    #   A. dweight_x[s] (W x C) and dbias[s]: s < Lx, tile (m over W, n over C). Sums dZ_i.T @ x[:, idx_i] over
    #      the sub-layers i of slot s (slots[i] == s: several when weights are tied). dbias[s] is summed by the
    #      n == 0 tiles. (With only dbias wanted, one n tile per m tile.)
    #   B. dweight_h[s] (W x W): s < Lh, tile (m over W, n over W). Sums dZ_i.T @ h_{i-1} over the i >= 1 with
    #      slots[i] == s + 1.
    #   C. dhead_weight (OUT x L*W) = G.T @ H and dhead_bias = G.sum(0) (by the n == 0 tiles), tile (o over OUT
    #      in BLOCK_O, n over L*W).
    # Each program walks all B rows in BLOCK_R steps, sub-layers in increasing order: a fixed summation order,
    # so results are bitwise reproducible; no atomics, no partial buffers. Only the accumulator tile and the bias
    # vector stay in registers. Every extent is tiled, so any width and any number of outputs work (no fast/wide
    # distinction here). Without an incoming G, task C writes zeros.
    pid = tl.program_id(0)
    hidden = L * W

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    vec = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    if pid < TASKS_A:
        s = pid // (TILES_M * TILES_N_A)
        rem = pid % (TILES_M * TILES_N_A)
        m_idx = (rem // TILES_N_A) * BLOCK_M + offs_m
        n_idx = (rem % TILES_N_A) * BLOCK_N + offs_n
        m_mask = m_idx < W
        n_mask = n_idx < C
        want_vec = (rem % TILES_N_A) == 0
        for i in range(0, L):
            if tl.load(slots_ptr + i) == s:
                start = tl.load(starts_ptr + i)
                col = start + n_idx
                col = tl.where(col >= D, col - D, col)
                if NEED_B:
                    if want_vec:
                        acc, vec = _reduce_rows(acc, vec, dz_ptr + i * W, hidden, m_idx, m_mask, x_ptr, D, col,
                                                n_mask, B, NEED_WX, True, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_R)
                    else:
                        acc, vec = _reduce_rows(acc, vec, dz_ptr + i * W, hidden, m_idx, m_mask, x_ptr, D, col,
                                                n_mask, B, NEED_WX, False, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_R)
                else:
                    acc, vec = _reduce_rows(acc, vec, dz_ptr + i * W, hidden, m_idx, m_mask, x_ptr, D, col, n_mask,
                                            B, NEED_WX, False, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_R)
        if NEED_WX:
            tl.store(dwx_ptr + s * W * C + m_idx[:, None] * C + n_idx[None, :], acc.to(dwx_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])
        if NEED_B:
            if want_vec:
                tl.store(db_ptr + s * W + m_idx, vec.to(db_ptr.dtype.element_ty), mask=m_mask)
    elif pid < TASKS_A + TASKS_B:
        q = pid - TASKS_A
        s = q // (TILES_M * TILES_N_B)
        rem = q % (TILES_M * TILES_N_B)
        m_idx = (rem // TILES_N_B) * BLOCK_M + offs_m
        n_idx = (rem % TILES_N_B) * BLOCK_N + offs_n
        m_mask = m_idx < W
        n_mask = n_idx < W
        for i in range(1, L):
            if tl.load(slots_ptr + i) == s + 1:
                acc, vec = _reduce_rows(acc, vec, dz_ptr + i * W, hidden, m_idx, m_mask, h_ptr, hidden,
                                        (i - 1) * W + n_idx, n_mask, B, True, False, DOT_DTYPE, ACC_DTYPE, PRECISION,
                                        BLOCK_R)
        tl.store(dwh_ptr + s * W * W + m_idx[:, None] * W + n_idx[None, :], acc.to(dwh_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        # own names (o_*): the head tile is BLOCK_O x BLOCK_N, and names assigned in both branches of a runtime
        # if must keep one type
        q = pid - TASKS_A - TASKS_B
        o_idx = (q // TILES_N_C) * BLOCK_O + tl.arange(0, BLOCK_O)
        n_idx = (q % TILES_N_C) * BLOCK_N + offs_n
        o_mask = o_idx < OUT
        n_mask = n_idx < hidden
        want_vec = (q % TILES_N_C) == 0
        acc_o = tl.zeros((BLOCK_O, BLOCK_N), dtype=ACC_DTYPE)
        vec_o = tl.zeros((BLOCK_O,), dtype=ACC_DTYPE)
        if HAS_GY:
            if NEED_BO:
                if want_vec:
                    acc_o, vec_o = _reduce_rows(acc_o, vec_o, gy_ptr, OUT, o_idx, o_mask, h_ptr, hidden, n_idx, n_mask,
                                                B, NEED_WO, True, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_R)
                else:
                    acc_o, vec_o = _reduce_rows(acc_o, vec_o, gy_ptr, OUT, o_idx, o_mask, h_ptr, hidden, n_idx, n_mask,
                                                B, NEED_WO, False, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_R)
            else:
                acc_o, vec_o = _reduce_rows(acc_o, vec_o, gy_ptr, OUT, o_idx, o_mask, h_ptr, hidden, n_idx, n_mask, B,
                                            NEED_WO, False, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_R)
        if NEED_WO:
            tl.store(dwo_ptr + o_idx[:, None] * hidden + n_idx[None, :], acc_o.to(dwo_ptr.dtype.element_ty),
                     mask=o_mask[:, None] & n_mask[None, :])
        if NEED_BO:
            if want_vec:
                tl.store(dbo_ptr + o_idx, vec_o.to(dbo_ptr.dtype.element_ty), mask=o_mask)


@functools.cache
def _spinal_bwd_chain_kernel_tuned():
    """The chain kernel's ``triton.autotune`` wrapper, built on first use (as the forward's)."""
    return settings.autotuner("chain")(_spinal_bwd_chain_kernel)


def spinal_bwd_triton(
    grad_y: torch.Tensor | None,
    grad_H: torch.Tensor | None,
    x: torch.Tensor,
    H: torch.Tensor,
    weight_x: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    head_weight: torch.Tensor | None,
    starts: list[int],
    slots: list[int],
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the spinal layer in at most two Triton launches.

    Parameters follow the ``_spinal_backward`` op (``csrc/spinal_ops.cpp``): ``grad_y (B, out)?``,
    ``grad_H (B, L*w)?``, ``x (B, D)``, ``H (B, L*w)``, weights as in the forward, ``output_mask`` (6 bools:
    dx, dweight_x, dweight_h, dbias, dhead_weight, dhead_bias). Returns
    ``(dx, dweight_x, dweight_h, dbias, dhead_weight, dhead_bias)``; entries not asked for by ``output_mask`` are
    empty tensors.

    ``output_mask`` must be normalised by the caller (``spinal_ops/ops.py``): ``mask[3]`` false without ``bias``,
    ``mask[4]`` and ``mask[5]`` false without ``head_weight``; an inconsistent mask raises a ``ValueError``.
    Without ``head_weight`` a ``grad_y`` is ignored.
    """
    rows, in_features = x.shape
    num_layers = len(starts)
    lx, width, chunk = weight_x.shape
    lh = weight_h.shape[0]
    has_head = head_weight is not None
    out = head_weight.shape[0] if has_head else 0
    mask = tuple(bool(m) for m in output_mask)
    if len(mask) != 6 or (mask[3] and bias is None) or ((mask[4] or mask[5]) and not has_head):
        raise ValueError(
            f"spinal_ops triton backend: output_mask {list(mask)} is inconsistent with the arguments (bias "
            f"{'given' if bias is not None else 'None'}, head_weight {'given' if has_head else 'None'}): expected 6 "
            "entries, mask[3] False without bias, mask[4] and mask[5] False without head_weight"
        )
    dims = settings.Dims(rows, in_features, chunk, width, num_layers, out, lx, lh, mask)
    dims.check()
    if not has_head:
        grad_y = None
    # one fresh empty tensor per skipped gradient: op outputs must not alias each other
    dx = torch.empty_like(x) if mask[0] else x.new_empty(0)
    dwx = torch.empty_like(weight_x) if mask[1] else x.new_empty(0)
    dwh = torch.empty_like(weight_h) if mask[2] else x.new_empty(0)
    db = torch.empty_like(bias) if mask[3] else x.new_empty(0)
    dwo = torch.empty_like(head_weight) if mask[4] else x.new_empty(0)
    dbo = x.new_empty(out) if mask[5] else x.new_empty(0)

    need_dz = mask[0] or mask[1] or mask[2] or mask[3]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dz = torch.empty(rows, num_layers * width, dtype=acc_dtype, device=x.device) if need_dz else x
    starts_t, slots_t = layer_table(starts, slots, x.device)

    if need_dz and rows > 0:
        launch = settings.launch_settings("chain", dims, x.dtype, x.device)
        kernel = _spinal_bwd_chain_kernel_tuned() if launch.autotune else _spinal_bwd_chain_kernel
        with settings.launch_guard(x.device):
            settings.launcher(kernel)[launch.grid](
                grad_y if grad_y is not None else x, grad_H if grad_H is not None else x, x, H, weight_x, weight_h,
                bias if bias is not None else x, head_weight if has_head else x, starts_t, slots_t, dz,
                dx if mask[0] else dz, rows, in_features, chunk, width, num_layers, out, *launch.args,
                NEG_SLOPE=float(negative_slope), ACT=activation_code(activation), HAS_BIAS=bias is not None,
                HAS_GY=grad_y is not None, HAS_GH=grad_H is not None,
                NEED_Z=needs_preactivation(activation, negative_slope), NEED_DX=mask[0], **launch.meta,
            )

    if any(mask[1:]):
        launch = settings.launch_settings("weights", dims, x.dtype, x.device)
        if launch.grid[0] > 0:  # no task, e.g. only dweight_h with one sub-layer (an empty weight_h)
            with settings.launch_guard(x.device):
                settings.launcher(_spinal_bwd_weights_kernel)[launch.grid](
                    x, H, grad_y if grad_y is not None else x, dz if need_dz else x, starts_t, slots_t,
                    dwx if mask[1] else x, db if mask[3] else x, dwh if mask[2] else x, dwo if mask[4] else x,
                    dbo if mask[5] else x, rows, in_features, chunk, width, num_layers, out, *launch.args,
                    HAS_GY=grad_y is not None, NEED_WX=mask[1], NEED_B=mask[3], NEED_WH=mask[2], NEED_WO=mask[4],
                    NEED_BO=mask[5], **launch.meta,
                )
    return dx, dwx, dwh, db, dwo, dbo
