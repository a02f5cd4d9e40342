"""The CUDA kernel sources of csrc/cuda, executed on the CPU under the SIMT emulator (csrc/cuda/simt.h).

Every kernel variant (dtype, activation, fast and general width path, tensor-core and FMA paths, shared
weights, head and hidden, both split modes, wrap-around chunks) is compared with ``reference.py``, forward
and every gradient, under the forward, reverse and random thread schedules of the emulator. Launch counts
come from the emulator; planted bugs prove that it catches a missing ``__syncthreads`` and an early return.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys

import pytest
import torch
from helpers import CASES, Case, assert_close, make_inputs
from original import TiedRegressionSpinal, packed_grads
from torch.overrides import TorchFunctionMode

from spinal_ops import SpinalLinear, reference

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_emulated"))
import build  # noqa: E402  (tests/cuda_emulated/build.py)

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(not build.cuda_headers_available(), reason="the CUDA toolkit headers are not installed"),
]

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
PATHS = {"auto": 0, "fast": 1, "general": 2}
PARAM_NAMES = ("weight_x", "weight_h", "bias", "head_weight", "head_bias")
GRAD_NAMES = ("x", "weight_x", "weight_h", "bias", "head_weight", "head_bias")
DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class Variant:
    """One kernel instantiation to exercise: a case, a dtype, a width path and the tf32 switch."""

    def __init__(self, case: Case, dtype: torch.dtype, path: str = "auto", tf32: bool = False):
        self.case, self.dtype, self.path, self.tf32 = case, dtype, path, tf32

    @property
    def id(self) -> str:
        return f"{self.case.id}-{DTYPE_NAMES[self.dtype]}{'-tf32' if self.tf32 else ''}-{self.path}"


_wrap, _alternate, _empty, _b257, _k8, _l1, _shared, _gelu, _silu, _identity, _tied = CASES

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
    # Several 32-deep staging rounds (c = 38, w = 40) and two column tiles (w = 70) on tensor cores.
    Variant(Case(9, 75, 2, 40, 3, out=9, activation="silu"), torch.float16, "fast"),
    Variant(Case(6, 50, 3, 70, 2, out=20, shared=True), torch.bfloat16),
    Variant(_k8.replace(rows=3), torch.float32, "fast", tf32=True),
    Variant(Case(5, 23, 2, 66, 2, out=5, activation="gelu"), torch.float32, "general", tf32=True),
]


@pytest.fixture(scope="module")
def emu():
    return build.load()


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to tf32 as the tensor cores do (nearest, ties away from zero)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


class _Tf32Matmul(TorchFunctionMode):
    """Runs the reference with every matmul operand rounded to tf32: the reference "in the kernel's precision"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.mm):
            args = tuple(
                _round_tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args
            )
        return func(*args, **(kwargs or {}))


def _inputs(case: Case, dtype: torch.dtype):
    x, params = make_inputs(case, dtype)
    x = x.detach().reshape(-1, case.in_features).contiguous()
    params = {k: (v.detach() if v is not None else None) for k, v in params.items()}
    starts = reference.split_starts(case.in_features, case.num_splits, case.num_layers, case.split_mode)
    return x, params, starts


def _hyper(case: Case, starts):
    return (starts, list(case.slots), case.activation, case.negative_slope)


def _reference(case, x, params, starts, dtype, cotangents, tf32=False):
    """Reference (H, y) and the six gradients for given cotangents of (H, y), computed in ``dtype``."""
    leaves = [x.to(dtype).requires_grad_()] + [
        p.to(dtype).requires_grad_() if p is not None else None for p in (params[k] for k in PARAM_NAMES)
    ]
    with _Tf32Matmul() if tf32 else contextlib.nullcontext():
        H, y = reference.spinal_forward(*leaves, *_hyper(case, starts))
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


def _cotangents(case: Case, x, params, dtype):
    g = torch.Generator().manual_seed(7)
    rows, hidden = x.shape[0], case.num_layers * case.width
    grad_h = (torch.rand(rows, hidden, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    if not case.head:
        return grad_h, None
    grad_y = (torch.rand(rows, case.out, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    # Head mode: the gradient usually reaches H only through y; give H its own gradient on every second
    # case so both inputs of the backward are exercised.
    return (grad_h if case.num_layers % 2 == 0 else None), grad_y


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_forward_and_gradients_match_reference(emu, variant: Variant, schedule: str):
    case, dtype = variant.case, variant.dtype
    what = f"cuda (emulated, {schedule} schedule) {variant.id}"
    x, params, starts = _inputs(case, dtype)
    emu.set_schedule(SCHEDULES[schedule], 1234)
    args = [params[k] for k in PARAM_NAMES]
    H, y = emu.forward(x, *args, *_hyper(case, starts), PATHS[variant.path], variant.tf32)

    grad_h, grad_y = _cotangents(case, x, params, dtype)
    H_hi, y_hi, grads_hi = _reference(case, x, params, starts, torch.float64, (grad_h, grad_y))
    H_lo, y_lo, grads_lo = _reference(case, x, params, starts, dtype, (grad_h, grad_y), tf32=variant.tf32)
    assert_close(H, H_hi, H_lo, what=f"{what}: H")
    if case.head:
        assert_close(y, y_hi, y_lo, what=f"{what}: y")
    else:
        assert y.shape == (x.shape[0], 0), f"{what}: hidden mode must return an empty y, got {tuple(y.shape)}"
    if variant.tf32:
        return  # the backward has no tf32 variant; fp32 backward is covered by the other fp32 variants

    mask = [True, True, True, params["bias"] is not None, case.head, case.head and params["head_bias"] is not None]
    grads = emu.backward(grad_y, grad_h, x, H_lo, params["weight_x"], params["weight_h"], params["bias"],
                         params["head_weight"], *_hyper(case, starts), mask)
    # The backward is fed H of the reference in the kernel's dtype, so its error is its own.
    for name, wanted, got, hi, lo in zip(GRAD_NAMES, mask, grads, grads_hi, grads_lo, strict=True):
        if wanted:
            assert_close(got, hi, lo, what=f"{what}: d{name}")
        else:
            assert got.numel() == 0, f"{what}: d{name} was not asked for but has shape {tuple(got.shape)}"


@pytest.mark.parametrize("mask", [(True, False, False, False, False, False), (False, True, True, True, False, False),
                                  (False, False, False, False, True, True)], ids=["dx", "input-weights", "head"])
def test_backward_honours_output_mask_and_counts_launches(emu, mask):
    case = _wrap
    x, params, starts = _inputs(case, torch.float64)
    grad_y = torch.rand(x.shape[0], case.out, dtype=torch.float64)
    emu.set_schedule(0, 0)
    before = emu.launch_count()
    H, _ = emu.forward(x, *[params[k] for k in PARAM_NAMES], *_hyper(case, starts), 0, False)
    assert emu.launch_count() - before == 1, f"cuda (emulated) {case.id}: forward must be one launch"
    before = emu.launch_count()
    grads = emu.backward(grad_y, None, x, H, params["weight_x"], params["weight_h"], params["bias"],
                         params["head_weight"], *_hyper(case, starts), list(mask))
    launches = emu.launch_count() - before
    expected = int(mask[0] or mask[1] or mask[2] or mask[3]) + int(any(mask[1:]))
    assert launches == expected, f"cuda (emulated) {case.id} mask {mask}: {launches} launches, expected {expected}"
    _, _, ref = _reference(case, x, params, starts, torch.float64, (None, grad_y))
    for name, wanted, got, hi in zip(GRAD_NAMES, mask, grads, ref, strict=True):
        if wanted:
            assert_close(got, hi, what=f"cuda (emulated) {case.id}: d{name} with mask {mask}")
        else:
            assert got.numel() == 0, f"cuda (emulated) {case.id}: d{name} not asked for, got {tuple(got.shape)}"


@pytest.mark.parametrize("variant", [Variant(_wrap, torch.float32), Variant(_gelu.replace(rows=40), torch.float16)],
                         ids=lambda v: v.id)
def test_launch_counts_full_backward(emu, variant):
    case = variant.case
    x, params, starts = _inputs(case, variant.dtype)
    before = emu.launch_count()
    H, _ = emu.forward(x, *[params[k] for k in PARAM_NAMES], *_hyper(case, starts), 0, False)
    assert emu.launch_count() - before == 1, f"cuda (emulated) {variant.id}: forward launches"
    grad_h, grad_y = _cotangents(case, x, params, variant.dtype)
    before = emu.launch_count()
    emu.backward(grad_y, grad_h, x, H, params["weight_x"], params["weight_h"], params["bias"], params["head_weight"],
                 *_hyper(case, starts), [True] * 6)
    launches = emu.launch_count() - before
    assert 1 <= launches <= 2, f"cuda (emulated) {variant.id}: backward took {launches} launches (at most 2)"


def test_empty_batch_gives_zero_weight_gradients(emu):
    case = _empty
    x, params, starts = _inputs(case, torch.float32)
    before = emu.launch_count()
    H, y = emu.forward(x, *[params[k] for k in PARAM_NAMES], *_hyper(case, starts), 0, False)
    assert emu.launch_count() == before, f"cuda (emulated) {case.id}: an empty batch launches nothing"
    assert H.shape == (0, case.num_layers * case.width) and y.shape == (0, case.out), f"{case.id}: output shapes"
    grads = emu.backward(torch.zeros(0, case.out), None, x, H, params["weight_x"], params["weight_h"], params["bias"],
                         params["head_weight"], *_hyper(case, starts), [True] * 6)
    for name, got, like in zip(GRAD_NAMES, grads, [x, *[params[k] for k in PARAM_NAMES]], strict=True):
        assert got.shape == like.shape, f"cuda (emulated) {case.id}: d{name} shape {tuple(got.shape)}"
        assert not got.any(), f"cuda (emulated) {case.id}: d{name} must be zero for an empty batch"


def test_bad_arguments_use_the_shared_checks(emu):
    case = _wrap
    x, params, starts = _inputs(case, torch.float32)
    with pytest.raises(RuntimeError, match="weight_h must have shape"):
        emu.forward(x, params["weight_x"], params["weight_h"][:, :1], params["bias"], params["head_weight"],
                    params["head_bias"], *_hyper(case, starts), 0, False)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        emu.forward(x, *[params[k] for k in PARAM_NAMES], starts, list(case.slots), "swish", 0.01, 0, False)


def test_2_31_rows_are_refused_naming_the_limit_and_the_fallback(emu):
    """Rows are 32-bit indices in the kernels: 2^31 rows are refused before any launch. x (one column) is address
    space that is never touched."""
    try:
        x = torch.empty(2**31, 1)
    except RuntimeError as exc:  # e.g. vm.overcommit_memory = 2
        pytest.skip(f"cannot reserve 8 GiB of address space: {exc}")
    wx, wh, b = torch.zeros(1, 2, 1), torch.zeros(0, 2, 2), torch.zeros(1, 2)
    before = emu.launch_count()
    match = r"cuda backend: the number of rows of x \(B\) must be at most 2\^31 - 1.*got 2147483648.*reference"
    with pytest.raises((ValueError, RuntimeError), match=match):
        emu.forward(x, wx, wh, b, None, None, [0], [0], "relu", 0.01, 0, False)
    assert emu.launch_count() == before, "cuda (emulated): a refused call must launch nothing"


def test_tied_regression_original_matches(emu):
    """The original regression net (fc1, fc2, fc3, fc4, fc3, fc4) through the emulated kernels: the weight gradients
    of its tied modules add up over the sub-layers that use them."""
    torch.manual_seed(5)
    orig = TiedRegressionSpinal(4, 50, 1).double()
    layers, head = orig.linears()
    port = SpinalLinear.from_linears(8, layers, head, split_mode="alternate", activation="leaky_relu")
    x = torch.randn(19, 8, dtype=torch.float64)
    xo = x.clone().requires_grad_()
    y = orig(xo)
    cot = torch.randn_like(y)
    y.backward(cot)
    params = [getattr(port, k).detach() for k in PARAM_NAMES]
    hyper = (port._starts, port._slots, "leaky_relu", 0.01)
    H, y_emu = emu.forward(x, *params, *hyper, 0, False)
    assert_close(y_emu, y.detach(), what="cuda (emulated) tied regression: output")
    grads = emu.backward(cot, None, x, H, *params[:4], *hyper, [True] * 6)
    expected = {"x": xo.grad, **packed_grads(layers, head, port.chunk)}
    for name, got in zip(GRAD_NAMES, grads, strict=True):
        what = f"cuda (emulated) tied regression: d{name}"
        assert_close(got, expected[name], what=what)


# ------------------------------------------------------------------------------------------- planted bugs


def test_emulator_catches_a_missing_syncthreads(emu):
    values = torch.arange(256, dtype=torch.float32) % 7
    expected = values.reshape(2, 128).sum(1)
    results = {}
    for name, code in SCHEDULES.items():
        emu.set_schedule(code, 99)
        good = emu.planted_block_sum(False, values)
        assert torch.equal(good, expected), f"emulator: correct block sum wrong under the {name} schedule: {good}"
        results[name] = emu.planted_block_sum(True, values)
    wrong = [name for name, got in results.items() if not torch.equal(got, expected)]
    assert wrong, f"emulator: a missing __syncthreads went unnoticed under every schedule: {results}"


def test_emulator_catches_an_early_return_before_a_barrier(emu):
    emu.set_schedule(0, 0)
    full = emu.planted_early_return(128)
    assert torch.equal(full, (torch.arange(128) + 1).remainder(128).float()), "emulator: planted kernel without bug"
    with pytest.raises(RuntimeError, match="different numbers of __syncthreads"):
        emu.planted_early_return(64)
