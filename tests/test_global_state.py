"""No op of spinal_ops changes global state: thread settings (torch, OpenMP, MKL), RNG, default dtype, modes.

ATen initialises its thread settings lazily, once per OS thread, so a bug that changes them shows on the first
spinal call of a thread. Each check therefore runs its calls in a fresh thread (and the issue's example in a fresh
interpreter), then compares the state before and after.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from helpers import COLUMN_SPLIT_CASES, Case, backends, functional_kwargs, make_inputs, require_backend

import spinal_ops


def global_state() -> dict:
    """Everything a kernel library must leave as it found it (RNG states are compared as bytes)."""
    info = torch.__config__.parallel_info()
    pools = dict(re.findall(r"(omp_get_max_threads|mkl_get_max_threads)\(\) : (\d+)", info))
    return {
        "torch.get_num_threads": torch.get_num_threads(),
        "torch.get_num_interop_threads": torch.get_num_interop_threads(),
        **pools,
        "rng": bytes(torch.random.get_rng_state().numpy()),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
    }


def assert_state_kept(fn, what: str) -> None:
    """Run ``fn`` in a new OS thread (whose ATen thread settings are not initialised yet) and then in this one;
    in each, the state after must equal the state before (OpenMP keeps its thread count per thread)."""
    failures = []

    def checked():
        before = global_state()
        fn()
        after = global_state()
        if after != before:
            failures.append(", ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after[k]))

    def target():
        try:
            checked()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
            failures.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    checked()
    for f in failures:
        if isinstance(f, BaseException):
            raise f
    assert not failures, f"{what}: global state changed: {failures[0]}"


# Sizes that take every parallel structure of the cpu kernels: one row tile below the parallel threshold, one row
# tile split into column blocks (forward and backward), several row tiles.
STATE_CASES = [
    Case(7, 13, 3, 5, 4),
    COLUMN_SPLIT_CASES["split-z-carry-dx"].replace(rows=64),
    Case(300, 301, 2, 200, 3, activation="gelu"),
]


@pytest.mark.parametrize("backend", backends("reference", "cpu", "triton"))
@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: c.id)
def test_ops_leave_global_state_unchanged(backend, case):
    require_backend(backend)
    if backend == "triton" and case.rows * case.in_features > 10_000:
        case = case.replace(rows=3)  # the interpreter is slow; the state check does not need the size
    dtype = torch.float32 if backend != "reference" else torch.float64
    x, params = make_inputs(case, dtype=dtype)

    def calls():
        with spinal_ops.use_backend(backend):
            with torch.no_grad():  # inference
                spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
            out = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))  # training step
            out.square().sum().backward()
            # the backward op alone, every gradient and none but dx
            ys = spinal_ops.spinal_linear(x, **params, **functional_kwargs(case))
            torch.autograd.grad(ys.sum(), [x])

    assert_state_kept(calls, f"{backend} {case.id}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_paths_leave_global_state_unchanged(mode):
    """SpinalLinear's own paths: fused, batch-norm folding (eval) and the unfused blocks (train, no dropout)."""
    m = spinal_ops.SpinalLinear(301, 10, layer_width=200, num_layers=3, batch_norm=True).train(mode == "train")
    x = torch.randn(64, 301, requires_grad=True)
    assert_state_kept(lambda: m(x).sum().backward(), f"SpinalLinear {mode}")


ISSUE_EXAMPLE = """
import torch, spinal_ops
before = torch.get_num_threads()
spinal_ops.SpinalLinear(2048, 10, layer_width=512, split_mode="alternate")(torch.randn(64, 2048))
print(before, torch.get_num_threads())
"""


def test_first_call_in_a_new_process_keeps_the_thread_count():
    """The reported case: the first call of a process (a one-tile batch split into column blocks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", ISSUE_EXAMPLE], capture_output=True, text=True, env=env, check=True)
    before, after = out.stdout.split()
    assert (before, after) == ("2", "2"), out.stdout + out.stderr
