"""Device helpers shared by the forward and backward Triton kernels: activations, their derivatives, and the
gathered (wrapping) input projection of one sub-layer.

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
ACT_IDENTITY: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("identity"))
ACT_GELU: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("gelu"))
ACT_SILU: tl.constexpr = tl.constexpr(reference.ACTIVATIONS.index("silu"))


def activation_code(name: str) -> int:
    """The constexpr code of an activation name (validated by the caller)."""
    return reference.ACTIVATIONS.index(name)


def needs_preactivation(activation: str, negative_slope: float) -> bool:
    """True when act'(Z) cannot be read off h = act(Z): gelu, silu, leaky_relu with a negative slope."""
    return activation in ("gelu", "silu") or (activation == "leaky_relu" and negative_slope < 0.0)


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
    else:
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
    acc,  # (BLOCK_B, BLOCK_W) accumulator, ACC dtype
    x_ptr,  # (B, D) contiguous
    wx_slot_ptr,  # (W, C) contiguous: weight_x[x_slot(i)]
    start,  # first column of the chunk; column of j is (start + j) mod D
    rows64,  # (BLOCK_B,) int64 row indices
    row_mask,  # (BLOCK_B,)
    cols_w,  # (BLOCK_W,) output-feature indices
    w_mask,  # (BLOCK_W,)
    D,
    C,
    W,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """acc += x[rows, (start + j) mod D] @ weight_x[slot].T, stepping j by BLOCK_C."""
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        j = c0 + offs_c
        j_mask = j < C
        col = start + j
        col = tl.where(col >= D, col - D, col)  # start < D and j < C <= D: one wrap at most
        xt = tl.load(x_ptr + rows64[:, None] * D + col[None, :], mask=row_mask[:, None] & j_mask[None, :], other=0.0)
        # wt[j, n] = weight_x[slot][n, j]
        wt = tl.load(wx_slot_ptr + cols_w[None, :] * C + j[:, None], mask=j_mask[:, None] & w_mask[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc
