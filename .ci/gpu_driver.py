"""Tiny driver of every GPU kernel for compute-sanitizer (.ci/gpu_check.sh): one small forward and backward of each
CUDA kernel instantiation family (fp64 / fp32 / fp16 / bf16, fast and general width path, head accumulator on chip
and in the workspace, > 48 KB dynamic shared memory, tf32, the weight gradients in pieces and their reduce kernel) and
of the Triton kernels (fast and wide path).

Run as ``python .ci/gpu_driver.py [cuda|triton|all]``; prints one line per kernel and exits 0 when every result
matches the reference, 1 otherwise (sanitizer findings are compute-sanitizer's own exit status).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.setdefault("SPINAL_OPS_TRITON_AUTOTUNE", "0")  # one compile per kernel: no timing runs to sanitize

import torch  # noqa: E402
from helpers import Case  # noqa: E402
from kernel_paths import VARIANTS, Variant, check_variant, gpu_backward, gpu_forward  # noqa: E402

import spinal_ops  # noqa: E402


def _on(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def triton_forward(*args):
    import spinal_ops.triton_kernels  # noqa: F401  (registers the Triton ops)

    h_all, y = torch.ops.spinal_ops.spinal_forward_triton(*[_on(a, "cuda") for a in args[:-2]])
    return h_all.cpu(), y.cpu()


def triton_backward(*args):
    return tuple(g.cpu() for g in torch.ops.spinal_ops._spinal_backward_triton(*[_on(a, "cuda") for a in args]))


def variants(kind: str) -> list[Variant]:
    """Small variants: every path of the list, batches cut to at most 33 rows (the sanitizers are slow), and for cuda
    one batch of 130 rows: the weight gradients reduced in two pieces and the reduce kernel that sums them."""
    if kind == "cuda":
        return [Variant(v.case.replace(rows=min(v.case.rows, 33)), v.dtype, v.path, v.tf32) for v in VARIANTS] + [
            Variant(Case(130, 9, 2, 4, 2, out=3), torch.float32)]
    wide = Case(9, 40, 2, 300, 3, out=70, activation="gelu")  # w = 300: the wide path in every dtype
    return [Variant(Case(7, 13, 3, 5, 4), torch.float32), Variant(Case(7, 12, 3, 4, 6, tie=(0, 1, 2, 1, 2, 1),
                                                                       activation="silu"), torch.bfloat16),
            Variant(wide, torch.float32), Variant(wide, torch.float16), Variant(wide, torch.float64)]


def main(argv) -> int:
    kinds = argv[1:] or ["all"]
    kinds = ["cuda", "triton"] if "all" in kinds else kinds
    runners = {"cuda": (gpu_forward, gpu_backward), "triton": (triton_forward, triton_backward)}
    failures = 0
    for kind in kinds:
        if kind not in spinal_ops.available_backends():
            print(f"{kind}: not available ({', '.join(spinal_ops.available_backends())}); skipped")
            continue
        forward, backward = runners[kind]
        for v in variants(kind):
            try:
                check_variant(forward, backward, v, f"{kind} {v.id}")
                print(f"{kind} {v.id}: ok", flush=True)
            except AssertionError as exc:
                failures += 1
                print(f"{kind} {v.id}: FAILED {exc}", flush=True)
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
