"""Device helpers shared by the forward and backward Triton kernels: activations, their derivatives, the
gathered (wrapping) input projection of one sub-layer for a tile of its output columns, the K-loop of a row tile
times a matrix read from global memory, and the pre-activation tile of one sub-layer with ``h_{i-1}`` read back
from ``H`` (the wide path's building blocks; the fast path uses the first and, in the backward, the last two with
whole-width tiles).

Activation codes are the positions in :data:`spinal_ops.reference.ACTIVATIONS`. The leaky_relu slope is a
constexpr (``NEG_SLOPE``): a Python float kernel argument is passed as float32, which would round the slope
in float64; as a constexpr literal it takes the tensor's dtype exactly. One compile per slope value (a model
hyper-parameter, fixed per model).
"""

from __future__ import annotations

import triton
import triton.language as tl

from spinal_ops import reference

ACT_RELU: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("relu"))
ACT_LEAKY: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("leaky_relu"))
ACT_TANH: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("tanh"))
ACT_SIGMOID: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("sigmoid"))
ACT_GELU: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("gelu"))
ACT_SILU: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("silu"))


def activation_code(name: str) -> int:
    """The constexpr code of an activation name (validated by the caller)."""
    return reference.ACTIVATIONS.index(name)


@triton.jit
def _mma(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b``, accumulated in ``acc``'s dtype: ``tl.dot`` on operands cast to ``DOT_DTYPE`` with
    ``input_precision=PRECISION``; with ``PRECISION == "fma"`` (float64 where Triton's ``tl.dot`` has no fp64:
    releases before 3.5) the products are summed by broadcast instead."""
    if PRECISION == "fma":
        return acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _tanh(z):
    # tl has no tanh that also runs under the interpreter; exp(-2|z|) never overflows.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _sigmoid(z):
    # Both branches are finite for any z (no exp of a large positive number).
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _activate(z, NEG_SLOPE: tl.constexpr, ACT: tl.constexpr):
    """act(z), elementwise, in z's dtype (the accumulation dtype)."""
    if ACT == ACT_RELU:
        h = tl.where(z > 0, z, 0.0)
    elif ACT == ACT_LEAKY:
        h = tl.where(z > 0, z, z * NEG_SLOPE)
    elif ACT == ACT_TANH:
        h = _tanh(z)
    elif ACT == ACT_SIGMOID:
        h = _sigmoid(z)
    elif ACT == ACT_GELU:
        h = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == ACT_SILU:
        h = z * _sigmoid(z)
    else:  # identity
        h = z
    return h.to(z.dtype)


@triton.jit
def _act_grad_from_h(h, NEG_SLOPE: tl.constexpr, ACT: tl.constexpr):
    """act'(Z) from h = act(Z): relu, leaky_relu (slope >= 0), tanh, sigmoid, identity.

    At Z = 0 this matches PyTorch: relu' = 0, leaky_relu' = slope.
    """
    zero = tl.zeros(h.shape, h.dtype)  # literals added to it take h's dtype exactly (slope in float64 too)
    if ACT == ACT_RELU:
        d = tl.where(h > 0, zero + 1.0, zero)
    elif ACT == ACT_LEAKY:
        d = tl.where(h > 0, zero + 1.0, zero + NEG_SLOPE)
    elif ACT == ACT_TANH:
        d = 1.0 - h * h
    elif ACT == ACT_SIGMOID:
        d = h * (1.0 - h)
    else:
        d = zero + 1.0
    return d.to(h.dtype)


@triton.jit
def _act_grad_from_z(z, NEG_SLOPE: tl.constexpr, ACT: tl.constexpr):
    """act'(Z) from the recomputed pre-activation: gelu (exact erf), silu, leaky_relu with any slope."""
    zero = tl.zeros(z.shape, z.dtype)
    if ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        d = cdf + z * pdf
    elif ACT == ACT_SILU:
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == ACT_LEAKY:
        d = tl.where(z > 0, zero + 1.0, zero + NEG_SLOPE)
    else:
        d = tl.where(z > 0, zero + 1.0, zero)
    return d.to(z.dtype)


@triton.jit
def _input_projection(
    acc,  # (BLOCK_B, BLOCK_N) accumulator, ACC dtype
    x_ptr,  # (B, D) contiguous
    wx_slot_ptr,  # (W, C) contiguous: weight_x[slots[i]]
    start,  # first column of the chunk; column of j is (start + j) mod D
    rows64,  # (BLOCK_B,) int64 row indices
    row_mask,  # (BLOCK_B,)
    cols_n,  # (BLOCK_N,) output-feature indices of the tile (the whole padded width on the fast path)
    n_mask,  # (BLOCK_N,) cols_n < W
    D,
    C,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """acc += x[rows, (start + j) mod D] @ weight_x[slot][cols_n, :].T, stepping j by BLOCK_C."""
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        j = c0 + offs_c
        j_mask = j < C
        col = start + j
        col = tl.where(col >= D, col - D, col)  # start < D and j < C <= D: one wrap at most
        xt = tl.load(x_ptr + rows64[:, None] * D + col[None, :], mask=row_mask[:, None] & j_mask[None, :], other=0.0)
        # wt[j, n] = weight_x[slot][n, j]
        wt = tl.load(wx_slot_ptr + cols_n[None, :] * C + j[:, None], mask=j_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(xt, wt, acc, DOT_DTYPE, PRECISION)
    return acc


@triton.jit
def _dot_k_loop(
    acc,  # (BLOCK_B, BLOCK_N) accumulator, ACC dtype
    a_ptr,  # left operand: a[r, k] at a_ptr + r * a_stride + k (a row tile of H, dZ or grad_y)
    a_stride,
    rows64,  # (BLOCK_B,) int64 row indices
    row_mask,  # (BLOCK_B,)
    K,  # reduction extent: k < K
    b_ptr,  # right operand: b[k, n] at b_ptr + k * b_stride_k + n_off[n] (a weight matrix, either orientation)
    b_stride_k,
    n_off,  # (BLOCK_N,) element offset of each output column in b
    n_mask,  # (BLOCK_N,)
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += a[rows, 0:K] @ b[0:K, n], stepping k by BLOCK_K; padded rows, k and n are masked to zero.

    The left operand is read from global memory: on the wide path a tile this program stored earlier (H, dZ),
    which the kernels make visible to all of the program's threads with ``tl.debug_barrier()`` before reading.
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(
            a_ptr + rows64[:, None] * a_stride + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        b = tl.load(b_ptr + k[:, None] * b_stride_k + n_off[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, DOT_DTYPE, PRECISION)
    return acc


@triton.jit
def _preactivation_tile(
    x_ptr,  # (B, D)
    wx_slot_ptr,  # (W, C): weight_x[slots[i]]
    start,  # first column of chunk i
    h_prev_ptr,  # H + (i - 1) * W: h_{i-1}[r, k] at h_prev_ptr + r * HIDDEN + k (read only when i > 0)
    wh_slot_ptr,  # (W, W): weight_h[slots[i] - 1] (read only when i > 0)
    b_slot_ptr,  # (W,): bias[slots[i]] (read only when HAS_BIAS)
    i,  # sub-layer index
    rows64,
    row_mask,
    cols_n,  # (BLOCK_N,) output-feature indices of the tile
    n_mask,
    D,
    C,
    W,
    HIDDEN,  # L * W, the row stride of H
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Z_i[rows, cols_n] = x[rows, idx_i] @ Wx.T + h_{i-1} @ Wh.T (i > 0) + b, in the ACC dtype.

    h_{i-1} is read back from H (storage dtype: exactly the values sub-layer i used in the forward) in
    K-steps of BLOCK_K columns, so any width works; with BLOCK_N = BLOCK_K >= W it is one tile and one step.
    """
    z = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
    z = _input_projection(
        z, x_ptr, wx_slot_ptr, start, rows64, row_mask, cols_n, n_mask, D, C, DOT_DTYPE, PRECISION, BLOCK_C
    )
    if i > 0:
        wh_off = cols_n * W  # b[k, n] = weight_h[slot][n, k]
        z = _dot_k_loop(
            z, h_prev_ptr, HIDDEN, rows64, row_mask, W, wh_slot_ptr, 1, wh_off, n_mask, DOT_DTYPE, PRECISION, BLOCK_K
        )
    if HAS_BIAS:
        bias = tl.load(b_slot_ptr + cols_n, mask=n_mask, other=0.0).to(ACC_DTYPE)
        z = z + bias[None, :]
    return z
