"""The benchmark configurations: the SpinalNet heads of the original repository and two custom layers.

One table, imported by the report command (``python -m spinal_ops bench``), the pytest-benchmark suite in
``bench/`` and the GPU cost model (``spinal_ops/gpu_model.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from . import reference


class SpinalConfig(NamedTuple):
    name: str
    in_features: int  # D
    num_splits: int  # K
    width: int  # w
    num_layers: int  # L
    out: int  # head outputs
    activation: str

    @property
    def chunk(self) -> int:
        return reference.chunk_size(self.in_features, self.num_splits)

    def flops_per_row(self) -> int:
        return reference.flops_per_row(self.chunk, self.width, self.num_layers, self.out)

    def dense_flops_per_row(self) -> int:
        return reference.dense_flops_per_row(self.in_features, self.width, self.num_layers, self.out)


CONFIGS: list[SpinalConfig] = [
    SpinalConfig("resnet-head", 512, 2, 20, 4, 10, "relu"),
    SpinalConfig("vgg-head", 512, 2, 128, 4, 10, "relu"),
    SpinalConfig("wide-resnet-head", 2048, 2, 512, 4, 10, "relu"),
    SpinalConfig("vit-custom", 1024, 8, 20, 8, 10, "relu"),
    SpinalConfig("wide-resnet-custom", 2048, 2, 512, 10, 10, "relu"),
    SpinalConfig("regression", 8, 2, 50, 6, 1, "leaky_relu"),
]

CONFIG_BY_NAME = {c.name: c for c in CONFIGS}

# Batch sizes of the CPU report, and of the GPU cost model (which adds 65536).
BENCH_BATCH_SIZES: tuple[int, ...] = (1, 64, 1024)
ROOFLINE_BATCH_SIZES: tuple[int, ...] = (1, 64, 1024, 65536)
