"""The `triton` backend against the reference: outputs, every gradient, gradcheck, launch counts, original-style
modules.

Runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before pytest starts)
or on CUDA tensors on a GPU. Skipped when Triton is not installed, or when neither is available: the import of
this module checks only the environment and the installed packages; the GPU check (``torch.cuda.is_available()``)
is a string condition that pytest evaluates when the test is set up, never at import.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from helpers import CASES, Case, assert_close, functional_kwargs, make_inputs, run_and_grad
from original import CustomizableSpinal, packed_grads

import spinal_ops
from spinal_ops import SpinalLinear

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
_HAS_TRITON = importlib.util.find_spec("triton") is not None

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _HAS_TRITON, reason="Triton is not installed"),
    pytest.mark.skipif("not INTERPRETED and not torch.cuda.is_available()",
                       reason="Triton needs a GPU, or TRITON_INTERPRET=1 (set before import) for CPU tensors"),
]
if not INTERPRETED:
    pytestmark.append(pytest.mark.cuda)

# bfloat16 runs in the interpreter too: the kernels upcast its tl.dot operands to float32 there.
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
EXTRA_CASES = [
    # leaky_relu with a negative slope: act' needs the recomputed Z (not readable from h)
    Case(7, 13, 3, 5, 4, activation="leaky_relu", negative_slope=-0.3),
    # shared weights in hidden mode without bias, alternate split
    Case(9, 16, 4, 6, 5, split_mode="alternate", shared=True, bias=False, head=False, activation="silu"),
]
ALL_CASES = CASES + EXTRA_CASES


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run(backend: str, case: Case, dtype: torch.dtype):
    x, params = make_inputs(case, dtype, device=DEVICE)
    with spinal_ops.use_backend(backend):
        return run_and_grad(lambda x_, **p: spinal_ops.spinal_linear(x_, **p, **functional_kwargs(case)), x, params)


def _check_grad(name, actual, expected_hi, expected_same, what):
    if expected_hi is None:  # the reference does not use the parameter (weight_h with L = 1): zero gradient
        assert actual is None or actual.numel() == 0 or not bool(actual.any()), f"{what}: d{name} must be zero"
        return
    assert_close(actual, expected_hi, expected_same, what=f"{what}: d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_matches_reference(case, dtype):
    out, grads = _run("triton", case, dtype)
    ref_hi, grads_hi = _run("reference", case, torch.float64)
    ref_same, grads_same = _run("reference", case, dtype)
    what = f"backend=triton case={case.id} dtype={_dtype_id(dtype)}"
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}"
    assert_close(out, ref_hi, ref_same, what=f"{what}: output")
    assert grads.keys() == grads_hi.keys(), f"{what}: gradient set {sorted(grads)} != {sorted(grads_hi)}"
    for name in grads_hi:
        _check_grad(name, grads[name], grads_hi[name], grads_same[name], what)


GRADCHECK_ACTIVATIONS = [("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("tanh", 0.01),
                         ("sigmoid", 0.01), ("identity", 0.01), ("gelu", 0.01), ("silu", 0.01)]


@pytest.mark.parametrize("head", [True, False], ids=["head", "hidden"])
@pytest.mark.parametrize("activation,slope", GRADCHECK_ACTIVATIONS,
                         ids=[f"{a}{'' if s == 0.01 else f'({s})'}" for a, s in GRADCHECK_ACTIVATIONS])
def test_gradcheck(activation, slope, head):
    # D = 5, K = 2: c = 2, the third chunk wraps (columns 4, 0); shared weights so slot 1 serves two sub-layers.
    case = Case(2, 5, 2, 2, 3, out=2, activation=activation, negative_slope=slope, head=head,
                shared=activation == "sigmoid")
    x, params = make_inputs(case, torch.float64, device=DEVICE)
    names = [k for k, v in params.items() if v is not None]

    def fn(x_, *tensors):
        return spinal_ops.spinal_linear(x_, **dict(zip(names, tensors, strict=True)), **functional_kwargs(case))

    with spinal_ops.use_backend("triton"):
        assert torch.autograd.gradcheck(fn, (x, *[params[k] for k in names]), eps=1e-6, atol=1e-7, rtol=1e-5), (
            f"backend=triton case={case.id}: gradcheck failed")


# --------------------------------------------------------------------------------------------- launch counts


def _launched_kernels():
    """The kernel objects the launchers call under the current settings (autotuned wrappers on a GPU)."""
    from spinal_ops.triton_kernels import backward, config, forward

    tuned = config.autotune_enabled()
    return {
        "forward": forward._spinal_fwd_kernel_tuned if tuned else forward._spinal_fwd_kernel,
        "chain": backward._spinal_bwd_chain_kernel_tuned if tuned else backward._spinal_bwd_chain_kernel,
        "weights": backward._spinal_bwd_weights_kernel,
    }


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches by name (patches each kernel object's ``run``)."""
    counts = {}
    for name, kernel in _launched_kernels().items():
        original = kernel.run

        def counting_run(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counting_run)
    return counts


@pytest.mark.parametrize("case", [CASES[0], CASES[7]], ids=lambda c: c.id)
def test_launch_counts(case, launches):
    x, params = make_inputs(case, torch.float32, device=DEVICE)
    with spinal_ops.use_backend("triton"):
        out = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))  # warm-up (autotuning on a GPU)
        out.sum().backward()
        launches.clear()
        out = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
        assert launches == {"forward": 1}, f"backend=triton case={case.id}: forward launches {launches}"
        launches.clear()
        out.sum().backward()
    total = sum(launches.values())
    assert 1 <= total <= 2, f"backend=triton case={case.id}: backward launches {launches}, expected at most 2"
    assert launches == {"chain": 1, "weights": 1}, f"backend=triton case={case.id}: backward launches {launches}"


def test_backward_output_mask(launches):
    """Only dx wanted: one launch, the other five gradients come back empty; only head gradients: one launch."""
    case = CASES[0]
    x, params = make_inputs(case, torch.float64, device=DEVICE)
    from spinal_ops import reference

    starts = reference.split_starts(case.in_features, case.num_splits, case.num_layers, case.split_mode)
    hyper = (starts, case.activation, case.negative_slope, case.shared)
    p = [params[k].detach() for k in ("weight_x", "weight_h", "bias", "head_weight", "head_bias")]
    spinal_ops.ops._triton_forward()
    h_all, y = torch.ops.spinal_ops.spinal_forward_triton(x.detach(), *p, *hyper)
    grad_y = torch.ones_like(y)
    bwd = torch.ops.spinal_ops.spinal_backward_triton
    launches.clear()
    only_dx = bwd(grad_y, None, x.detach(), h_all, p[0], p[1], p[2], p[3], *hyper, [True] + [False] * 5)
    assert launches == {"chain": 1}, f"backend=triton case={case.id} mask=dx: launches {launches}"
    assert only_dx[0].shape == x.shape and all(g.numel() == 0 for g in only_dx[1:]), (
        f"backend=triton case={case.id} mask=dx: shapes {[tuple(g.shape) for g in only_dx]}")
    launches.clear()
    only_head = bwd(grad_y, None, x.detach(), h_all, p[0], p[1], p[2], p[3], *hyper, [False] * 4 + [True, True])
    assert launches == {"weights": 1}, f"backend=triton case={case.id} mask=head: launches {launches}"
    assert_close(only_head[4], grad_y.T @ h_all, what=f"backend=triton case={case.id} mask=head: dhead_weight")
    assert_close(only_head[5], grad_y.sum(0), what=f"backend=triton case={case.id} mask=head: dhead_bias")
    full = bwd(grad_y, None, x.detach(), h_all, p[0], p[1], p[2], p[3], *hyper, [True] * 6)
    assert_close(only_dx[0], full[0], what=f"backend=triton case={case.id}: dx alone vs with every gradient")


def test_backward_deterministic():
    case = CASES[3]  # B = 257: several row tiles
    _, first = _run("triton", case, torch.float32)
    _, second = _run("triton", case, torch.float32)
    for name in first:
        assert torch.equal(first[name], second[name]), f"backend=triton case={case.id}: d{name} not bitwise equal"


# ------------------------------------------------------------------------------------ original-style modules

ORIGINAL_STYLE = [
    # (id, D, K, w, L, out, shared, head, activation, slope)
    ("K8-wrap-head-relu", 20, 8, 3, 12, 4, False, True, "relu", 0.01),
    ("D13-K3-head-leaky", 13, 3, 5, 5, 3, False, True, "leaky_relu", 0.1),
    ("D13-K3-shared-L31-hidden-leaky", 13, 3, 3, 31, 0, True, False, "leaky_relu", 0.1),
]


@pytest.mark.parametrize("spec", ORIGINAL_STYLE, ids=[s[0] for s in ORIGINAL_STYLE])
def test_from_linears_original_style(spec):
    name, d, k, w, num_layers, out, shared, head, activation, slope = spec
    orig = CustomizableSpinal(d, k, w, num_layers, out, activation=activation, negative_slope=slope, shared=shared,
                              head=head).double().to(DEVICE)
    layers, head_linear = orig.linears()
    module = SpinalLinear.from_linears(d, layers, head_linear, num_splits=k, activation=activation,
                                       negative_slope=slope)
    what = f"backend=triton original-style {name} float64"
    assert module.shared_weights == shared, f"{what}: shared_weights not detected"
    x = torch.randn(6, d, dtype=torch.float64, device=DEVICE)
    x_orig = x.clone().requires_grad_()
    x_sp = x.clone().requires_grad_()
    expected = orig(x_orig)
    with spinal_ops.use_backend("triton"):
        actual = module(x_sp)
    assert_close(actual.detach(), expected.detach(), what=f"{what}: output")
    cot = torch.randn_like(expected)
    expected.backward(cot)
    actual.backward(cot)
    assert_close(x_sp.grad, x_orig.grad, what=f"{what}: dx")
    for pname, grad in packed_grads(layers, head_linear, module.chunk, shared).items():
        assert_close(getattr(module, pname).grad, grad, what=f"{what}: d{pname}")


# ------------------------------------------------------------------------------------------- launch settings


def test_float32_precision_follows_torch():
    from spinal_ops.triton_kernels import config

    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert config.dtype_plan(torch.float32).precision == "ieee"
        torch.set_float32_matmul_precision("high")
        assert config.dtype_plan(torch.float32).precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)
    assert config.dtype_plan(torch.float64).precision == "ieee"


def test_autotune_prune_keeps_a_fitting_config():
    """For every benchmark configuration and batch size the GPU autotune space keeps at least one config, and
    every kept one respects the row cap."""
    from spinal_ops.configs import CONFIGS, ROOFLINE_BATCH_SIZES
    from spinal_ops.triton_kernels import config

    for cfg in CONFIGS:
        for rows in ROOFLINE_BATCH_SIZES:
            for configs, prune in ((config.forward_autotune_configs(), config.forward_prune),
                                   (config.chain_autotune_configs(), config.chain_prune)):
                named = {"B": rows, "x_ptr": torch.empty(0, dtype=torch.bfloat16)}
                kept = prune(configs, named, BLOCK_W=config.width_tile(cfg.width), BLOCK_O=config.out_tile(cfg.out))
                assert kept, f"{cfg.name} B={rows}: every autotune config pruned"
                assert all(c.kwargs["BLOCK_B"] <= max(16, triton_pow2(rows)) for c in kept), f"{cfg.name} B={rows}"


def triton_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
