"""Determinism: bitwise-identical outputs and gradients across runs and thread counts, and no order-dependent
atomics in the GPU kernels (so ``torch.use_deterministic_algorithms(True)`` needs no fallback)."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from helpers import COLUMN_SPLIT_CASES, DTYPE_NAMES, INTERPRETED, Case, backends, require_backend, run_case

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Several row tiles of the cpu kernel (RowTiles) and the weight-gradient GEMMs over all rows, where a
# threaded BLAS would split the reduction by thread count; wrap-around chunks, shared slots (partials added
# afterwards), hidden mode, act' from a recomputed Z; one-tile batches whose products are split into column blocks.
CPU_CASES = [*COLUMN_SPLIT_CASES.values(),
    Case(257, 13, 2, 5, 4),
    Case(1100, 200, 2, 64, 4, out=10),
    Case(1100, 24, 8, 7, 10, activation="gelu", shared=True),
    Case(700, 30, 3, 16, 6, activation="leaky_relu", negative_slope=-0.2, head=False),
    Case(513, 17, 2, 9, 3, bias=False, activation="silu", layout="transposed"),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _assert_bitwise(first, second, what):
    assert first.keys() == second.keys(), f"{what}: tensors {sorted(first)} vs {sorted(second)}"
    for name in first:
        a, b = first[name], second[name]
        if a is None:  # a gradient the output does not depend on (weight_h of L = 1)
            assert b is None, f"{what}: {name} None in one run only"
            continue
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert torch.equal(a, b), f"{what}: {name} {tuple(a.shape)} not bitwise equal (max abs diff {diff:.3e})"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_bitwise_across_runs_and_thread_counts(case, dtype, threads):
    require_backend("cpu")
    threads(2)
    first = run_case("cpu", case, dtype, seed=5, cot_seed=6)
    _assert_bitwise(first, run_case("cpu", case, dtype, seed=5, cot_seed=6),
                    f"backend=cpu case={case.id} dtype={DTYPE_NAMES[dtype]} rerun")
    threads(1)
    _assert_bitwise(first, run_case("cpu", case, dtype, seed=5, cot_seed=6),
                    f"backend=cpu case={case.id} dtype={DTYPE_NAMES[dtype]} 2 threads vs 1 thread")


@pytest.mark.parametrize("backend", backends("reference", "cpu", "gemm", "triton"))
def test_use_deterministic_algorithms_runs_and_agrees(backend):
    """Every backend runs under ``torch.use_deterministic_algorithms(True)`` (none needs an order-dependent atomic,
    so none raises or falls back) and gives the same bits as without it."""
    require_backend(backend)
    device = "cuda" if backend == "triton" and not INTERPRETED else "cpu"
    case = Case(257, 13, 3, 5, 4, shared=True) if backend != "triton" else Case(70, 13, 3, 5, 4, shared=True)
    plain = run_case(backend, case, torch.float32, device=device, seed=5, cot_seed=6)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        strict = run_case(backend, case, torch.float32, device=device, seed=5, cot_seed=6)
        again = run_case(backend, case, torch.float32, device=device, seed=5, cot_seed=6)
    finally:
        torch.use_deterministic_algorithms(saved)
    what = f"backend={backend} case={case.id} dtype=float32"
    _assert_bitwise(plain, strict, f"{what}: deterministic mode vs default")
    _assert_bitwise(strict, again, f"{what}: deterministic mode, rerun")


GPU_SOURCES = sorted([*ROOT.glob("triton_kernels/*.py"), *ROOT.glob("csrc/cuda/*.cu"), *ROOT.glob("csrc/cuda/*.cuh")])
ATOMIC = re.compile(r"\btl\.atomic_\w+|\batomic(Add|Sub|Max|Min|CAS|Exch|Inc|Dec)\b")


@pytest.mark.parametrize("path", GPU_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_gpu_kernels_use_no_atomics(path):
    """Floating-point atomics make the summation order depend on scheduling. The GPU kernels reduce in a fixed
    order instead, so they are deterministic without a fallback under ``use_deterministic_algorithms``. A kernel
    that adds an atomic must add that fallback (and change this test)."""
    code = "\n".join(line.split("//")[0].split("#")[0] for line in path.read_text().splitlines())
    found = [m.group(0) for m in ATOMIC.finditer(code)]
    assert not found, f"{path.relative_to(ROOT)}: uses {sorted(set(found))} (order-dependent under concurrency)"
