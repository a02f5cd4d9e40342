"""pytest-benchmark suite: SpinalLinear vs the eager chain, torch.compile of it, and the dense nn.Linear layer.

Run with ``python -m pytest bench/ --benchmark-only`` (never part of the test command; nothing here asserts
speed). Filter with ``-k``, e.g. ``-k "resnet-head and B64"``. ``python -m spinal_ops bench`` prints the same
comparison side by side with ratios and a plot; both use the providers and steps of ``spinal_ops.benchmark``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from spinal_ops import benchmark as spinal_bench
from spinal_ops.configs import BENCH_BATCH_SIZES, CONFIG_BY_NAME, CONFIGS

DTYPE = torch.float32
PROVIDERS = [f"fused[{b}]" for b in spinal_bench.fused_backends(torch.device("cpu"))] + ["eager", "compiled", "dense"]


@functools.cache
def _providers(config_name: str):
    torch.manual_seed(0)
    return spinal_bench.make_providers(CONFIG_BY_NAME[config_name], DTYPE, "cpu")


@pytest.mark.parametrize("mode", spinal_bench.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rows", BENCH_BATCH_SIZES, ids=[f"B{b}" for b in BENCH_BATCH_SIZES])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_spinal_head(benchmark, cfg, rows, provider, mode):
    module, backend = _providers(cfg.name)[provider]
    x = torch.randn(rows, cfg.in_features, dtype=DTYPE)
    benchmark.extra_info.update(config=cfg.name, rows=rows, provider=provider, mode=mode, dtype=str(DTYPE),
                                threads=torch.get_num_threads(), torch=torch.__version__)
    step = spinal_bench.make_step(module, backend, x, mode)
    for _ in range(2):  # warm-up, and compilation for the compiled provider
        step()
    benchmark(step)
