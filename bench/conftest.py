"""pytest-benchmark suite configuration: records device, versions, dtype and threads with every result."""

from __future__ import annotations

import torch

from spinal_ops import benchmark


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["spinal_ops"] = benchmark.environment(torch.float32)
