"""The benchmark report's machinery (not its speed): providers share weights, timings run with the thread count
the report records, and a tiny report has every provider and ratio."""

from __future__ import annotations

import io

import pytest
import torch

from spinal_ops import benchmark
from spinal_ops.configs import SpinalConfig

TINY = SpinalConfig("tiny", 13, 3, 5, 3, 4, "relu")


@pytest.fixture
def three_threads():
    """torch's intra-op thread count set to 3 (a value no default produces), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def test_timed_steps_run_with_the_recorded_thread_count(monkeypatch, three_threads):
    """``torch.utils.benchmark.Timer`` defaults to one thread; the report must time with the threads it records."""
    seen = []
    monkeypatch.setattr(benchmark, "make_step", lambda *args: lambda: seen.append(torch.get_num_threads()))
    benchmark.time_provider(None, None, None, "forward", min_run_time=0.001)
    assert seen and set(seen) == {three_threads}, f"threads seen by the timed steps: {sorted(set(seen))}"
    assert benchmark.environment(torch.float32)["threads"] == three_threads


def test_providers_compute_the_same_function():
    providers = benchmark.make_providers(TINY, torch.float64, "cpu", compile_eager=False)
    x = torch.randn(7, TINY.in_features, dtype=torch.float64)
    fused_name = next(n for n in providers if n.startswith("fused"))
    expected = benchmark._call(*providers[fused_name], x)
    got = benchmark._call(*providers["eager"], x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=lambda m: f"eager vs {fused_name}: {m}")
    assert benchmark._call(*providers["dense"], x).shape == expected.shape


def test_tiny_report_has_every_provider_and_ratio():
    report = benchmark.run([TINY], [1, 5], modes=benchmark.MODES, dtype=torch.float64, min_run_time=0.001,
                           compile_eager=False, progress=io.StringIO())
    providers = {r["provider"] for r in report["records"]}
    assert {"eager", "dense"} <= providers and any(p.startswith("fused") for p in providers), providers
    rows = benchmark.ratios(report)
    assert len(rows) == 2 * len(benchmark.MODES)
    for r in rows:
        assert r["fused_us"] > 0 and r["fused/dense"] > 0 and r["fused/eager"] > 0, r
        assert r["flop_ratio"] == pytest.approx(TINY.flops_per_row() / TINY.dense_flops_per_row())
    assert report["environment"]["dtype"] == "float64"
    assert "tiny" in benchmark.format_table(report)
