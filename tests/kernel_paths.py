"""The kernel paths of the CUDA backend: one list, run by the emulated tests (tests/test_cuda_emulated.py, on the
CPU under the SIMT emulator) and by the GPU tests (tests/test_cuda_gpu.py, natively), so no path is tested in one
and not in the other; and the one check both run per path (:func:`check_variant`).

A path is a kernel instantiation and launch shape: dtype (FMA for fp64 / fp32, wmma tensor cores for fp16 / bf16,
tf32 on or off for fp32), width path (fast w <= 64, general), the head accumulator on chip or in the global
workspace (fp32 out > 256, fp64 out > 128), the forward's dynamic shared memory above 48 KB (fp64 fast path with
56 < out <= 128), wrapping chunks, shared and tied weights, hidden mode, B in {0, 1, 17, 4097}.
"""

from __future__ import annotations

import contextlib

import torch
from helpers import CASES, DTYPE_NAMES, Case, assert_close, make_inputs
from torch.overrides import TorchFunctionMode

from spinal_ops import reference

PATHS = {"auto": 0, "fast": 1, "general": 2}
PARAM_NAMES = ("weight_x", "weight_h", "bias", "head_weight", "head_bias")
GRAD_NAMES = ("x", "weight_x", "weight_h", "bias", "head_weight", "head_bias")


class Variant:
    """One kernel instantiation to exercise: a case, a dtype, a width path and the tf32 switch."""

    def __init__(self, case: Case, dtype: torch.dtype, path: str = "auto", tf32: bool = False):
        self.case, self.dtype, self.path, self.tf32 = case, dtype, path, tf32

    @property
    def id(self) -> str:
        return f"{self.case.id}-{DTYPE_NAMES[self.dtype]}{'-tf32' if self.tf32 else ''}-{self.path}"


_wrap, _alternate, _empty, _b257, _k8, _l1, _shared, _gelu, _silu, _identity, _tied = (
    CASES[n] for n in ("wrap", "alternate", "empty", "b257", "k8", "l1", "shared", "gelu-hidden", "silu-transposed",
                       "identity-3d", "tied"))

VARIANTS = [
    # FMA path, fp64 / fp32, every activation, both width paths.
    Variant(_wrap, torch.float64, "fast"),
    Variant(_wrap, torch.float64, "general"),
    Variant(_alternate, torch.float32),
    Variant(_b257.replace(rows=37), torch.float32, "fast"),
    Variant(_k8, torch.float64),
    Variant(_k8.replace(negative_slope=-0.3), torch.float64),  # act' needs Z: recomputed
    Variant(_l1, torch.float32, "general"),
    Variant(_shared, torch.float64),
    Variant(_shared.replace(head=False, activation="leaky_relu"), torch.float32, "general"),
    Variant(_tied, torch.float64),  # tied slots: the weight gradients sum over the sub-layers of each slot
    Variant(_tied.replace(rows=21, head=False), torch.float32, "general"),
    Variant(_gelu, torch.float64),
    Variant(_gelu, torch.float64, "general"),
    Variant(_silu.replace(layout="contiguous"), torch.float32),
    Variant(_identity.replace(layout="contiguous"), torch.float32, "general"),
    # Wider than one 64-column tile (general path only), head wider than one tile, head accumulator in a
    # global workspace (16 rows x 130 outputs x 8 bytes > 16 KB of shared memory).
    Variant(Case(19, 41, 3, 70, 3, out=67, activation="silu"), torch.float64),
    Variant(Case(18, 9, 2, 3, 3, out=130, split_mode="alternate", shared=True), torch.float64, "general"),
    # Tensor cores (wmma): fp16 / bf16 operands, fp32 accumulation; fp32 on tf32 when allowed.
    Variant(_wrap, torch.float16, "fast"),
    Variant(_wrap.replace(activation="sigmoid"), torch.float16, "general"),
    Variant(_gelu, torch.bfloat16),
    Variant(_shared.replace(activation="tanh", split_mode="alternate"), torch.bfloat16, "general"),
    # Several staging rounds on tensor cores (128-deep for 16-bit operands: c = 150 is a full and a partial round,
    # and so is w = 140) and three column tiles (w = 140).
    Variant(Case(9, 300, 2, 40, 3, out=9, activation="silu"), torch.float16, "fast"),
    Variant(Case(6, 50, 3, 140, 2, out=20, shared=True), torch.bfloat16),
    Variant(_k8.replace(rows=3), torch.float32, "fast", tf32=True),
    Variant(Case(5, 23, 2, 66, 2, out=5, activation="gelu"), torch.float32, "general", tf32=True),
    # Batch sizes: empty, one row, a partial row tile, 257 row tiles with a partial last one.
    Variant(_empty, torch.float32),
    Variant(_wrap.replace(rows=17), torch.float16),
    Variant(Case(4097, 9, 2, 4, 2, out=3), torch.float32, "fast"),
    # Weight gradients over more than 128 rows: reduced in pieces of 128 rows and summed in piece order (a partial
    # last piece), with tied slots, on tensor cores.
    Variant(_tied.replace(rows=150), torch.bfloat16),
    # fp64 fast path with 56 < out <= 128: 41 KB fixed + 16 x 100 x 8 B of head accumulator = 53.8 KB of dynamic
    # shared memory, past the 48 KB default (the launch sets the opt-in attribute).
    Variant(Case(18, 13, 3, 5, 3, out=100), torch.float64, "fast"),
    # fp32 head accumulator in the global workspace: 16 x 300 x 4 B > 16 KB.
    Variant(Case(7, 13, 3, 5, 3, out=300, activation="tanh"), torch.float32),
]


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to tf32 as the tensor cores do (nearest, ties away from zero)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


class Tf32Matmul(TorchFunctionMode):
    """Runs the reference with every matmul operand rounded to tf32: the reference "in the kernel's precision"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.mm):
            args = tuple(
                round_tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args
            )
        return func(*args, **(kwargs or {}))


def inputs(case: Case, dtype: torch.dtype):
    x, params = make_inputs(case, dtype)
    x = x.detach().reshape(-1, case.in_features).contiguous()
    params = {k: (v.detach() if v is not None else None) for k, v in params.items()}
    starts = reference.split_starts(case.in_features, case.num_splits, case.num_layers, case.split_mode)
    return x, params, starts


def hyper(case: Case, starts):
    return (starts, list(case.slots), case.activation, case.negative_slope)


def reference_grads(case, x, params, starts, dtype, cotangents, tf32=False):
    """Reference (H, y) and the six gradients for given cotangents of (H, y), computed in ``dtype``."""
    leaves = [x.to(dtype).requires_grad_()] + [
        p.to(dtype).requires_grad_() if p is not None else None for p in (params[k] for k in PARAM_NAMES)
    ]
    with Tf32Matmul() if tf32 else contextlib.nullcontext():
        H, y = reference.spinal_forward(*leaves, *hyper(case, starts))
    outs, cots = [], []
    for out, cot in zip((H, y), cotangents, strict=True):
        if cot is not None and out.numel():
            outs.append(out)
            cots.append(cot.to(dtype))
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, used, cots, allow_unused=True) if outs else [None] * len(used)
    it = iter(grads)
    full = [next(it) if t is not None else None for t in leaves]
    full = [g if g is not None or t is None else torch.zeros_like(t) for g, t in zip(full, leaves, strict=True)]
    return H.detach(), y.detach(), full


def cotangents(case: Case, x, params, dtype):
    g = torch.Generator().manual_seed(7)
    rows, hidden = x.shape[0], case.num_layers * case.width
    grad_h = (torch.rand(rows, hidden, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    if not case.head:
        return grad_h, None
    grad_y = (torch.rand(rows, case.out, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    # Head mode: the gradient usually reaches H only through y; give H its own gradient on every second
    # case so both inputs of the backward are exercised.
    return (grad_h if case.num_layers % 2 == 0 else None), grad_y




def check_variant(forward, backward, variant: Variant, what: str) -> None:
    """Forward and (without tf32) every gradient of one path against the reference, with the tolerance rule.

    ``forward(x, weight_x, weight_h, bias, head_weight, head_bias, starts, slots, activation, negative_slope,
    width_path, allow_tf32) -> (H, y)`` and ``backward(grad_y, grad_H, x, H, weight_x, weight_h, bias, head_weight,
    starts, slots, activation, negative_slope, output_mask) -> six gradients`` run the kernels (CPU tensors in,
    CPU tensors out).
    """
    case, dtype = variant.case, variant.dtype
    x, params, starts = inputs(case, dtype)
    args = [params[k] for k in PARAM_NAMES]
    H, y = forward(x, *args, *hyper(case, starts), PATHS[variant.path], variant.tf32)
    grad_h, grad_y = cotangents(case, x, params, dtype)
    H_hi, y_hi, grads_hi = reference_grads(case, x, params, starts, torch.float64, (grad_h, grad_y))
    H_lo, y_lo, grads_lo = reference_grads(case, x, params, starts, dtype, (grad_h, grad_y), tf32=variant.tf32)
    assert_close(H, H_hi, H_lo, what=f"{what}: H")
    if case.head:
        assert_close(y, y_hi, y_lo, what=f"{what}: y")
    else:
        assert y.shape == (x.shape[0], 0), f"{what}: hidden mode must return an empty y, got {tuple(y.shape)}"
    if variant.tf32:
        return  # the backward has no tf32 variant; fp32 backward is covered by the other fp32 variants
    mask = [True, True, True, params["bias"] is not None, case.head, case.head and params["head_bias"] is not None]
    grads = backward(grad_y, grad_h, x, H_lo, params["weight_x"], params["weight_h"], params["bias"],
                     params["head_weight"], *hyper(case, starts), mask)
    # The backward is fed H of the reference in the kernel's dtype, so its error is its own.
    for name, wanted, got, hi, lo in zip(GRAD_NAMES, mask, grads, grads_hi, grads_lo, strict=True):
        if wanted:
            assert_close(got, hi, lo, what=f"{what}: d{name}")
        else:
            assert got.numel() == 0, f"{what}: d{name} was not asked for but has shape {tuple(got.shape)}"


def _cuda(t):
    return t.to("cuda") if isinstance(t, torch.Tensor) else t


def gpu_forward(*args):
    """:func:`check_variant`'s forward on the GPU: the CUDA forward with its launch options forced."""
    h_all, y = torch.ops.spinal_ops._spinal_forward_cuda_options(*[_cuda(a) for a in args])
    return h_all.cpu(), y.cpu()


def gpu_backward(*args):
    """:func:`check_variant`'s backward on the GPU: the CUDA backward op."""
    return tuple(g.cpu() for g in torch.ops.spinal_ops._spinal_backward(*[_cuda(a) for a in args]))
