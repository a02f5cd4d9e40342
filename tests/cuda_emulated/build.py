"""Build (once, cached) and load the emulated CUDA kernels: the kernel sources of csrc/cuda compiled by the
host C++ compiler against the SIMT emulator of csrc/cuda/simt.h."""

from __future__ import annotations

import functools
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
BUILD_DIR = ROOT / "build" / "emulated"
SOURCES = [ROOT / "csrc" / "spinal_args.cpp", ROOT / "tests" / "cuda_emulated" / "spinal_emulated.cpp",
           ROOT / "tests" / "cuda_emulated" / "module.cpp"]
# -O1: the emulated wmma is 32x redundant per warp, so some optimisation pays; -O2 doubles the build time.
CFLAGS = ["-std=c++20", "-O1", "-fvisibility=hidden", "-Wno-unknown-pragmas"]


def cuda_headers_available() -> bool:
    """The host build needs cuda_fp16.h / cuda_bf16.h (host-usable headers of the CUDA toolkit)."""
    return (pathlib.Path(CUDA_HOME) / "include" / "cuda_fp16.h").exists()


@functools.cache
def load():
    """The compiled module (built on first use, then reused from build/emulated)."""
    from torch.utils.cpp_extension import load as load_extension

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    return load_extension(
        name="spinal_ops_emulated",
        sources=[str(s) for s in SOURCES],
        extra_cflags=CFLAGS,
        extra_include_paths=[str(ROOT / "csrc"), str(pathlib.Path(CUDA_HOME) / "include")],
        build_directory=str(BUILD_DIR),
        verbose=False,
    )
