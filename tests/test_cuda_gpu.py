"""What is specific to the GPU backends on a real GPU: every CUDA kernel path, the gemm backend on cuBLAS, streams and
devices, CUDA graphs, sync-free calls and torch.compile. Their outputs and gradients against the reference through
the module API are in tests/test_conformance.py, their opcheck in tests/test_opcheck.py.

Collected everywhere, run only where a GPU is: the module is skipped at collection time when the machine has
no NVIDIA device node (a file-system check: CUDA itself is never queried at import or collection), and each
test re-checks ``torch.cuda.is_available()`` when it runs. The CUDA kernel paths are the list of
tests/kernel_paths.py, the same list the emulated tests run on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import (
    CASES,
    DTYPE_NAMES,
    Case,
    assert_close,
    backends,
    check_against_reference,
    functional_kwargs,
    make_inputs,
)
from kernel_paths import VARIANTS, check_variant, gpu_backward, gpu_forward

import spinal_ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="no NVIDIA GPU on this machine"),
]

GPU_BACKENDS = backends("cuda", "triton", "gemm")
PARAMS = ("weight_x", "weight_h", "bias", "head_weight", "head_bias")


@pytest.fixture(autouse=True)
def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available to torch")


def _need(backend: str) -> None:
    if backend not in spinal_ops.available_backends():
        pytest.skip(f"backend {backend!r} not available (built without CUDA kernels, or Triton missing)")


# ------------------------------------------------------------------------------------- every kernel path


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_cuda_kernel_path_matches_reference(variant):
    _need("cuda")
    check_variant(gpu_forward, gpu_backward, variant, f"cuda (GPU) {variant.id}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("case", list(CASES.values()), ids=lambda c: c.id)
def test_gemm_on_cuda_tensors_matches_reference(case, dtype):
    """The gemm backend on cuBLAS (the conformance matrix runs it on the CPU's BLAS)."""
    _need("gemm")
    check_against_reference("gemm", case, dtype, device="cuda")


def test_cuda_backend_is_chosen_for_cuda_tensors():
    assert spinal_ops.backends.select_backend(torch.device("cuda")) in ("cuda", "triton")


# ------------------------------------------------------------------------- no host work, streams, devices


def _step(backend: str, case: Case, x, params):
    with spinal_ops.use_backend(backend):
        y = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
    y.square().sum().backward()
    return y


def _gpu_inputs(case: Case, dtype=torch.float32, device="cuda"):
    x, params = make_inputs(case, dtype)
    return (x.detach().to(device).requires_grad_(),
            {k: (v.detach().to(device).requires_grad_() if v is not None else None) for k, v in params.items()})


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_calls_synchronise_nothing(backend):
    """After a warm-up call, forward and backward run under sync-debug "error" mode: no synchronising call,
    no pageable host-to-device copy."""
    _need(backend)
    case = CASES["tied"]
    x, params = _gpu_inputs(case)
    _step(backend, case, x, params)  # warm-up: compiles, tunes, uploads the layer table once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(backend, case, x, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_forward_and_backward(backend):
    """Forward and backward captured in one CUDA graph and replayed give the eager results."""
    _need(backend)
    case = CASES["wrap"].replace(rows=33)
    x, params = _gpu_inputs(case)
    leaves = [x, *[p for p in params.values() if p is not None]]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on the capture stream (autotuning, table upload, allocator)
            for t in leaves:
                t.grad = None
            _step(backend, case, x, params)
    torch.cuda.current_stream().wait_stream(stream)
    expected = [t.grad.clone() for t in leaves]
    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph):
        y = _step(backend, case, x, params)
    for t in leaves:
        t.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for name, got, want in zip(["x", *[k for k, v in params.items() if v is not None]],
                               [t.grad for t in leaves], expected, strict=True):
        assert_close(got, want, what=f"{backend} graph replay: d{name}")
    assert y.shape[0] == case.rows


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_side_stream(backend):
    """Launches go to the current stream: work on a side stream, ordered only by that stream, is correct."""
    _need(backend)
    case = CASES["b257"]
    x, params = _gpu_inputs(case)
    with spinal_ops.use_backend(backend):
        expected = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case)).detach()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with spinal_ops.use_backend(backend):
            got = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case)).detach()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected), f"{backend}: side-stream result differs"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_second_device_while_the_first_is_current(backend):
    _need(backend)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    case = CASES["wrap"]
    x0, p0 = _gpu_inputs(case, device="cuda:0")
    x1, p1 = _gpu_inputs(case, device="cuda:1")
    with torch.cuda.device(0):
        y0 = _step(backend, case, x0, p0)
        y1 = _step(backend, case, x1, p1)
    assert y1.device == torch.device("cuda:1")
    assert_close(y1.detach().cpu(), y0.detach().cpu(), what=f"{backend}: cuda:1 output")
    assert_close(x1.grad.cpu(), x0.grad.cpu(), what=f"{backend}: cuda:1 dx")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bitwise_repeatable(backend):
    _need(backend)
    case = CASES["b257"]
    results = []
    for _ in range(2):
        x, params = _gpu_inputs(case)
        y = _step(backend, case, x, params)
        results.append([y.detach(), x.grad, *[p.grad for p in params.values() if p is not None]])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b), f"{backend}: two identical calls differ"


# ------------------------------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph(backend, tmp_path, monkeypatch):
    _need(backend)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # as in test_cpu.py: a private cache
    case = CASES["wrap"]
    m = spinal_ops.SpinalLinear(case.in_features, case.out, layer_width=case.width, num_layers=case.num_layers,
                                num_splits=case.num_splits, device="cuda")
    x = torch.randn(9, case.in_features, device="cuda", requires_grad=True)
    with spinal_ops.use_backend(backend):
        expected = m(x)
        compiled = torch.compile(m, fullgraph=True)
        got = compiled(x)
    assert_close(got.detach(), expected.detach(), what=f"{backend} compiled: output")
    (gx,) = torch.autograd.grad(got.sum(), x)
    (ex,) = torch.autograd.grad(expected.sum(), x)
    assert_close(gx, ex, what=f"{backend} compiled: dx")


def test_wide_path_read_back_is_ordered_by_its_barrier():
    """Negative control: the Triton wide path stores each sub-layer's h to H and the next sub-layer reads it back,
    written by other threads of the program. With the barrier between sub-layers the forward is right; without it
    some run reads values not yet stored (H is poisoned with NaN before each run, so a stale read shows)."""
    _need("triton")
    from spinal_ops.triton_kernels import settings, spinal_fwd_triton

    from spinal_ops import reference

    case = Case(512, 600, 2, 300, 8, out=10)  # w = 300: the wide path, several column tiles per sub-layer
    assert settings.path_plan(case.width, case.out, torch.float32, torch.device("cuda")).wide
    x, params = _gpu_inputs(case)
    args = (x.detach(), *[params[k].detach() for k in PARAMS], *case.layer_args(), case.activation,
            case.negative_slope)

    def run(barrier: bool):
        poison = torch.full((case.rows, case.num_layers * case.width), float("nan"), device="cuda")
        del poison  # the caching allocator hands this block to H next
        return spinal_fwd_triton(*args, barrier=barrier)[1]

    expected = reference.spinal_forward(*args)[1]
    assert_close(run(True), expected, what="triton wide path with its barrier")
    if all(torch.equal(run(False), run(True)) for _ in range(20)):
        pytest.xfail("without the barrier every one of 20 runs happened to read H after it was stored")
