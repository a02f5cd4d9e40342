"""pytest-benchmark suite: SpinalLinear vs the eager chain, torch.compile of it, and the dense nn.Linear layer.

Run with ``python -m pytest bench/ --benchmark-only`` (never part of the test command; nothing here asserts
speed). Filter with ``-k``, e.g. ``-k "resnet-head and B64"``. ``python -m spinal_ops bench`` prints the same
comparison side by side with ratios, spread, the measured floor and a plot; both use the providers and steps of
``spinal_ops.benchmark``. As there, the compiled provider is compiled afresh for every test (dynamo reset first,
graphs counted in ``extra_info``), and every test runs on the thread count it records.
"""

from __future__ import annotations

import functools

import pytest
import torch

from spinal_ops import benchmark as spinal_bench
from spinal_ops.configs import BENCH_BATCH_SIZES, CONFIG_BY_NAME, CONFIGS

DTYPE = torch.float32
PROVIDERS = [f"fused[{b}]" for b in spinal_bench.fused_backends(torch.device("cpu"), DTYPE)] + [
    "eager", "compiled", "dense"]


@functools.cache
def _providers(config_name: str):
    torch.manual_seed(0)
    return spinal_bench.make_providers(CONFIG_BY_NAME[config_name], DTYPE, "cpu")


@pytest.mark.parametrize("mode", spinal_bench.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rows", BENCH_BATCH_SIZES, ids=[f"B{b}" for b in BENCH_BATCH_SIZES])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_spinal_head(benchmark, cfg, rows, provider, mode):
    p = _providers(cfg.name)[provider]
    module, counter = spinal_bench.compile_fresh(p.module) if p.compiled else (p.module, None)
    x = torch.randn(rows, cfg.in_features, dtype=DTYPE)
    threads = torch.get_num_threads()
    step = spinal_bench.make_step(module, p.backend, x, mode)
    for _ in range(2):  # warm-up, and compilation for the compiled provider
        step()
    benchmark.extra_info.update(config=cfg.name, rows=rows, provider=provider, mode=mode, dtype=str(DTYPE),
                                threads=threads, torch=torch.__version__)
    if counter is not None:
        assert counter.graphs >= 1, "torch.compile compiled no graph"
        benchmark.extra_info["graphs"] = counter.graphs
    assert torch.get_num_threads() == threads, "the provider changed torch's thread count while warming up"
    benchmark(step)
    assert torch.get_num_threads() == threads, "the provider changed torch's thread count while timed"
