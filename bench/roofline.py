"""Roofline MODEL of the fused spinal forward on an NVIDIA H100 SXM. Not a measurement: no GPU was used.

For each configuration of ``spinal_ops/configs.py`` and batch size B: forward FLOPs (``reference.flops_per_row``, and
the dense ``nn.Linear(D, L*w)`` + head it replaces, ``reference.dense_flops_per_row``), the minimum bytes the
fused forward must move through HBM (x once, every parameter once, H and y written once; H is written because
the op returns it for the backward), and the time floor ``max(FLOPs / peak, bytes / bandwidth)`` for

- bf16 storage on the tensor cores: dense BF16 tensor-core peak, 2-byte elements;
- fp32 storage on the CUDA cores: non-tensor FP32 peak, 4-byte elements (``tl.dot`` with ieee precision).

Run ``python bench/roofline.py`` for the table; import :func:`roofline_rows` for the numbers.
"""

from __future__ import annotations

import dataclasses

from spinal_ops import reference
from spinal_ops.benchmark import parameter_count, x_columns
from spinal_ops.configs import CONFIGS, ROOFLINE_BATCH_SIZES, SpinalConfig

# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column:
#   BF16 Tensor Core 1,979 TFLOPS is quoted *with sparsity*; the dense rate is half: 989.5 TFLOPS.
#   FP32 (non-tensor) 67 TFLOPS.  GPU memory bandwidth (HBM3) 3.35 TB/s.
H100_BF16_DENSE_FLOPS = 989.5e12
H100_FP32_FLOPS = 67e12
H100_HBM_BYTES_PER_S = 3.35e12


@dataclasses.dataclass(frozen=True)
class RooflineRow:
    config: SpinalConfig
    rows: int  # B
    flops: int  # fused forward
    dense_flops: int  # nn.Linear(D, L*w) + head
    bytes_bf16: int
    bytes_fp32: int
    floor_bf16_s: float
    floor_fp32_s: float
    bound_bf16: str  # "compute" or "memory"
    bound_fp32: str


def min_elements(cfg: SpinalConfig, rows: int) -> int:
    """Elements the forward must move at least once: the x columns any chunk reads, the parameters, H and y."""
    return rows * x_columns(cfg) + parameter_count(cfg) + rows * cfg.num_layers * cfg.width + rows * cfg.out


def roofline_row(cfg: SpinalConfig, rows: int) -> RooflineRow:
    c = reference.chunk_size(cfg.in_features, cfg.num_splits)
    flops = rows * reference.flops_per_row(c, cfg.width, cfg.num_layers, cfg.out)
    dense = rows * reference.dense_flops_per_row(cfg.in_features, cfg.width, cfg.num_layers, cfg.out)
    elems = min_elements(cfg, rows)
    b16, b32 = 2 * elems, 4 * elems
    t16 = (flops / H100_BF16_DENSE_FLOPS, b16 / H100_HBM_BYTES_PER_S)
    t32 = (flops / H100_FP32_FLOPS, b32 / H100_HBM_BYTES_PER_S)
    return RooflineRow(cfg, rows, flops, dense, b16, b32, max(t16), max(t32),
                       "compute" if t16[0] >= t16[1] else "memory", "compute" if t32[0] >= t32[1] else "memory")


def roofline_rows() -> list[RooflineRow]:
    return [roofline_row(cfg, rows) for cfg in CONFIGS for rows in ROOFLINE_BATCH_SIZES]


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.2f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e3:.3f} ms"


def format_table(rows: list[RooflineRow]) -> str:
    head = (f"{'config':<20} {'B':>6} {'fused MFLOP':>12} {'dense MFLOP':>12} {'bf16 MB':>9} {'fp32 MB':>9} "
            f"{'floor bf16':>12} {'bound':>7} {'floor fp32':>12} {'bound':>7}")
    lines = [
        "MODEL, not a measurement: H100 SXM time floors of the fused spinal forward = max(FLOPs / peak, bytes / HBM).",
        f"Peaks: BF16 dense tensor core {H100_BF16_DENSE_FLOPS / 1e12:.1f} TFLOP/s, FP32 non-tensor "
        f"{H100_FP32_FLOPS / 1e12:.0f} TFLOP/s, HBM3 {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s (NVIDIA H100 datasheet).",
        "Bytes: x columns read + parameters + H and y written, once each. Launch latency (~2-5 us) not included.",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r.config.name:<20} {r.rows:>6} {r.flops / 1e6:>12.3f} {r.dense_flops / 1e6:>12.3f} "
            f"{r.bytes_bf16 / 1e6:>9.3f} {r.bytes_fp32 / 1e6:>9.3f} {_fmt_time(r.floor_bf16_s):>12} "
            f"{r.bound_bf16:>7} {_fmt_time(r.floor_fp32_s):>12} {r.bound_fp32:>7}"
        )
    return "\n".join(lines)


def main() -> None:
    print(format_table(roofline_rows()))


if __name__ == "__main__":
    main()
