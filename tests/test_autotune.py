"""SPINAL_OPS_AUTOTUNE=1: the automatic backend choice measured per problem (spinal_ops/ops.py, _tuned_backend)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

import spinal_ops
from spinal_ops import SpinalLinear, backends, ops


@pytest.fixture
def autotune(monkeypatch):
    monkeypatch.setattr(backends, "_AUTOTUNE", True)
    monkeypatch.setattr(backends, "_tuned", {})
    monkeypatch.setattr(backends, "_ENV_BACKEND", None)
    return backends._tuned


def fake_times(monkeypatch, seconds: dict):
    """Replace the timing with fixed seconds per backend, recording what was timed."""
    timed = []

    def time_backend(name, x2d, params, spec, mode):
        timed.append((name, x2d.shape[0], mode))
        return seconds[name]

    monkeypatch.setattr(ops, "_time_backend", time_backend)
    return timed


def test_the_fastest_candidate_is_chosen_once_per_problem(autotune, monkeypatch):
    pytest.importorskip("spinal_ops._C")
    timed = fake_times(monkeypatch, {"cpu": 2.0, "reference": 1.0})
    m = SpinalLinear(12, 3, layer_width=5, num_layers=3)
    x = torch.randn(4, 12)
    calls = []
    real = ops.forward_op
    monkeypatch.setattr(ops, "forward_op", lambda name: calls.append(name) or real(name))
    with torch.no_grad():
        m(x)
        m(x)
    assert timed == [("cpu", 4, "forward"), ("reference", 4, "forward")]  # timed on first sight only
    assert calls == ["reference", "reference"]
    m(x)  # autograd records this call: another problem
    assert timed[2:] == [("cpu", 4, "fwd+bwd"), ("reference", 4, "fwd+bwd")]
    assert calls[-1] == "reference" and len(autotune) == 2
    monkeypatch.setattr(ops, "_time_backend", lambda *a: pytest.fail("timed again"))
    with torch.no_grad(), spinal_ops.use_backend("cpu"):  # forcing wins over the measurement
        m(x)
    assert calls[-1] == "cpu"


def test_measured_choice_runs_and_leaves_no_trace(autotune):
    """Real timings: the chosen backend is a candidate, the output and gradients are the reference's, and timing
    touched neither the user's .grad nor the RNG."""
    m = SpinalLinear(24, 5, layer_width=6, num_layers=4, num_splits=3, dtype=torch.float64)
    x = torch.randn(7, 24, dtype=torch.float64, requires_grad=True)
    rng = torch.random.get_rng_state()
    y = m(x)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert x.grad is None and all(p.grad is None for p in m.parameters())
    (choice,) = autotune.values()
    assert choice in backends.tuning_candidates("cpu", torch.float64)
    with spinal_ops.use_backend("reference"):
        ref = m(x)
    assert_close(y, ref, what=f"autotuned ({choice})")
    cot = torch.randn(y.shape, dtype=torch.float64)
    leaves = {"x": x, **dict(m.named_parameters())}
    expected = torch.autograd.grad(ref, list(leaves.values()), cot)
    y.backward(cot)
    for (name, leaf), e in zip(leaves.items(), expected, strict=True):
        assert_close(leaf.grad, e, what=f"autotuned ({choice}) d{name}")


def test_candidates_are_the_backends_that_run_the_tensors():
    assert backends.tuning_candidates("cpu", torch.float32)[-1] == "reference"
    assert "triton" not in backends.tuning_candidates("cpu", torch.float32)  # the interpreter is not a candidate
    assert backends.tuning_candidates("cpu", torch.int32) == ("reference",)


def test_the_variable_is_read_at_import():
    code = "import spinal_ops.backends as b; print(b.autotune_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "SPINAL_OPS_AUTOTUNE": value}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.stdout.strip() == expected, done.stderr
