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
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
OLDEST_TORCH = (2, 8)
NEWEST_TORCH = (2, 15)
SUPPORTED = "torch 2.8 to 2.15, triton 3.4 to 3.9 (README: Install and compatibility)"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _pip_cuda_include_dirs():
    """Headers that torch's CUDA headers include but a toolkit may lack (cusparse.h, cublas_v2.h): the `nvidia` pip
    packages torch depends on ship them. They are searched *after* the toolkit's own headers (-idirafter), so that
    nvcc always reads the runtime headers of its own release (a newer release's headers stop an older nvcc)."""
    dirs = []
    try:
        import nvidia  # noqa: F401  (namespace package of the CUDA wheels)

        for root in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _nvcc_release(nvcc: str) -> tuple[int, int] | None:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _check_cuda_pair(nvcc: str, torch_cuda: str) -> tuple[int, int] | None:
    """nvcc's release; stops the build when it cannot build for this torch (a different CUDA major release)."""
    release = _nvcc_release(nvcc)
    torch_major = int(torch_cuda.split(".")[0])
    if release is not None and release[0] != torch_major:
        sys.exit(
            f"spinal_ops: nvcc {release[0]}.{release[1]} ({nvcc}) cannot build CUDA kernels for this torch, which "
            f"was built with CUDA {torch_cuda} (the major releases differ). Install a CUDA {torch_major}.x toolkit "
            f"(set CUDA_HOME), or build the CPU kernels only with SPINAL_OPS_SKIP_CUDA=1."
        )
    return release


def _target_torch_version() -> str | None:
    """The torch that the interpreter running this build sees without the build's own sys.path (pip's build
    isolation puts a separate torch first); None when it has none."""
    probe = "import importlib.metadata as m\ntry: print(m.version('torch'))\nexcept m.PackageNotFoundError: pass"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONNOUSERSITE")}
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, env=env)
    return out.stdout.strip() or None


def _check_build_torch(torch_version: str) -> None:
    """Stop an isolated build (pip's default) against a torch other than the one the extension will run with:
    the result would fail to load (undefined symbols) or pull in another torch."""
    target = _target_torch_version()
    if target is not None and target != torch_version:
        sys.exit(
            f"spinal_ops: this build would compile against torch {torch_version}, but the environment it installs "
            f"into has torch {target}. The extension must be built against the torch it runs with: install with\n"
            f"    pip install --no-build-isolation .        (or -e . for a source checkout)\n"
            f"after `pip install -r requirements.txt` (or the build tools: setuptools wheel ninja)."
        )


def _nvcc_with_report(nvcc: str, report: str) -> str:
    """A wrapper around nvcc that appends its output (ptxas's resource report with -Xptxas -v) to `report`."""
    wrapper = os.path.join(HERE, "build", "nvcc_with_report.sh")
    os.makedirs(os.path.dirname(wrapper), exist_ok=True)
    with open(wrapper, "w") as f:
        f.write(f'''#!/usr/bin/env bash
# Written by setup.py: nvcc, its messages also appended to SPINAL_OPS_PTXAS_REPORT.
set -o pipefail
{nvcc} "$@" 2>&1 | tee -a {shlex.quote(report)}
''')
    os.chmod(wrapper, 0o755)
    open(report, "w").close()
    return wrapper


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

    torch_version = importlib.metadata.version("torch")
    _check_build_torch(torch_version)
    release_of_torch = tuple(int(part) for part in torch_version.split("+")[0].split(".")[:2])
    if release_of_torch < OLDEST_TORCH:
        sys.exit(f"spinal_ops: torch {torch_version} is older than the oldest supported release, "
                 f"{OLDEST_TORCH[0]}.{OLDEST_TORCH[1]} (supported: {SUPPORTED})")
    release = _check_cuda_pair(nvcc, torch.version.cuda) if with_cuda else None

    config = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": with_cuda,
        "nvcc": f"{release[0]}.{release[1]}" if release else None,
        "cuda_arch_list": arch_list if with_cuda else None,
        "debug": debug,
    }
    banner = [
        "spinal_ops build configuration:",
        f"  torch {torch_version} (CUDA build: {torch.version.cuda})"
        + (f"  [newer than the newest tested, {NEWEST_TORCH[0]}.{NEWEST_TORCH[1]}]"
           if release_of_torch > NEWEST_TORCH else ""),
        f"  CUDA_HOME={cuda_home}  nvcc: {nvcc}" + (f" (release {config['nvcc']})" if release else ""),
        f"  SPINAL_OPS_SKIP_CUDA={int(skip_cuda)} -> CUDA kernels {'ON' if with_cuda else 'OFF'}",
        f"  TORCH_CUDA_ARCH_LIST={arch_list}",
        f"  SPINAL_OPS_PTXAS_REPORT={ptxas_report or '(not kept)'}",
        f"  SPINAL_OPS_DEBUG={int(debug)}",
    ]
    print("\n".join(banner), file=sys.stderr)
    BUILD_INFO.update(config)

    common = dict(name="spinal_ops._C", py_limited_api=True, include_dirs=[os.path.join(HERE, "csrc")])
    if not with_cuda:
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)]

    after = [arg for d in _pip_cuda_include_dirs() for arg in ("-idirafter", d)]
    nvcc_flags = [*opt, "-std=c++20", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr",
                  *(f"-Xcompiler={arg}" for arg in after)]
    if ptxas_report:
        os.environ["PYTORCH_NVCC"] = _nvcc_with_report(os.environ.get("PYTORCH_NVCC", nvcc),
                                                       os.path.abspath(ptxas_report))
    return [
        CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": [*cxx_flags, *after, "-DSPINAL_OPS_WITH_CUDA"], "nvcc": nvcc_flags},
            **common,
        )
    ]


def _requires() -> list[str]:
    """torch of the major.minor release the extension is built against (its C++ ABI changes between them)."""
    major, minor = importlib.metadata.version("torch").split(".")[:2]
    return [f"torch=={major}.{minor}.*"]


BUILD_INFO: dict = {}  # how _C is built, recorded in spinal_ops/_build_info.py when it is


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithInfo(BuildExtension):
        """Writes spinal_ops/_build_info.py (read by `python -m spinal_ops check` and by the warning of a _C that
        fails to load) beside the extension it builds: in the source tree, and in the wheel's build folder."""

        def run(self):
            text = f'"""Written by setup.py: how spinal_ops._C was built."""\n\nCONFIG = {BUILD_INFO!r}\n'
            folders = [os.path.join(HERE, "spinal_ops")]
            if not self.inplace:
                folders.append(os.path.join(self.build_lib, "spinal_ops"))
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "_build_info.py"), "w") as f:
                    f.write(text)
            super().run()

    return BuildExtensionWithInfo.with_options(no_python_abi_suffix=True)


setup(
    packages=["spinal_ops", "spinal_ops.triton_kernels"],
    package_dir={"spinal_ops": "spinal_ops", "spinal_ops.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    install_requires=_requires(),
)
