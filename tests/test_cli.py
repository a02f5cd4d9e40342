"""The command line: help without torch, defaults shown, no RST markup, one clear error line for bad values, each
subcommand's own usage on an unknown option, and a short bench run end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import GPU_PRESENT

from spinal_ops import __main__ as cli
from spinal_ops import benchmark, demo
from spinal_ops.configs import BENCH_BATCH_SIZES, CONFIG_BY_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ("bench", "check", "demo", "gpu-model")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def help_text(*argv: str) -> str:
    parser, subparsers = cli.build_parser()
    return (subparsers[argv[0]] if argv else parser).format_help()


def test_help_of_every_command_imports_no_torch():
    """The CLI module on its own (torch made unimportable) prints every help and exits 0."""
    code = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch imported while printing help")

        sys.meta_path.insert(0, NoTorch())
        spec = importlib.util.spec_from_file_location("cli_alone", {os.path.join(ROOT, "spinal_ops", "__main__.py")!r})
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        for argv in (["--help"], ["bench", "--help"], ["check", "--help"], ["demo", "--help"], ["gpu-model", "--help"]):
            try:
                cli.main(argv)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
        assert "torch" not in sys.modules
    """)
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m spinal_ops bench" in done.stdout and "Traceback" not in done.stderr


def test_python_m_spinal_ops_help_imports_no_torch():
    done = run_python("", "-X", "importtime", "-m", "spinal_ops", "--help")
    assert done.returncode == 0 and "usage: python -m spinal_ops" in done.stdout, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "torch" not in imported


@pytest.mark.parametrize("command", ("",) + SUBCOMMANDS)
def test_help_has_a_description_defaults_and_no_rst_markup(command):
    text = help_text(*([command] if command else []))
    parser, subparsers = cli.build_parser()
    p = subparsers[command] if command else parser
    assert p.description and p.description.split()[0] in text
    for marker in ("``", ":func:", ":class:", ":data:", ".. "):
        assert marker not in text, f"RST markup {marker!r} in the help of {command or 'the CLI'}:\n{text}"
    flat = " ".join(text.split())  # the help as rendered, its line breaks undone
    for action in p._actions:
        if not action.option_strings or action.default is False or action.dest == "help":
            continue
        if action.default is None:  # the help says what happens without the option
            assert action.help and "(default:" in action.help, f"{action.option_strings}: no default stated"
            stated = action.help[action.help.index("(default:"):]
            assert " ".join(stated.split()) in flat, f"{action.option_strings}: {stated!r} not shown:\n{text}"
        else:
            shown = f"(default: {action.default})"
            assert shown in flat, f"{action.option_strings}: {shown!r} not shown in the help:\n{text}"
    if command in ("bench", "demo"):
        assert text.count("(default:") >= 4, text


def test_bench_help_states_the_defaults_the_report_uses():
    text = help_text("bench")
    assert f"(default: {' '.join(map(str, BENCH_BATCH_SIZES))})" in text
    assert f"(default: {' '.join(benchmark.MODES)})" in text
    assert "(default: 0.2)" in text and "(default: bench-results)" in text and "(default: cpu)" in text
    assert cli.MODES == benchmark.MODES and cli.DEVICES == benchmark.DEVICES
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in cli.DTYPES)
    assert cli.config_names() == sorted(CONFIG_BY_NAME)


def test_gpu_model_help_states_the_model_s_choices_and_the_command_prints_the_table(capsys):
    from spinal_ops import gpu_model
    from spinal_ops.configs import ROOFLINE_BATCH_SIZES

    assert set(cli.GPU_MODEL_DEVICES) <= set(gpu_model.DEVICES)
    assert cli.GPU_MODEL_DEFAULT_DEVICES == gpu_model.REPORT_DEVICES and cli.GPU_MODEL_MATHS == gpu_model.MATHS
    assert cli.GPU_MODEL_MODES == gpu_model.MODES
    assert cli.GPU_MODEL_BATCH_SIZES_TEXT == " ".join(map(str, ROOFLINE_BATCH_SIZES))
    assert cli.main(["gpu-model", "--devices", "h200", "--math", "bf16", "--configs", "vgg-head", "--batch-sizes",
                     "1", "4096"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MODEL, not a measurement")
    assert len([line for line in out.splitlines() if line.split()[:2] == ["h200", "bf16"]]) == 4  # 2 modes x 2 B
    assert "4 rows. Automatic <= min(eager, dense):" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--threads", "-3"], "argument --threads: must be a positive integer, got -3"),
    (["bench", "--threads", "two"], "argument --threads: must be a positive integer, got 'two'"),
    (["bench", "--batch-sizes", "-5"], "argument --batch-sizes: must be a positive integer, got -5"),
    (["bench", "--batch-sizes", "8", "0"], "argument --batch-sizes: must be a positive integer, got 0"),
    (["bench", "--min-run-time", "-1"], "argument --min-run-time: must be a positive number, got -1"),
    (["bench", "--min-run-time", "inf"], "argument --min-run-time: must be a positive number, got inf"),
    (["bench", "--configs", "nope"], "argument --configs: unknown configuration 'nope' (choose from regression, "),
    (["bench", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["demo", "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["demo", "--threads", "-1"], "argument --threads: must be an integer >= 0, got -1"),
])
def test_bad_values_are_one_clear_error_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail(f"{argv} was accepted: the report ran"))
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail(f"{argv} was accepted: the demo ran"))
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"python -m spinal_ops {argv[0]}: error: ") and message in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_an_unknown_option_shows_the_subcommands_usage(command, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail("the report ran"))
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--foo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: python -m spinal_ops {command}"), err
    assert err.strip().splitlines()[-1] == f"python -m spinal_ops {command}: error: unrecognized arguments: --foo"


@pytest.mark.parametrize("command,module", [("bench", "matplotlib"), ("demo", "sklearn"), ("demo", "tqdm")])
def test_a_missing_extra_is_one_error_line_naming_it(command, module, capsys, monkeypatch):
    """``pip install .`` does not install what bench and demo need beyond torch: they say which extra does."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail("the report ran"))
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("the demo ran"))
    assert cli.main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"python -m spinal_ops {command}: error: needs {module}, not installed: pip install "
                   f"'spinal_ops[{command}]' (from a source checkout: pip install -r requirements.txt)"), err


def test_bench_on_cuda_without_a_gpu_is_one_error_line():
    if GPU_PRESENT and torch.cuda.is_available():  # CUDA queried only where a driver is installed, and not at import
        pytest.skip("a GPU is present")
    done = run_python("", "-m", "spinal_ops", "bench", "--device", "cuda", "--configs", "regression")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: --device cuda: no CUDA GPU is available" in lines[0], done.stderr
    assert done.stdout == ""


def test_bench_writes_a_timestamped_run_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(benchmark.GEMM_SIZE, "cpu", 64)
    before = torch.get_num_threads()
    argv = ["bench", "--configs", "regression", "--batch-sizes", "2", "--modes", "forward", "--no-compile",
            "--min-run-time", "0.001", "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == before
    assert "regression" in out and "f/floor" in out and "bench.md" in out, out
    (folder,) = [p for p in tmp_path.iterdir() if p.name != "latest"]
    assert (tmp_path / "latest").resolve() == folder.resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["bench.json", "bench.md", "bench.png", "bench.txt"]
    md = (folder / "bench.md").read_text()
    assert "`python -m spinal_ops bench --configs regression" in md and "| regression | 2 | forward" in md
