"""The GPU cost model (spinal_ops/gpu_model.py): its launch descriptions are the launchers' launches, its eager
plans are the code's own ops, and the automatic choice it drives is the model's fastest candidate."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import INTERPRETED, Case, emulator, make_inputs, unavailable

from spinal_ops import backends, gpu_model, ops, reference
from spinal_ops.configs import CONFIG_BY_NAME, CONFIGS, SpinalConfig

# Launch shapes of the CUDA launchers: fast (w <= 64) and general width paths, the head accumulator on chip (16 x
# 200 x 4 B = 12.5 KB) and in the global workspace (16 x 300 x 4 B > 16 KB), hidden mode, tied slots, partial row
# tiles, weight gradients reduced in pieces of the batch (> 128 rows) and summed by a third launch.
LAUNCH_CASES = [
    Case(1, 13, 3, 5, 4, out=3),
    Case(33, 40, 2, 70, 3, out=9),
    Case(17, 9, 2, 4, 2, out=300),
    Case(3, 9, 2, 4, 2, out=200),
    Case(20, 12, 3, 4, 3, out=0, head=False),
    Case(5, 16, 2, 6, 6, out=4, tie=(0, 1, 2, 3, 2, 3)),
    Case(300, 16, 2, 6, 6, out=4, tie=(0, 1, 2, 3, 2, 3)),
]
MATH_DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}


def problem_of(case: Case) -> gpu_model.Problem:
    lx, lh = reference.num_slots(case.slots)
    c = reference.chunk_size(case.in_features, case.num_splits)
    return gpu_model.Problem(case.rows, case.in_features, c, case.width, case.num_layers, case.out if case.head else 0,
                             lx, lh)


def described(launches) -> list[tuple[int, int, int]]:
    return [(k.grid, k.block, k.smem) for k in launches]


@pytest.mark.emulated
@pytest.mark.skipif(unavailable("emulated") is not None, reason=str(unavailable("emulated")))
@pytest.mark.parametrize("math_mode", list(MATH_DTYPES))
@pytest.mark.parametrize("case", LAUNCH_CASES, ids=lambda c: c.id)
def test_cuda_launches_are_what_the_launchers_launch(case, math_mode):
    """Grid, block and dynamic shared memory of every launch of a forward and a full backward, as the CUDA
    launchers make them (run under the SIMT emulator, which logs each launch), equal the model's description."""
    emu = emulator()
    dtype, tf32 = MATH_DTYPES[math_mode]
    x, params = make_inputs(case, dtype)
    starts, slots = case.layer_args()
    hyper = (starts, slots, case.activation, float(case.negative_slope))
    p = problem_of(case)
    emu.clear_launch_log()
    H, y = emu.forward(x.detach(), *(t.detach() if t is not None else None for t in params.values()), *hyper, 0, tf32)
    forward_log = [(g[0], g[3], g[6]) for g in emu.launch_log()]
    assert [(g[1], g[2], g[4], g[5]) for g in emu.launch_log()] == [(1, 1, 1, 1)], "1-D grids and blocks"
    model = gpu_model.cuda_launches(p, math_mode, "fwd+bwd")
    assert forward_log == described(model[:1])
    emu.clear_launch_log()
    mask = [True, True, p.lh > 0, True, case.head, case.head]
    grad_y = torch.ones_like(y) if case.head else None
    grad_h = None if case.head else torch.ones_like(H)
    emu.backward(grad_y, grad_h, x.detach(), H, params["weight_x"].detach(), params["weight_h"].detach(),
                 params["bias"].detach(), params["head_weight"].detach() if case.head else None, *hyper, mask)
    assert [(g[0], g[3], g[6]) for g in emu.launch_log()] == described(model[1:])


@pytest.mark.skipif(not INTERPRETED, reason="the Triton launchers run on CPU tensors only with TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", [LAUNCH_CASES[i] for i in (0, 1, 2, 4)], ids=lambda c: c.id)
def test_triton_launches_are_what_the_launchers_launch(case, monkeypatch):
    """Every Triton launch of a forward and a full backward (recorded at the launcher) has the grid, warps and tiles
    of the model's description for the interpreter target (the GPU target is the same function's other branch)."""
    from spinal_ops.triton_kernels import settings

    from spinal_ops import triton_kernels

    recorded = []
    real = settings.launcher

    def recording(kernel):
        launch = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    recorded.append((tuple(grid), {k: v for k, v in kwargs.items() if k.startswith("BLOCK_")},
                                     kwargs["num_warps"]))
                    return launch[grid](*args, **kwargs)
                return call
        return Grid()

    monkeypatch.setattr(settings, "launcher", recording)
    x, params = make_inputs(case, torch.float32)
    starts, slots = case.layer_args()
    hyper = (starts, slots, case.activation, float(case.negative_slope))
    tensors = [t.detach() if t is not None else None for t in params.values()]
    H, y = triton_kernels.forward.spinal_fwd_triton(x.detach(), *tensors, *hyper)
    p = problem_of(case)
    mask = (True, True, p.lh > 0, True, case.head, case.head)
    triton_kernels.backward.spinal_bwd_triton(
        torch.ones_like(y) if case.head else None, None if case.head else torch.ones_like(H), x.detach(), H,
        *tensors[:4], *hyper, list(mask))
    model = gpu_model.triton_launches(p, "fp32", "fwd+bwd", target="interpreter")
    expected = [((k.grid,), {n: v for n, v in k.meta.items() if n.startswith("BLOCK_")}, k.block // 32) for k in model]
    assert recorded == expected


def test_eager_plans_are_the_code_s_ops():
    """The eager chain records 3L + 1 forward ops (per sub-layer cat, addmm, relu; the final cat and the head's
    addmm) with the scripts' GEMM shapes; the dense layer two addmm and a relu; a backward adds engine ops."""
    cfg = CONFIG_BY_NAME["resnet-head"]
    c, w, L, rows = cfg.chunk, cfg.width, cfg.num_layers, 64
    eager = gpu_model.eager_ops("eager", cfg, rows, "forward", "fp32")
    assert len(eager) == 3 * L + 1
    gemms = [op.gemm for op in eager if op.gemm is not None]
    assert gemms == [(rows, w, c)] + [(rows, w, c + w)] * (L - 1) + [(rows, cfg.out, L * w)]
    assert not any(op.backward for op in eager)
    dense = gpu_model.eager_ops("dense", cfg, rows, "forward", "fp32")
    assert [op.gemm for op in dense] == [(rows, L * w, cfg.in_features), None, (rows, cfg.out, L * w)]
    training = gpu_model.eager_ops("eager", cfg, rows, "fwd+bwd", "fp32")
    assert sum(not op.backward for op in training) == 3 * L + 1 and sum(op.backward for op in training) > 3 * L
    # the reference backend slices chunks as views: no gather op for a chunk that does not wrap
    ref = gpu_model.eager_ops("reference", cfg, rows, "forward", "fp32")
    assert not any("index_select" in op.name or "arange" in op.name for op in ref)


def test_recording_is_isolated_from_the_caller_s_context():
    """The automatic choice records the reference's ops inside a user's call: the same ops under inference mode,
    autocast and a dispatch mode of the caller's (which sees none of them), and the RNG untouched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.count += 1
            return func(*args, **(kwargs or {}))

    cfg = SpinalConfig("isolated", 24, 3, 6, 3, 5, "tanh")
    gpu_model.eager_ops.cache_clear()
    plain = gpu_model.eager_ops("reference", cfg, 4, "fwd+bwd", "bf16")
    gpu_model.eager_ops.cache_clear()
    rng = torch.random.get_rng_state()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), Seen():
        inside = gpu_model.eager_ops("reference", cfg, 4, "fwd+bwd", "bf16")
    assert inside == plain and Seen.count == 0
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_rows_choose_the_fastest_candidate_and_respect_the_floor():
    rows = gpu_model.model_rows(devices=("h200",), batch_sizes=(1, 1024), maths=("bf16", "fp32"))
    assert len(rows) == len(CONFIGS) * 2 * 2 * 2
    chosen = set()
    for r in rows:
        best = min(r.times[plan].seconds for plan in gpu_model.PLANS)
        assert r.chosen_s == best, r
        assert r.chosen_s <= r.times["reference"].seconds
        for plan in ("cuda", "triton", "gemm", "reference", "eager"):  # the spinal layer's plans: never under its floor
            assert r.times[plan].seconds >= r.floor_s, (r.config, r.rows, plan)
        chosen.add(r.chosen)
    assert chosen == set(gpu_model.PLANS), "the model picks each plan somewhere: the choice depends on the shape"


def test_choice_among_available_backends_only():
    cfg = CONFIG_BY_NAME["resnet-head"]
    assert gpu_model.choose_backend(cfg, 1, "h200", "bf16", "forward") == "cuda"
    assert gpu_model.choose_backend(cfg, 1, "h200", "bf16", "forward", ("triton", "reference")) == "triton"
    assert gpu_model.choose_backend(cfg, 1, "h200", "bf16", "forward", ("reference",)) == "reference"
    with pytest.raises(ValueError, match="no plan available"):
        gpu_model.choose_backend(cfg, 1, "h200", "bf16", "forward", ())


def test_kernel_time_grows_with_the_batch():
    cfg = CONFIG_BY_NAME["vgg-head"]
    for plan in ("cuda", "triton"):
        times = [gpu_model.plan_time(plan, cfg, b, gpu_model.DEVICES["h100-sxm"], "bf16", "fwd+bwd").gpu_s
                 for b in (1, 64, 1024, 65536)]
        assert times == sorted(times) and times[-1] > 10 * times[0], (plan, times)


def test_select_backend_on_cuda_tensors_follows_the_model(monkeypatch):
    """On a CUDA device (here faked: the model reads only its name and SM count), the automatic choice for a call
    is the model's for the call's problem; a forced backend still wins; without a problem the static order; inside a
    torch.func transform reference."""
    props = types.SimpleNamespace(name="NVIDIA H200", multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(backends, "_serves", lambda name, device_type, dtype=None: True)
    monkeypatch.setattr(backends, "_automatic", {})
    monkeypatch.setattr(backends, "_ENV_BACKEND", None)
    backends._device_key.cache_clear()
    device = torch.device("cuda", 0)
    narrow, wide = CONFIG_BY_NAME["resnet-head"], CONFIG_BY_NAME["wide-resnet-head"]
    try:
        got = {cfg.name: backends.select_backend(device, torch.float32, (cfg, 1, "forward")) for cfg in (narrow, wide)}
        expected = {cfg.name: gpu_model.choose_backend(cfg, 1, "h200", "fp32", "forward") for cfg in (narrow, wide)}
        assert got == expected and len(set(got.values())) == 2, got
        assert backends.select_backend(device, torch.float32) == "cuda"
        with backends.use_backend("reference"):
            assert backends.select_backend(device, torch.float32, (narrow, 1, "forward")) == "reference"
        inside = []  # inside a torch.func transform: reference, not the model's choice
        torch.func.grad(lambda a: inside.append(backends.select_backend(device, torch.float32, (wide, 1, "forward")))
                        or a.sum())(torch.ones(2))
        assert inside == ["reference"]
    finally:
        backends._device_key.cache_clear()


def test_device_key_models_unknown_gpus_by_their_sm_count():
    key = gpu_model.device_key(types.SimpleNamespace(name="Some GPU", multi_processor_count=20))
    assert gpu_model.DEVICES[key].sms == 20
    assert gpu_model.device_key(types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132)) \
        == "h100-sxm"


def test_problem_of_a_call():
    """``ops._problem``: the layer's sizes, the rows, and fwd+bwd exactly when autograd tracks the call."""
    layer_cfg = SpinalConfig("layer", 12, 3, 5, 4, 7, "relu")
    from spinal_ops import SpinalLinear

    m = SpinalLinear(12, 7, layer_width=5, num_layers=4, num_splits=3)
    x = torch.randn(6, 12)
    params = (m.weight_x, m.weight_h, m.bias, m.head_weight, m.head_bias)
    assert ops._problem(x, params, m._spec) == (layer_cfg, 6, "fwd+bwd")
    with torch.no_grad():
        assert ops._problem(x, params, m._spec) == (layer_cfg, 6, "forward")
    frozen = tuple(t.detach() for t in params)
    assert ops._problem(x, frozen, m._spec)[2] == "forward"
    assert ops._problem(x.requires_grad_(), frozen, m._spec)[2] == "fwd+bwd"


def test_math_of_follows_the_float32_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert gpu_model.math_of(torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert gpu_model.math_of(torch.float32) == "tf32"
        assert gpu_model.math_of(torch.bfloat16) == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)
