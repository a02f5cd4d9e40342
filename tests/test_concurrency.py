"""Concurrency and leaks: forward and backward from several Python threads at once give the single-threaded
results, and many forward + backward calls keep memory flat."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
from helpers import INTERPRETED, Case, assert_close, backends, require_backend, run_case

import spinal_ops
from spinal_ops import SpinalLinear

THREADS = 4

# One problem per thread, all different (sizes, activation, shared weights, head / hidden), the cpu ones over
# several row tiles so that each call also runs parallel jobs of its own.
CASES = [
    Case(600, 20, 2, 8, 4, activation="gelu"),
    Case(300, 13, 3, 5, 6, shared=True, activation="tanh"),
    Case(520, 24, 8, 7, 10, head=False, activation="leaky_relu", negative_slope=-0.2),
    Case(257, 9, 2, 6, 3, bias=False, activation="silu", layout="transposed"),
]
SMALL_CASES = [c.replace(rows=r) for c, r in zip(CASES, (20, 9, 17, 5), strict=True)]  # the Triton interpreter is slow


# Triton's interpreter is process-global; the launchers serialise interpreted launches with a lock
# (triton_kernels/settings.py launch_guard), which this test exercises under TRITON_INTERPRET=1.
@pytest.mark.parametrize("backend", backends("cpu", "reference", "gemm", "triton"))
def test_threads_match_single_threaded_results(backend):
    require_backend(backend)
    device = "cuda" if backend == "triton" and not INTERPRETED else "cpu"
    cases = SMALL_CASES if backend == "triton" else CASES
    rounds = 2 if backend == "triton" else 5
    dtype = torch.float32
    expected = [run_case(backend, case, dtype, device=device, seed=10 * k, cot_seed=10 * k + 1)
                for k, case in enumerate(cases)]
    start = threading.Barrier(THREADS)
    results: list[list] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []

    def worker(k):
        try:
            start.wait()
            for _ in range(rounds):
                results[k].append(run_case(backend, cases[k], dtype, device=device, seed=10 * k, cot_seed=10 * k + 1))
        except BaseException as exc:  # reported below, with the thread's case
            errors.append(exc)
            start.abort()

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in pool), f"backend={backend}: a thread did not finish"
    assert not errors, f"backend={backend}: a thread raised {errors[0]!r}"
    for k, case in enumerate(cases):
        assert len(results[k]) == rounds, f"backend={backend} case={case.id}: {len(results[k])} of {rounds} rounds"
        for r, got in enumerate(results[k]):
            what = f"backend={backend} case={case.id} dtype=float32 thread {k} round {r}"
            for name, ref in expected[k].items():
                if ref is None:  # a gradient the output does not depend on
                    assert got[name] is None, f"{what}: {name}"
                    continue
                # Each call computes exactly what the single-threaded call computed; the cpu and triton kernels
                # are deterministic, the reference runs PyTorch ops whose results do not depend on other threads.
                assert_close(got[name], ref, what=f"{what}: {name}")
                if backend != "reference":
                    assert torch.equal(got[name], ref), f"{what}: {name} not bitwise equal to the 1-thread run"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


LEAK_CALLS = 10_000
LEAK_BOUND = 16 * 2**20  # 16 MiB: a leak of a single (B, L*w) scratch per call would be ~80 MiB


def test_threads_training_one_eval_mode_layer():
    """Threads running training steps of one eval-mode batch-norm layer (its fold's buffers shared): no thread ever
    writes a buffer another one's graph still holds, and every gradient is the single-threaded one."""
    torch.manual_seed(0)
    # weights large enough (8 MB) that one thread's product is still being written while another picks a buffer
    layer = SpinalLinear(2048, 5, layer_width=512, num_layers=4, dropout=0.2, batch_norm=True).eval()
    params = [p for p in layer.parameters() if p.requires_grad]
    xs = [torch.randn(2, 2048) for _ in range(4)]

    def grads(x):
        return torch.autograd.grad(layer(x).square().sum(), params)

    expected = [grads(x) for x in xs]
    errors, results = [], {}

    def work(i):
        try:
            for _ in range(50):
                results[i] = grads(xs[i])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} threads failed: {errors[0]!r}"
    for i, want in enumerate(expected):
        for k, (got, ref) in enumerate(zip(results[i], want, strict=True)):
            assert torch.equal(got, ref), f"thread {i}: gradient {k} differs from the single-threaded one"


@pytest.fixture
def one_thread(threads):
    """One intra-op thread: keeps 10,000 calls within seconds on a loaded machine (tiny problems in an OpenMP region
    whose second thread waits for a busy core cost ~20 ms each instead of ~0.7 ms)."""
    threads(1)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS read from /proc/self/statm (Linux)")
def test_memory_flat_over_10000_forward_backward_calls(one_thread):
    require_backend("cpu")
    torch.manual_seed(0)
    module = SpinalLinear(64, 10, layer_width=16, num_layers=4, activation="gelu")
    x = torch.randn(32, 64, requires_grad=True)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with spinal_ops.use_backend("cpu"):
            module(x).square().mean().backward()

    for _ in range(500):  # warm-up: allocator caches, autograd and dispatcher first-call state
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(LEAK_CALLS):
        step()
    gc.collect()
    growth = _rss_bytes() - before
    what = f"backend=cpu SpinalLinear(64, 10, w=16, L=4, gelu) x=(32, 64) float32, {LEAK_CALLS} forward+backward"
    assert growth < LEAK_BOUND, f"{what}: RSS grew by {growth / 2**20:.1f} MiB (bound {LEAK_BOUND / 2**20:.0f} MiB)"
    assert module.weight_x.grad is not None and torch.isfinite(module.weight_x.grad).all(), f"{what}: bad gradient"
