"""What is specific to the `triton` backend: gradcheck, launch counts, original-style modules; the kernels' wide
path (forced with small tiles) against the reference and the choice between fast and wide path. Its outputs and
gradients against the reference on the shared cases are in tests/test_conformance.py, its opcheck in
tests/test_opcheck.py.

Runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before pytest starts)
or on CUDA tensors on a GPU. Skipped when Triton is not installed, or when neither is available: the import of
this module checks only the environment and the installed packages; the GPU check (``torch.cuda.is_available()``)
is a string condition that pytest evaluates when the test is set up, never at import.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    CASES,
    DTYPE_NAMES,
    GRADCHECK,
    INTERPRETED,
    Case,
    assert_close,
    check_against_reference,
    functional_kwargs,
    make_inputs,
    run_case,
    triton_ops,
)
from original import CustomizableSpinal, packed_grads

import spinal_ops
from spinal_ops import SpinalLinear
from spinal_ops.configs import CONFIG_BY_NAME, CONFIGS, ROOFLINE_BATCH_SIZES

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

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


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
        assert torch.autograd.gradcheck(fn, (x, *[params[k] for k in names]), **GRADCHECK), (
            f"backend=triton case={case.id}: gradcheck failed")


# --------------------------------------------------------------------------------------------- launch counts


def _launched_kernels():
    """The kernel objects the launchers call under the current settings (autotuned wrappers on a GPU)."""
    from spinal_ops.triton_kernels import backward, forward, settings

    tuned = settings.autotune_enabled()
    return {
        "forward": forward._spinal_fwd_kernel_tuned() if tuned else forward._spinal_fwd_kernel,
        "chain": backward._spinal_bwd_chain_kernel_tuned() if tuned else backward._spinal_bwd_chain_kernel,
        "weights": backward._spinal_bwd_weights_kernel,
    }


def _record_launches(monkeypatch, on_launch) -> None:
    """Calls ``on_launch(name, kwargs)`` for every kernel launch: the launchers launch through
    ``settings.launcher``, which this wraps (it may be wrapped again)."""
    from spinal_ops.triton_kernels import settings

    names = {id(kernel): name for name, kernel in _launched_kernels().items()}
    original = settings.launcher

    class Recorded:
        def __init__(self, kernel):
            self.launch, self.name = original(kernel), names.get(id(kernel), repr(kernel))

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                on_launch(self.name, kwargs)
                return self.launch[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(settings, "launcher", Recorded)


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches by name."""
    counts = {}
    _record_launches(monkeypatch, lambda name, kwargs: counts.__setitem__(name, counts.get(name, 0) + 1))
    return counts


@pytest.mark.parametrize("case", [CASES["wrap"], CASES["gelu-hidden"]], ids=lambda c: c.id)
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
    assert launches == {"chain": 1, "weights": 1}, f"backend=triton case={case.id}: backward launches {launches}"


def test_backward_output_mask(launches):
    """Only dx wanted: one launch, the other five gradients come back empty; only head gradients: one launch."""
    case = CASES["wrap"]
    x, params = make_inputs(case, torch.float64, device=DEVICE)
    hyper = (*case.layer_args(), case.activation, case.negative_slope)
    p = [params[k].detach() for k in ("weight_x", "weight_h", "bias", "head_weight", "head_bias")]
    ops = triton_ops()
    h_all, y = ops.spinal_forward_triton(x.detach(), *p, *hyper)
    grad_y = torch.ones_like(y)
    bwd = ops._spinal_backward_triton
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
    case = CASES["b257"]  # B = 257: several row tiles
    first = run_case("triton", case, torch.float32)
    second = run_case("triton", case, torch.float32)
    for name in first:
        if first[name] is None:
            continue
        assert torch.equal(first[name], second[name]), f"backend=triton case={case.id}: d{name} not bitwise equal"


# ------------------------------------------------------------------------------------------------- wide path

# Forced wide-path tiles: BLOCK_N = BLOCK_K = BLOCK_O = 16, so a w = 40 layer spans 3 column tiles and 3 K-steps
# (the last ones masked: 40 = 16 + 16 + 8) and a 37-output head 3 output tiles.
WIDE_TILE = 16
WIDE_CASES = {
    # chunks wrap (D = 13, K = 3: c = 4); width and head both end in a partial tile
    "wrap-partial-tiles": Case(7, 13, 3, 40, 4, out=37),
    # gelu: act' from Z recomputed tile by tile; out = 16: exactly one head tile
    "gelu-one-head-tile": Case(7, 13, 3, 21, 3, out=16, activation="gelu"),
    # leaky_relu with a negative slope (Z recompute), shared weights; D = 11, c = 3: sub-layer 3 reads 9, 10, 0
    "leaky-negative-shared": Case(7, 11, 4, 19, 6, out=5, activation="leaky_relu", negative_slope=-0.3, shared=True),
    # hidden mode, shared weights, no bias, alternate split, silu (Z recompute); grad_H only
    "shared-hidden-nobias": Case(9, 16, 4, 37, 5, split_mode="alternate", shared=True, bias=False, head=False,
                                 activation="silu"),
    # two row tiles (the interpreter's row tile is 64), c = round(4.5) = 4, w a multiple of the tile
    "two-row-tiles": Case(70, 9, 2, 32, 3, activation="tanh"),
    # L = 1: no recurrence, no carry
    "l1": Case(5, 11, 2, 20, 1, out=3, activation="sigmoid"),
}


@pytest.fixture
def force_wide(monkeypatch):
    """Forces the wide path with WIDE_TILE-sized tiles (patches ``settings.path_plan``, the one place that chooses)
    and records the ``WIDE`` flag of every forward / chain launch (the weights kernel is tiled for any size and
    has no path flag), so a test can check that the wide path ran."""
    from spinal_ops.triton_kernels import settings

    plan = settings.PathPlan(wide=True, block_w=WIDE_TILE, block_o=WIDE_TILE, block_n=WIDE_TILE, block_k=WIDE_TILE)
    monkeypatch.setattr(settings, "path_plan", lambda width, out, dtype, device=None: plan)
    seen = []
    _record_launches(monkeypatch, lambda name, kwargs: seen.append(kwargs.get("WIDE")) if name != "weights" else None)
    return seen


def _assert_ran_wide(seen, what):
    assert seen and all(flag is True for flag in seen), f"{what}: launches with WIDE = {seen}, expected all True"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("case", list(WIDE_CASES.values()), ids=lambda c: c.id)
def test_wide_path_matches_reference(case, dtype, force_wide):
    what = f"backend=triton path=wide tile={WIDE_TILE} case={case.id} dtype={DTYPE_NAMES[dtype]}"
    check_against_reference("triton", case, dtype, what=what)
    _assert_ran_wide(force_wide, what)


WIDE_GRADCHECK = [("gelu", 0.01, True), ("tanh", 0.01, False), ("leaky_relu", -0.3, False)]


@pytest.mark.parametrize("activation,slope,head", WIDE_GRADCHECK,
                         ids=[f"{a}{'' if s == 0.01 else f'({s})'}-{'head' if h else 'hidden'}"
                              for a, s, h in WIDE_GRADCHECK])
def test_wide_path_gradcheck(activation, slope, head, force_wide):
    """gradcheck through the wide path: w = 17 spans two column tiles and K-steps (the second masked down to one
    column), the second chunk wraps (D = 3, c = 2: columns 2, 0). ``fast_mode`` compares random projections
    ``v^T J u`` of the numerical and analytical Jacobians of every input: ~2 s a case, where the full Jacobians
    take minutes in the interpreter (gradcheck still computes them on a failure, for its message: a failing case
    takes ~3 minutes). Every gradient element is compared with the reference by test_wide_path_matches_reference."""
    case = Case(2, 3, 2, WIDE_TILE + 1, 2, out=2, activation=activation, negative_slope=slope, head=head)
    x, params = make_inputs(case, torch.float64, device=DEVICE)
    names = [k for k, v in params.items() if v is not None]

    def fn(x_, *tensors):
        return spinal_ops.spinal_linear(x_, **dict(zip(names, tensors, strict=True)), **functional_kwargs(case))

    with spinal_ops.use_backend("triton"):
        assert torch.autograd.gradcheck(fn, (x, *[params[k] for k in names]), **GRADCHECK, fast_mode=True), (
            f"backend=triton path=wide case={case.id}: gradcheck failed")
    _assert_ran_wide(force_wide, f"backend=triton path=wide case={case.id}")


def test_wide_path_launch_counts(force_wide, launches):
    case = WIDE_CASES["wrap-partial-tiles"]
    x, params = make_inputs(case, torch.float32, device=DEVICE)
    what = f"backend=triton path=wide case={case.id}"
    with spinal_ops.use_backend("triton"):
        out = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))  # warm-up (autotuning on a GPU)
        out.sum().backward()
        launches.clear()
        out = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
        assert launches == {"forward": 1}, f"{what}: forward launches {launches}"
        launches.clear()
        out.sum().backward()
    assert launches == {"chain": 1, "weights": 1}, f"{what}: backward launches {launches}, expected chain + weights"
    _assert_ran_wide(force_wide, what)


def test_path_choice():
    """The fast path for the benchmark's narrow layers, the wide path where the fast path's whole tiles would not
    fit (wide layers, large heads); whole-width tiles on the fast path, tiles >= 16 (tl.dot) on both."""
    from spinal_ops.triton_kernels import settings

    for dtype in DTYPES:
        for name in ("resnet-head", "vit-custom", "regression", "vgg-head"):  # w = 20, 20, 50, 128; out 10 or 1
            cfg = CONFIG_BY_NAME[name]
            path = settings.path_plan(cfg.width, cfg.out, dtype)
            assert not path.wide, f"{name} ({dtype}): wide path chosen for w={cfg.width} out={cfg.out}"
            assert path.block_w >= cfg.width and path.block_o >= cfg.out, f"{name} ({dtype}): {path}"
        assert not settings.path_plan(20, 0, dtype).wide, f"hidden mode w=20 ({dtype}): wide path chosen"
        for width, out in ((512, 10), (1100, 3), (8, 10_000), (100, 10_000), (8, 70_000), (4096, 0)):
            path = settings.path_plan(width, out, dtype)
            assert path.wide, f"w={width} out={out} ({dtype}): fast path chosen, whole tiles do not fit"
            assert min(path.block_n, path.block_k, path.block_o) >= 16, f"w={width} out={out} ({dtype}): {path}"
    # where the whole w x w tile stops fitting 160 KB of shared memory depends on the element size
    assert settings.path_plan(128, 10, torch.float32).wide is False
    assert settings.path_plan(256, 10, torch.float32).wide is True
    assert settings.path_plan(256, 10, torch.float16).wide is False
    assert settings.path_plan(512, 10, torch.float16).wide is True


def test_index_limit_error_names_backend_argument_and_fallback():
    """The one size limit left, 32-bit offsets inside a weight tensor, raises before any launch."""
    from spinal_ops.triton_kernels import settings

    settings.check_index_limits(3, 20, 10, 1100, 2, 70_000, 2, 1)  # the sizes tests/test_limits.py runs: no error
    with pytest.raises(ValueError, match=r"triton backend: out_features.*head_weight \(65536, 32768\).*2\^31.*"
                                         r"cuda, cpu or reference"):
        settings.check_index_limits(3, 20, 10, 16384, 2, 65536, 2, 1)
    with pytest.raises(ValueError, match=r"triton backend: layer_width.*weight_h \(1, 46341, 46341\).*"
                                         r"cuda, cpu or reference"):
        settings.check_index_limits(3, 20, 10, 46341, 2, 10, 2, 1)


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
    for pname, grad in packed_grads(layers, head_linear, module.chunk).items():
        assert_close(getattr(module, pname).grad, grad, what=f"{what}: d{pname}")


# ------------------------------------------------------------------------------------------- launch settings


def test_float32_precision_follows_torch():
    from spinal_ops.triton_kernels import settings

    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert settings.dtype_plan(torch.float32).precision == "ieee"
        torch.set_float32_matmul_precision("high")
        assert settings.dtype_plan(torch.float32).precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)
    assert settings.dtype_plan(torch.float64).precision == ("ieee" if settings.FP64_DOT else "fma")


def test_autotune_prune_keeps_a_fitting_config(monkeypatch):
    """For every benchmark configuration (fast and wide path) and batch size the GPU autotune space keeps at least
    one config, and every kept one respects the row cap."""
    from spinal_ops.triton_kernels import settings

    monkeypatch.setattr(settings, "interpreted", lambda: False)  # the GPU tiles of path_plan
    paths = set()
    for cfg in CONFIGS:
        for dtype in (torch.bfloat16, torch.float32):
            path = settings.path_plan(cfg.width, cfg.out, dtype)
            paths.add(path.wide)
            for rows in ROOFLINE_BATCH_SIZES:
                for configs, prune in ((settings.autotune_configs(), settings.autotune_prune("forward")),
                                       (settings.autotune_configs(), settings.autotune_prune("chain"))):
                    named = {"B": rows, "x_ptr": torch.empty(0, dtype=dtype)}
                    kept = prune(configs, named, **path.meta())  # the constexprs the launcher passes
                    what = f"{cfg.name} {dtype} B={rows} wide={path.wide}"
                    assert kept, f"{what}: every autotune config pruned"
                    assert all(c.kwargs["BLOCK_B"] <= max(16, triton_pow2(rows)) for c in kept), what
    assert paths == {False, True}, f"the benchmark configurations should exercise both paths, got wide in {paths}"


def triton_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------------- GPU readiness


def test_path_choice_respects_the_device_shared_memory(monkeypatch):
    """The fast path is kept only where its tiles plus the margin fit the device's opt-in shared memory: the 16-bit
    w = 256, out = 64 boundary plan fits an H100 / H200 (232,448 B) but not an A100 (166,912 B)."""
    from spinal_ops.triton_kernels import settings

    limits = {7: 166_912, 6: 232_448}
    monkeypatch.setattr(settings, "shared_memory_limit", lambda device: limits.get(getattr(device, "index", None)))
    settings._path_plan.cache_clear()
    try:
        a100, h200 = torch.device("cuda", 7), torch.device("cuda", 6)
        assert settings.path_plan(256, 64, torch.float16, a100).wide, "A100: the boundary plan exceeds 166,912 B"
        assert not settings.path_plan(256, 64, torch.float16, h200).wide, "H200: the boundary plan fits"
        assert not settings.path_plan(256, 64, torch.float16).wide, "no device: the model's budget alone"
        for device in (a100, h200):  # the benchmark's narrow layers stay fast on both
            assert not settings.path_plan(128, 10, torch.float32, device).wide
    finally:
        settings._path_plan.cache_clear()


def test_autotune_key_buckets_the_batch_size():
    from spinal_ops.triton_kernels import settings

    assert "B" not in settings.AUTOTUNE_KEY and "B_BUCKET" in settings.AUTOTUNE_KEY
    assert [settings.batch_bucket(b) for b in (1, 2, 3, 64, 65, 128, 129)] == [1, 2, 4, 64, 128, 128, 256]


def test_repeated_calls_upload_no_table_and_check_once():
    """A repeated forward and backward copies no layer table to the device and runs the C++ argument checks once
    per signature; another tying pattern is a new table and a new signature."""
    from spinal_ops.triton_kernels import settings

    from spinal_ops import ops

    case = CASES["tied"]
    x, params = make_inputs(case, torch.float32, device=DEVICE)

    def step(c):
        with spinal_ops.use_backend("triton"):
            spinal_ops.spinal_linear(x, **params, **functional_kwargs(c)).sum().backward()

    step(case)
    misses, checked = settings.cached_layer_table.cache_info().misses, len(ops._CHECKED)
    step(case)
    step(case)
    assert settings.cached_layer_table.cache_info().misses == misses, "triton: a repeated call uploaded its table"
    assert len(ops._CHECKED) == checked, "triton: a repeated call was checked as a new signature"
    other = case.replace(tie=(0, 1, 2, 3, 3, 2))
    step(other)
    assert settings.cached_layer_table.cache_info().misses == misses + 1, "triton: a new table is uploaded once"


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.4.0", "2.4.6", True), ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
    ("3.9.0+git1234", "2.5.0.dev0", False),
])
def test_interpreter_numpy_pairing(triton_version, numpy_version, refused):
    """Triton's interpreter before 3.7 cannot run with numpy >= 2.4: a clear error naming both, not a failure
    inside a kernel."""
    from spinal_ops.triton_kernels import settings

    if not refused:
        settings.check_interpreter_numpy(triton_version, numpy_version)
        return
    expected = rf"Triton {triton_version} interpreter .* numpy {numpy_version}.*numpy<2\.4"
    with pytest.raises(RuntimeError, match=expected):
        settings.check_interpreter_numpy(triton_version, numpy_version)


def test_importing_the_kernels_builds_no_autotuner():
    """Some Triton releases need a GPU driver to build a ``triton.autotune`` wrapper: importing the kernels must
    not build one (they are built on first use)."""
    code = textwrap.dedent("""
        import triton
        def refuse(*args, **kwargs):
            raise RuntimeError("triton.autotune called at import")
        triton.autotune = refuse
        import spinal_ops.triton_kernels
        from spinal_ops.triton_kernels import backward, forward
        print("imported", forward._spinal_fwd_kernel_tuned.cache_info().currsize,
              backward._spinal_bwd_chain_kernel_tuned.cache_info().currsize)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "imported 0 0" in done.stdout
