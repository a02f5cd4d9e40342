"""The benchmark report's machinery (not its speed): providers share weights; every provider of every row runs on
the thread count the report records; torch.compile is really compiled in every cell, or the cell says it failed;
every cell has a spread and noisy rows are flagged; the floor is measured and shown; results never overwrite."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import pytest
import torch
from helpers import assert_close
from torch import nn

import spinal_ops
from spinal_ops import backends, benchmark
from spinal_ops.configs import SpinalConfig

TINY = SpinalConfig("tiny", 13, 3, 5, 3, 4, "relu")
FAST = {"min_run_time": 0.001, "progress": io.StringIO()}


@pytest.fixture
def three_threads(threads):
    """torch's intra-op thread count set to 3 (a value no default produces), restored afterwards."""
    threads(3)
    return 3


@pytest.fixture
def fast_machine(monkeypatch):
    """The machine's GEMM rate measured on a small GEMM: these tests check the machinery, not the numbers."""
    monkeypatch.setattr(benchmark, "GEMM_SIZE", getattr(benchmark, "GEMM_SIZE", {}) | {"cpu": 64}, raising=False)


def provider_kind(module) -> str:
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        return "compiled"
    if isinstance(module, benchmark.EagerSpinal):
        return "eager"
    if isinstance(module, nn.Sequential):
        return "dense"
    if isinstance(module, nn.Linear):
        return "tiny op (floor)"
    return "fused"


def record_per_step(monkeypatch, probe) -> dict[str, set]:
    """Wrap every timed step so that it notes ``probe()`` at each call, per provider kind."""
    seen: dict[str, set] = {}
    real = benchmark.make_step

    def make_step(module, backend, x, mode):
        step = real(module, backend, x, mode)
        kind = provider_kind(module)

        def noted():
            seen.setdefault(kind, set()).add(probe())
            step()

        return noted

    monkeypatch.setattr(benchmark, "make_step", make_step)
    return seen


def record_threads(monkeypatch) -> dict[str, set[int]]:
    """torch's thread count at each call of every timed step, per provider kind."""
    return record_per_step(monkeypatch, torch.get_num_threads)


def test_timed_steps_run_with_the_recorded_thread_count(monkeypatch, three_threads):
    """The timed steps of one cell run with the threads the report records (Timer's default was one)."""
    seen = []
    monkeypatch.setattr(benchmark, "make_step", lambda *args: lambda: seen.append(torch.get_num_threads()))
    result = benchmark.time_provider(None, None, None, "forward", min_run_time=0.001)
    assert seen and set(seen) == {three_threads}, f"threads seen by the timed steps: {sorted(set(seen))}"
    assert result["threads"] == three_threads
    assert benchmark.environment(torch.float32)["threads"] == three_threads


def test_every_provider_of_a_row_runs_on_the_threads_recorded_and_they_are_restored(monkeypatch, fast_machine):
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    seen = record_threads(monkeypatch)
    try:
        report = benchmark.run([TINY], [2], modes=("forward",), threads=wanted, **FAST)
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {"fused", "eager", "compiled", "dense", "tiny op (floor)"}, seen
    assert all(threads == {wanted} for threads in seen.values()), f"threads per provider: {seen}"
    assert {r["threads"] for r in report["records"]} == {wanted}
    env = report["environment"]
    assert (env["threads"], env["threads_before"], env["threads_after"]) == (wanted, before, before), env
    assert torch.get_num_threads() == before


def test_timed_steps_run_on_the_providers_backend(monkeypatch, fast_machine):
    """Each provider's timed steps run with its backend forced (once around the timed calls, not per call); the
    providers on the automatic choice run with none forced."""
    seen = record_per_step(monkeypatch, backends.forced_backend)
    report = benchmark.run([TINY], [2], modes=("forward", "fwd+bwd"), compile_eager=False, **FAST)
    fused = {r["provider"] for r in report["records"] if r["provider"].startswith("fused")}
    assert fused and seen["fused"] == {name[len("fused["):-1] for name in fused}, seen
    assert seen["eager"] == seen["dense"] == {None}, seen


def test_a_provider_that_changes_the_thread_count_is_reported_failed(monkeypatch, fast_machine, three_threads):
    """A step that drops torch's threads (as the cpu backend once did) must not pass as a timing."""
    real = benchmark.make_step

    def make_step(module, backend, x, mode):
        step = real(module, backend, x, mode)
        if provider_kind(module) != "fused":
            return step

        def dropping():
            step()
            torch.set_num_threads(1)

        return dropping

    monkeypatch.setattr(benchmark, "make_step", make_step)
    report = benchmark.run([TINY], [2], modes=("forward",), compile_eager=False, **FAST)
    fused = [r for r in report["records"] if r["provider"].startswith("fused")]
    assert fused and all(r["status"] == "failed" and r["seconds"] is None for r in fused), fused
    assert "thread count from 3 to 1" in fused[0]["error"]
    assert all(r["status"] == "ok" for r in report["records"] if not r["provider"].startswith("fused"))
    assert "failed" in benchmark.format_table(report) and torch.get_num_threads() == three_threads


def test_providers_compute_the_same_function():
    providers = benchmark.make_providers(TINY, torch.float64, "cpu", compile_eager=False)
    x = torch.randn(7, TINY.in_features, dtype=torch.float64)
    fused_name = next(n for n in providers if n.startswith("fused"))
    fused = providers[fused_name]
    got = benchmark._call(fused.module, fused.backend, x)
    expected = benchmark._call(providers["eager"].module, None, x)  # the original chain, in float64
    assert_close(got, expected, what=f"{fused_name} vs eager (float64)")
    assert benchmark._call(providers["dense"].module, None, x).shape == expected.shape
    assert benchmark.parameter_count(TINY) == sum(p.numel() for p in fused.module.parameters())


@pytest.mark.parametrize("mode", ["fwd+bwd", "backward"])
def test_backward_steps_write_each_gradient_once(mode):
    """Like a training loop with optimizer.zero_grad(): after three steps every gradient is one step's, not the sum
    of three (which would time PyTorch's accumulation in every cell). Each provider is deterministic on the CPU,
    so the gradients are bitwise equal."""
    providers = benchmark.make_providers(TINY, torch.float64, "cpu", compile_eager=False)
    x = torch.randn(7, TINY.in_features, dtype=torch.float64)
    for name, provider in providers.items():
        with benchmark.forcing(provider.backend):
            step = benchmark.make_step(provider.module, provider.backend, x, mode)
            step()
            once = [p.grad.clone() for p in provider.module.parameters()]
            step()
            step()
        for p, g in zip(provider.module.parameters(), once, strict=True):
            assert torch.equal(p.grad, g), (
                f"{name} {mode}: gradient after three steps differs from one step's "
                f"(max diff {(p.grad - g).abs().max().item():.3e})")


def test_tiny_report_has_every_provider_ratio_spread_and_floor(fast_machine):
    report = benchmark.run([TINY], [1, 5], modes=benchmark.MODES, dtype=torch.float64, compile_eager=False, **FAST)
    providers = {r["provider"] for r in report["records"]}
    assert {"eager", "dense"} <= providers and any(p.startswith("fused") for p in providers), providers
    for r in report["records"]:
        assert r["status"] == "ok", r
        assert r["blocks"] >= benchmark.MIN_BLOCKS and r["min"] <= r["q1"] <= r["seconds"] <= r["q3"] <= r["max"], r
        assert r["spread"] == pytest.approx((r["q3"] - r["q1"]) / r["seconds"])
    rows = benchmark.ratios(report)
    assert len(rows) == len(report["rows"]) == 2 * len(benchmark.MODES)
    for r in rows:
        assert r["fused_us"] > 0 and r["fused/dense"] > 0 and r["fused/eager"] > 0, r
        assert r["floor_us"] > 0 and r["fused/floor"] == pytest.approx(r["fused_us"] / r["floor_us"]), r
        assert r["noisy"] == (r["spread"] > benchmark.NOISY_SPREAD), r
        assert r["flop_ratio"] == pytest.approx(TINY.flops_per_row() / TINY.dense_flops_per_row())
    machine = report["machine"]
    assert machine["gemm"]["float64"]["flops_per_s"] > 0 and machine["floor_rate"]["dtype"] == "float64"
    rates = {"torch.mm": machine["gemm"]["float64"]["flops_per_s"]}
    if backends.cpu_kernel_isa():  # the cpu backend's own products are timed too; the floor takes the faster
        rates["spinal_ops kernels"] = machine["gemm_spinal_ops"]["float64"]["flops_per_s"]
    best = max(rates, key=rates.get)
    assert (machine["floor_rate"]["source"], machine["floor_rate"]["flops_per_s"]) == (best, rates[best]), machine
    assert machine["gemm"]["float32"]["flops_per_s"] > 0 and "bfloat16" in machine["gemm"]
    assert "call" not in machine and "bandwidth" not in machine  # timed in every row instead
    assert report["environment"]["dtype"] == "float64"
    table = benchmark.format_table(report)
    assert "tiny" in table and "f/floor" in table and "spread" in table
    assert "| tiny | 1 | forward" in benchmark.format_markdown(report)


# --- torch.compile ------------------------------------------------------------------------------------------------

def test_compiled_cells_each_compile_and_never_hit_the_recompile_limit(capfd, fast_machine):
    """One cache for all cells made dynamo give up after ``recompile_limit`` graphs and run eagerly."""
    with torch._dynamo.config.patch(recompile_limit=1):
        report = benchmark.run([TINY], [1], modes=("forward", "fwd+bwd"), compile_eager=True, **FAST)
    compiled = [r for r in report["records"] if r["provider"] == "compiled"]
    assert len(compiled) == 2
    for r in compiled:
        assert r["status"] == "ok" and r["graphs"] >= 1 and r["compile_s"] > 0, r
    assert [r["graphs"] for r in benchmark.ratios(report)] == [r["graphs"] for r in compiled]
    assert "recompile_limit" not in capfd.readouterr().err


def test_a_compiled_cell_that_hits_the_recompile_limit_is_failed_not_eager(monkeypatch, fast_machine):
    """Without the reset between cells the second one hits the limit: it must say so, not time eager."""
    counter = benchmark.GraphCounter()
    shared = {}

    def compile_once(module):  # one compiled module for every cell, nothing reset: the old behaviour
        shared.setdefault("module", torch.compile(module, backend=counter, dynamic=False))
        return shared["module"], counter

    torch._dynamo.reset()
    monkeypatch.setattr(benchmark, "compile_fresh", compile_once)
    with torch._dynamo.config.patch(recompile_limit=1):
        report = benchmark.run([TINY], [1], modes=("forward", "fwd+bwd"), compile_eager=True, **FAST)
    first, second = (r for r in report["records"] if r["provider"] == "compiled")
    assert first["status"] == "ok" and first["graphs"] == 1, first
    assert second["status"] == "failed" and second["seconds"] is None, second
    assert "recompile" in second["error"].lower() or "graph" in second["error"].lower(), second
    row = benchmark.ratios(report)[1]
    assert row["failed"] == ["compiled"] and row["compiled_us"] != row["compiled_us"]  # NaN
    assert "failed" in benchmark.format_table(report).splitlines()[-4]


def test_a_compiled_module_that_compiles_nothing_is_failed(monkeypatch, fast_machine):
    monkeypatch.setattr(benchmark, "compile_fresh", lambda module: (module, benchmark.GraphCounter()))
    report = benchmark.run([TINY], [2], modes=("forward",), compile_eager=True, **FAST)
    (compiled,) = (r for r in report["records"] if r["provider"] == "compiled")
    assert compiled["status"] == "failed" and "compiled no graph" in compiled["error"], compiled
    assert compiled["seconds"] is None


# --- spread, floor, machine -------------------------------------------------------------------------------------

def synthetic_report(spreads: dict[str, float], seconds: float = 1e-4) -> dict:
    """A report of one row whose cells have the given spreads, with a made-up machine."""
    records = [{"config": "tiny", "rows": 8, "mode": "forward", "provider": p, "status": "ok", "seconds": seconds,
                "q1": seconds * (1 - s / 2), "q3": seconds * (1 + s / 2), "min": seconds * (1 - s),
                "max": seconds * (1 + s), "spread": s, "threads": 1} for p, s in spreads.items()]
    machine = {"gemm": {"float32": {"n": 64, "flops_per_s": 1e10}}, "element_size": 4,
               "floor_rate": {"dtype": "float32", "flops_per_s": 1e10},
               "bandwidth": {"tiny": {"bytes": 400, "bytes_per_s": 1e9}}, "call": {"forward": {"seconds": 2e-6}}}
    env = benchmark.environment(torch.float32) | {"threads_before": 1, "threads_after": 1}
    return {"environment": env, "machine": machine, "records": records, "memory": [],
            "configs": [TINY._asdict() | {"flop_ratio": 0.5, "parameters": benchmark.parameter_count(TINY)}]}


def test_a_row_spreading_over_ten_percent_is_flagged_noisy():
    quiet = synthetic_report({"fused[cpu]": 0.02, "eager": 0.05, "dense": 0.1})
    noisy = synthetic_report({"fused[cpu]": 0.02, "eager": 0.3, "dense": 0.1})
    (q,), (n,) = benchmark.ratios(quiet), benchmark.ratios(noisy)
    assert not q["noisy"] and q["spread"] == pytest.approx(0.1)
    assert n["noisy"] and n["spread"] == pytest.approx(0.3)
    assert "NOISY" in benchmark.format_table(noisy) and "NOISY" not in benchmark.format_table(quiet)
    assert benchmark.format_markdown(noisy).startswith("**Not for the README")
    assert "(noisy)" not in benchmark.format_markdown(quiet) and "Not for" not in benchmark.format_markdown(quiet)


def test_measure_gives_blocks_quartiles_and_spread():
    calls = []
    result = benchmark.measure(lambda: calls.append(1), min_run_time=0.002)
    assert result["blocks"] >= benchmark.MIN_BLOCKS and len(calls) >= result["blocks"] * result["number"]
    assert result["min"] <= result["q1"] <= result["seconds"] <= result["q3"] <= result["max"]


def test_interleaved_blocks_share_a_slow_spell_and_rotate_their_order(monkeypatch):
    """Every round runs one block of each step, in a rotating order: a machine that slows down halfway through a
    cell slows every step of the row alike, so the ratio of two equal steps stays 1 (timed one after the other, the
    second would take the whole slow spell: ratio 2)."""
    order = []
    clock = {"blocks": 0}

    def fake_block(step, number, device):  # each block of either step costs 1 s a call, 2 s once the machine slows
        step()
        clock["blocks"] += 1
        return number * (1.0 if clock["blocks"] <= 12 else 2.0)

    monkeypatch.setattr(benchmark, "_cpu_block", fake_block)
    steps = {name: (lambda n=name: order.append(n), contextlib.nullcontext) for name in ("a", "b")}
    out = benchmark.measure_interleaved(steps, min_run_time=0.0, min_blocks=11)
    assert out["a"]["blocks"] == out["b"]["blocks"] == 11
    assert out["a"]["seconds"] == out["b"]["seconds"], out
    timed = order[2:]  # after one calibration call each
    rounds = [tuple(timed[i:i + 2]) for i in range(0, len(timed), 2)]
    assert all(sorted(r) == ["a", "b"] for r in rounds), rounds
    assert rounds[0] != rounds[1], "the order of the steps within a round should rotate"


def test_an_interleaved_step_that_fails_leaves_the_others_timed():
    def failing():
        raise ValueError("boom")

    calls = []
    out = benchmark.measure_interleaved({"ok": (lambda: calls.append(1), contextlib.nullcontext),
                                         "bad": (failing, contextlib.nullcontext)}, min_run_time=0.002)
    assert isinstance(out["bad"], ValueError) and list(out) == ["ok", "bad"]
    assert out["ok"]["blocks"] >= benchmark.MIN_BLOCKS and len(calls) >= out["ok"]["blocks"]


def test_each_row_times_its_floor_beside_its_providers(fast_machine):
    """The floor's inputs (the GEMM, the copies, the tiny op step) are cells of every row, interleaved with its
    providers, and the row's floor is made of those (not of what was measured at the start of the run)."""
    report = benchmark.run([TINY], [1, 5], modes=("forward", "fwd+bwd"), compile_eager=False, **FAST)
    machine = report["machine"]
    cells = {(r["rows"], r["mode"], r["provider"]): r for r in report["records"]}
    rows = benchmark.ratios(report)
    assert len(rows) == 4
    for row in rows:
        floor = {name: cells[(row["rows"], row["mode"], name)] for name in benchmark.FLOOR_CELLS}
        assert all(c["status"] == "ok" for c in floor.values()), floor
        n = machine["gemm"][machine["floor_rate"]["dtype"]]["n"]
        nbytes = benchmark.parameter_count(TINY) * machine["element_size"]
        measured = {"call_s": floor[benchmark.CALL]["seconds"],
                    "flops_per_s": 2 * n**3 / floor[benchmark.FLOOR_GEMM]["seconds"],
                    "bytes_per_s": benchmark.bandwidth_of(nbytes, floor[benchmark.FLOOR_COPY]["seconds"],
                                                          floor[benchmark.FLOOR_COPY1]["seconds"])}
        fl = benchmark.floor(TINY, row["rows"], row["mode"], machine, measured)
        assert row["floor_us"] == pytest.approx(fl["seconds"] * 1e6), (row, fl)
        assert row["call_us"] == pytest.approx(measured["call_s"] * 1e6)
        assert row["floor_flops_per_s"] == pytest.approx(measured["flops_per_s"])
        assert measured["flops_per_s"] != machine["floor_rate"]["flops_per_s"]
        unmeasured = benchmark.floor(TINY, row["rows"], row["mode"], machine)  # not without the row's cells
        assert math.isnan(unmeasured["seconds"]) and unmeasured["bound"] is None, unmeasured
    lines = benchmark.describe_machine(report)
    assert any(line.startswith("the floor of each row, timed in the row: GEMM rate ") and
               "one tiny op step (us): forward " in line and ", fwd+bwd " in line for line in lines), lines
    assert not any("at the start: " in line and "copy bandwidth" in line for line in lines), lines


def test_measure_on_cuda_times_with_cuda_events(monkeypatch):
    """The GPU path (no GPU here): blocks are timed by CUDA events recorded around the queued calls."""
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = len(log)
            log.append("record")

        def synchronize(self):
            log.append("event sync")

        def elapsed_time(self, end):
            return 2.0 * (end.at - self.at - 1)  # milliseconds: 2 ms per step queued between the events

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("device sync"))
    result = benchmark.measure(lambda: log.append("step"), min_run_time=0.01, device="cuda")
    assert result["seconds"] == pytest.approx(2e-3) and result["spread"] == 0
    assert log[:4] == ["device sync", "record", "step", "record"] and "event sync" in log


def test_floor_is_the_larger_of_compute_and_memory_plus_one_call():
    """From a report that measured the bandwidth and the call term at its start (as reports did before
    2026-12-08): they stand in for the row's own."""
    report = synthetic_report({"fused[cpu]": 0.0})
    machine = report["machine"]
    lines = benchmark.describe_machine(report)
    assert "copy bandwidth at the weights' size at the start: 1.0 to 1.0 GB/s" in lines, lines
    assert lines[-2] == "one tiny op step (us): forward 2.0", lines
    fl = benchmark.floor(TINY, 8, "forward", machine)
    flops, nbytes = 8 * TINY.flops_per_row(), 4 * (8 * benchmark.x_columns(TINY) + benchmark.parameter_count(TINY)
                                                   + 8 * TINY.out)
    assert (fl["flops"], fl["bytes"]) == (flops, nbytes)
    assert fl["seconds"] == pytest.approx(max(flops / 1e10, nbytes / 1e9) + 2e-6)
    assert benchmark.mode_flops(TINY, 8, "backward") == 2 * flops
    assert benchmark.mode_flops(TINY, 8, "fwd+bwd") == 3 * flops
    assert benchmark.min_elements(TINY, 8, "fwd+bwd") > benchmark.min_elements(TINY, 8, "backward") > \
        benchmark.min_elements(TINY, 8, "forward")


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
"""


def test_cpu_model_family_and_vector_isa_are_recorded():
    info = benchmark.cpu_info(CPUINFO)
    assert (info["model"], info["vendor"], info["family"], info["model_number"]) == \
        ("Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel", "6", "143")
    assert info["vector_isa"] == "AMX" and {"AVX2", "AVX-512", "AVX512_BF16", "AMX_BF16"} <= set(info["isa"])
    assert benchmark.native_dtype_support("bfloat16", torch.device("cpu"), info) is None
    avx2 = benchmark.cpu_info(CPUINFO.replace("avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8", ""))
    assert avx2["vector_isa"] == "AVX2"
    assert "unsupported" in benchmark.native_dtype_support("bfloat16", torch.device("cpu"), avx2)
    env = benchmark.environment(torch.float32)
    assert {"cpu", "cpu_family", "cpu_model_number", "vector_isa", "isa", "cpu_capability", "cpu_kernels"} <= set(env)
    assert env["cpu_kernels"] == backends.cpu_kernel_isa()
    if os.path.exists("/proc/cpuinfo"):
        assert env["vector_isa"] != "unknown" and env["cpu_family"], env


def test_bfloat16_on_cpu_times_the_backend_that_runs(fast_machine):
    """In bfloat16 on CPU the fused column is the cpu backend, with the reference beside it."""
    chosen = backends.select_backend(torch.device("cpu"), torch.bfloat16)
    assert benchmark.fused_backends(torch.device("cpu"), torch.bfloat16) == [chosen]
    report = benchmark.run([TINY], [2], modes=("fwd+bwd",), dtype=torch.bfloat16, compile_eager=False, **FAST)
    fused = [r for r in report["records"] if r["provider"].startswith("fused")]
    assert [r["provider"] for r in fused] == [f"fused[{chosen}]"] and fused[0]["status"] == "ok", fused
    assert chosen == "cpu" or not backends._native_loaded()
    assert [r["status"] for r in report["records"] if r["provider"] == "reference"] == ["ok"]
    assert report["rows"][0]["fused/reference"] > 0
    assert "f/ref" in benchmark.format_table(report)
    gemm = report["machine"]["gemm"]["bfloat16"]
    assert "flops_per_s" in gemm or "unsupported" in gemm["unsupported"], gemm
    assert report["machine"]["element_size"] == 2


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(benchmark.BenchmarkError, match="no CUDA GPU is available"):
        benchmark.run([TINY], [2], device="cuda", **FAST)


# --- results ----------------------------------------------------------------------------------------------------

def test_each_run_gets_its_own_folder_and_latest_points_at_the_newest(tmp_path):
    report = synthetic_report({"fused[cpu]": 0.02, "eager": 0.05, "dense": 0.04})
    report["records"][1] |= {"status": "failed", "seconds": None, "error": "RuntimeError: x"}
    report["rows"] = benchmark.ratios(report)
    first = benchmark.save(report, str(tmp_path))
    second = benchmark.save(report, str(tmp_path))  # the same date: a second folder, nothing overwritten
    assert first["folder"] != second["folder"] and os.path.basename(second["folder"]).endswith("-2")
    for paths in (first, second):
        for kind in ("json", "txt", "md", "png"):
            assert os.path.getsize(paths[kind]) > 0, paths[kind]
    assert os.path.realpath(tmp_path / "latest") == os.path.realpath(second["folder"])

    def no_nan(text):
        raise AssertionError(f"bench.json holds {text}: not strict JSON")

    saved = json.loads(open(second["json"]).read(), parse_constant=no_nan)
    assert saved["records"][0]["seconds"] == report["records"][0]["seconds"]
    assert saved["rows"][0]["eager_us"] is None and "| failed |" in open(second["md"]).read()


def test_heads_text_table_keeps_every_column_apart():
    """A long cell (a noisy row's mode, a long configuration name) widens its column instead of running into the
    next one."""
    cell = {"status": "ok", "seconds": 1e-5}
    report = {"heads": [{"config": "wide-resnet-head", "rows": 1, "train": "eval", "mode": "fwd+bwd", "noisy": True,
                         "spinal": cell, "blocks": cell, "ratio": 1.0, "spread": 0.2}]}
    *_, header, line = benchmark._head_lines(report, markdown=False)
    assert header.split() == ["config", "B", "mode", "spinal", "blocks", "spinal/blocks", "spread"]
    assert line.split() == ["wide-resnet-head", "1", "eval", "fwd+bwd", "(noisy)", "10", "10", "1.00", "20.0%"]


def test_heads_are_timed_against_the_original_blocks_in_train_and_eval_mode(fast_machine):
    report = benchmark.run([TINY], [1, 3], modes=("forward",), dtype=torch.float64, compile_eager=False,
                           heads=[TINY.name], **FAST)
    heads = report["heads"]
    # train mode needs two rows (batch statistics): B = 1 has eval rows only
    assert [(h["rows"], h["train"], h["mode"]) for h in heads] == [
        (1, "eval", "forward"), (1, "eval", "fwd+bwd"),
        (3, "train", "fwd+bwd"), (3, "eval", "forward"), (3, "eval", "fwd+bwd")]
    for h in heads:
        assert h["spinal"]["status"] == h["blocks"]["status"] == "ok", h
        assert h["ratio"] == h["spinal"]["seconds"] / h["blocks"]["seconds"]
    table, md = benchmark.format_table(report), benchmark.format_markdown(report)
    assert "spinal/blocks" in table and "| tiny | 3 | train fwd+bwd" in md.replace(" (noisy)", "")
    assert benchmark.run([TINY], [1], modes=("forward",), compile_eager=False, **FAST)["heads"] == []


def test_original_blocks_compute_what_the_train_mode_layer_computes():
    """The heads' baseline is the scripts' head: with the same seed its output is the layer's, bit for bit."""
    torch.manual_seed(0)
    spinal = spinal_ops.SpinalLinear(TINY.in_features, TINY.out, layer_width=TINY.width, num_layers=TINY.num_layers,
                                     num_splits=TINY.num_splits, dropout=0.5, batch_norm=True)
    blocks = benchmark.OriginalBlocks(spinal)
    x = torch.randn(6, TINY.in_features)
    torch.manual_seed(1)
    a = blocks(x)
    torch.manual_seed(1)
    b = spinal(x)
    assert torch.equal(a, b)
