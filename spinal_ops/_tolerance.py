"""The one tolerance rule for comparing a kernel with the float64 reference (the tests and ``python -m spinal_ops
check`` both use it).

Rule (flash-attention's): a kernel's max-abs error against the float64 reference may be at most twice the error of
the reference computed in the kernel's own dtype, plus a floor per dtype relative to the largest magnitude of the
expected tensor:

    max|actual - expected| <= 2 * max|same - expected| + FLOOR[dtype] * max|expected|

In float64 the reference-in-dtype *is* the float64 reference, so the floor alone applies: agreement to rounding.
"""

from __future__ import annotations

import torch

# Floors, relative to max |expected|, one per dtype.
FLOOR = {
    torch.float64: 1e-12,  # sums of <= ~1e4 products: rounding is ~1e-13 relative
    torch.float32: 1e-5,  # a different summation order than the reference in float32, ~1e-6 seen
    torch.float16: 2e-3,  # one half-precision ulp at the output scale is ~1e-3
    torch.bfloat16: 1.6e-2,  # one bfloat16 ulp is 2^-7 ~ 7.8e-3; allow two
}


def tolerance(expected_hi: torch.Tensor, expected_same: torch.Tensor | None, dtype: torch.dtype) -> float:
    """The allowed max-abs error: ``2 * max|expected_same - expected_hi| + FLOOR[dtype] * max|expected_hi|``.

    ``expected_hi`` is the float64 reference, ``expected_same`` the reference computed in ``dtype`` (None: the
    float64 reference itself, which gives the floor alone).
    """
    if expected_hi.numel() == 0:
        return 0.0
    hi = expected_hi.detach().double()
    scale = hi.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max().item()
    base = 0.0
    if expected_same is not None:
        base = (expected_same.detach().double() - hi).abs().nan_to_num(0.0).max().item()
    return 2 * base + FLOOR[dtype] * scale


def max_error(actual: torch.Tensor, expected_hi: torch.Tensor) -> float:
    """``max|actual - expected_hi|`` in float64; equal values (NaN in both, or the same infinity) count as no error,
    a NaN in one of them as an infinite one."""
    if actual.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected_hi.detach().double()
    agree = (a == e) | (torch.isnan(a) & torch.isnan(e))
    err = torch.where(agree, torch.zeros_like(a), (a - e).abs())
    return err.nan_to_num(nan=float("inf")).max().item()


# Keyword arguments of torch.autograd.gradcheck and gradgradcheck (float64 inputs). A central difference with step
# eps = 1e-6 is off by ~eps^2 * |f'''| (truncation) plus ~1e-16 * |f| / eps (rounding), ~1e-10 here, and a
# backend's own float64 rounding moves f by ~1e-16 relative, ~1e-10 after the division by eps: atol = 1e-7 and
# rtol = 1e-5 leave a margin of ~1000 over both (the cpu backend's gradgradcheck passes down to atol = 1e-9,
# rtol = 1e-7) and still catch any gradient that is wrong beyond rounding. One set for both checks: the second
# derivatives are differenced from float64 first derivatives exactly as the first from the outputs.
GRADCHECK = dict(eps=1e-6, atol=1e-7, rtol=1e-5)
