"""README's Python examples run as written, on the README's install (no package beyond requirements.txt)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# complete programs: the blocks that import the package
EXAMPLES = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
            if "import spinal_ops" in block]


def test_readme_has_examples():
    assert EXAMPLES


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index):
    done = subprocess.run([sys.executable, "-c", EXAMPLES[index]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` runs every step of README's test command, in order."""
    text = README.read_text()
    command = next(line for line in text.splitlines()
                   if line.startswith("python3 -m venv") and "python -m pytest" in line)
    steps = command.split(" && ")[2:]  # after creating and activating the virtual environment
    ci = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()]
    positions = [ci.index(step) if step in ci else -1 for step in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions, strict=True) if p == -1]
    assert positions == sorted(positions)
