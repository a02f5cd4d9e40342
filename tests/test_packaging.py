"""Installation failure modes: a native library that fails to load, a build against another torch, the metadata.

Each runs in a fresh interpreter, since the package loads its native library once per process.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Makes `spinal_ops._C` fail as a library built against another torch fails: ImportError, undefined symbol.
BROKEN_NATIVE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    class BrokenNative(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name == "spinal_ops._C" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError("_C.so: undefined symbol: _ZN3c1019UndefinedTensorImpl10_singletonE")

    sys.meta_path.insert(0, BrokenNative())
""")


# A source checkout without a build: no spinal_ops._C at all.
NO_NATIVE = textwrap.dedent("""
    import importlib.abc, sys

    class NoNative(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "spinal_ops._C":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoNative())
""")


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_broken_native_library_warns_once_and_falls_back():
    code = BROKEN_NATIVE + textwrap.dedent("""
        import warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import spinal_ops
            from spinal_ops import ops
            import spinal_ops.module  # a second import of the package's modules must not warn again
        messages = [str(w.message) for w in caught if "spinal_ops._C" in str(w.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        print("backends:", spinal_ops.available_backends())
        torch.manual_seed(0)
        m = spinal_ops.SpinalLinear(12, 3, layer_width=4, num_layers=3, dtype=torch.float64)
        x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
        m(x).sum().backward()
        with spinal_ops.use_backend("reference"):
            expected = m(x.detach())
        assert torch.equal(m(x.detach()), expected)
        print("ran on reference")
    """)
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "undefined symbol" in out
    assert f"this is torch {torch.__version__}" in out
    assert "It was built for torch" in out or "no build record" in out
    assert "pip install --no-build-isolation" in out
    assert "backends: ['reference'" in out and "'cpu'" not in out
    assert "ran on reference" in out


def test_broken_native_library_check_command_explains():
    code = BROKEN_NATIVE + "import runpy, sys; sys.argv = ['spinal_ops', 'check']; " \
        "runpy.run_module('spinal_ops', run_name='__main__')"
    done = run_python(code, env={"PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "spinal_ops._C: NOT loaded" in done.stdout
    assert "pip install --no-build-isolation" in done.stdout
    assert "reference  OK" in done.stdout


def test_unbuilt_checkout_imports_without_a_warning():
    code = NO_NATIVE + textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import torch
        import spinal_ops
        from spinal_ops import ops
        assert isinstance(ops.NATIVE_IMPORT_ERROR, ModuleNotFoundError), ops.NATIVE_IMPORT_ERROR
        print("backends:", spinal_ops.available_backends())
    """)
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "backends: ['reference'" in done.stdout and "'cpu'" not in done.stdout


def test_setup_refuses_a_build_torch_other_than_the_environments(tmp_path):
    """pip's default build isolation puts another torch first on the build's path; a fake torch distribution on
    PYTHONPATH does the same (the real one is still imported), and the build must stop, naming both."""
    fake = tmp_path / "torch-9.9.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 9.9.0\n")
    done = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(tmp_path), "SPINAL_OPS_SKIP_CUDA": "1"}, timeout=300)
    assert done.returncode != 0
    assert "compile against torch 9.9.0" in done.stderr
    assert f"has torch {torch.__version__.split('+')[0]}" in done.stderr
    assert "pip install --no-build-isolation" in done.stderr


def test_installed_metadata():
    """Version from ``spinal_ops.__version__``; torch pinned to the release built against; extras; a license."""
    import importlib.metadata

    import spinal_ops

    meta = importlib.metadata.metadata("spinal_ops")
    assert meta["Version"] == spinal_ops.__version__
    major, minor = torch.__version__.split(".")[:2]
    requires = importlib.metadata.requires("spinal_ops")
    assert f"torch=={major}.{minor}.*" in requires, requires
    extras = set(meta.get_all("Provides-Extra"))
    assert {"bench", "demo", "test", "triton"} <= extras, extras
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert (ROOT / "LICENSE").is_file()
