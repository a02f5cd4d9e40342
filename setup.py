"""Build of spinal_ops: one extension, spinal_ops._C.

C++ CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built whenever nvcc and a CUDA build of
PyTorch are present -- a GPU is not needed to build them. Knobs (environment variables):

  SPINAL_OPS_SKIP_CUDA=1      build the CPU kernels only (quick local builds)
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0": sm_80 and sm_90)
  SPINAL_OPS_PTXAS_REPORT     file that receives ptxas's resource report (registers, shared memory, spills)
  SPINAL_OPS_DEBUG=1          -O0 -g instead of -O3
  MAX_JOBS                    parallel compile jobs (ninja)

Install with ``pip install --no-build-isolation -e .`` so the extension is built against the installed torch.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_include_dirs():
    """CUDA headers that torch's headers include (cusparse.h, cublas_v2.h) ship in the `nvidia` pip package."""
    dirs = []
    try:
        import nvidia  # noqa: F401  (namespace package of the CUDA wheels)

        for root in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    return [d for d in dirs if os.path.isdir(d)]


def _cuda_home():
    """CUDA_HOME, else /usr/local/cuda. (torch's own guess walks up from `nvcc` on PATH, which can be a wrapper
    script in /usr/local/bin whose parent has no CUDA libraries.) Set before torch.utils.cpp_extension loads."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = os.environ["CUDA_HOME"] = "/usr/local/cuda"
    return home


def _extensions():
    cuda_home = _cuda_home()
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = _env_flag("SPINAL_OPS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math -fno-math-errno (as PyTorch itself is built): lets GCC turn the activations' selects into
    # vector blends; no result changes.
    cxx_flags = [*opt, "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
                 "-DPy_LIMITED_API=0x030a0000", "-fvisibility=hidden"]
    sources = [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    cuda_sources = [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))]

    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if nvcc is not None and not os.path.exists(nvcc):
        nvcc = None
    skip_cuda = _env_flag("SPINAL_OPS_SKIP_CUDA")
    with_cuda = bool(cuda_sources) and not skip_cuda and nvcc is not None and torch.version.cuda is not None
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ptxas_report = os.environ.get("SPINAL_OPS_PTXAS_REPORT", "")

    print("spinal_ops build configuration:", file=sys.stderr)
    print(f"  torch {torch.__version__} (CUDA build: {torch.version.cuda})", file=sys.stderr)
    print(f"  CUDA_HOME={cuda_home}  nvcc: {nvcc}", file=sys.stderr)
    print(f"  SPINAL_OPS_SKIP_CUDA={int(skip_cuda)} -> CUDA kernels {'ON' if with_cuda else 'OFF'}", file=sys.stderr)
    print(f"  TORCH_CUDA_ARCH_LIST={arch_list}", file=sys.stderr)
    print(f"  SPINAL_OPS_PTXAS_REPORT={ptxas_report or '(not kept)'}", file=sys.stderr)
    print(f"  SPINAL_OPS_DEBUG={int(debug)}", file=sys.stderr)

    common = dict(name="spinal_ops._C", py_limited_api=True, include_dirs=[os.path.join(HERE, "csrc")])
    if not with_cuda:
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)]

    nvcc_flags = [*opt, "-std=c++20", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
    common["include_dirs"] += _cuda_include_dirs()
    return [
        CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": [*cxx_flags, "-DSPINAL_OPS_WITH_CUDA"], "nvcc": nvcc_flags},
            **common,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=True)


setup(
    name="spinal_ops",
    version="0.1.0",
    description="Fused SpinalNet layers for PyTorch: C++ CPU, CUDA and Triton kernels",
    packages=["spinal_ops", "spinal_ops.triton_kernels"],
    package_dir={"spinal_ops": "spinal_ops", "spinal_ops.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
    install_requires=["torch"],
)
