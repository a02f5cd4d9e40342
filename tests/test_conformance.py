"""Conformance: every kernel backend against the reference, the output and every gradient, under the one tolerance
rule (tests/helpers.py, :func:`helpers.check_against_reference`).

One matrix: backend (helpers.BACKENDS: cpu, gemm, triton, cuda, the CUDA kernels under the emulator) x case x
dtype.
Backends not available here are skipped at collection time (tests/conftest.py). What is specific to a backend
(launch counts, tile paths, thread schedules, GPU streams) stays in that backend's own test file.
"""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, CASES, COLUMN_SPLIT_CASES, DTYPE_NAMES, check_against_reference, require_backend

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Per backend: the cases and the dtypes it runs. The cpu backend's column-split cases are one-tile batches wide
# enough to split its products into column blocks.
MATRIX = {
    "cpu": ([*CASES.values(), *COLUMN_SPLIT_CASES.values()], ALL_DTYPES),
    "gemm": (list(CASES.values()), ALL_DTYPES),
    "triton": (list(CASES.values()), ALL_DTYPES),  # bfloat16 too: the interpreter upcasts tl.dot operands
    "cuda": (list(CASES.values()), ALL_DTYPES),
    # float16 / bfloat16 of the emulated kernels (wmma) are exercised by tests/kernel_paths.py's variants, under
    # three thread schedules; here the module path in float64 and float32 (the emulator is slow on 16-bit wmma)
    "emulated": (list(CASES.values()), [torch.float64, torch.float32]),
}


def _matrix():
    for param in BACKENDS:
        (backend,) = param.values
        cases, dtypes = MATRIX[backend]
        for case in cases:
            for dtype in dtypes:
                yield pytest.param(backend, case, dtype, marks=param.marks,
                                   id=f"{backend}-{case.id}-{DTYPE_NAMES[dtype]}")


@pytest.mark.parametrize("backend,case,dtype", list(_matrix()))
def test_matches_reference(backend, case, dtype):
    require_backend(backend)
    check_against_reference(backend, case, dtype)
