"""Side-by-side benchmark of a spinal layer against what it replaces (``python -m spinal_ops bench``).

Providers, all holding the same weights:

- ``fused[<backend>]``: :class:`SpinalLinear` on the backends of this device that run the report's dtype
  (interpreted Triton excluded); where none does, the backend ``spinal_ops`` picks by itself
  (:func:`spinal_ops.backends.select_backend`), labelled with its name;
- ``reference`` (bfloat16 and float16 only): :class:`SpinalLinear` on the ``reference`` backend, the plain
  PyTorch ops that ran these dtypes on CPU before the fused kernels did;
- ``eager``: the original scripts' code path, an ``nn.Linear`` per sub-layer fed ``torch.cat([chunk, h])``;
- ``compiled``: ``torch.compile`` of ``eager`` (inductor), compiled afresh for every (configuration, mode, batch
  size) after ``torch._dynamo.reset()``, so dynamo never reaches its recompile limit; the graphs compiled are
  counted per cell, and a cell that compiles nothing, recompiles while timed or fails is reported as failed;
- ``dense``: ``nn.Linear(D, L*w) + act + nn.Linear(L*w, out)`` (the configuration's activation: ReLU, LeakyReLU for
  ``regression``), the dense layer a spinal head replaces.

Modes: ``forward`` (under ``torch.no_grad``), ``backward`` (one retained graph, backward timed alone) and
``fwd+bwd``.

Heads (:func:`time_heads`): the configurations of :data:`HEAD_CONFIGS` again as the scripts' dropout /
batch-norm heads, :class:`SpinalLinear` against :class:`OriginalBlocks` with the same weights, train and eval mode.

Timing: blocked runs (:func:`measure_interleaved`): a block is a fixed number of calls, timed as a whole
(``perf_counter`` on CPU, CUDA events on a GPU); the providers of a row take turns, one block each per round in a
rotating order, so that a slow spell of the machine falls on all of them alike; at least :data:`MIN_BLOCKS` blocks
and ``min_run_time`` seconds per cell. A cell reports the median time per call over its blocks, the quartiles, min
and max; its spread is the interquartile range over the median, and a row (configuration, batch size, mode) whose
cells spread more than :data:`NOISY_SPREAD` is flagged noisy. Every provider runs on the thread count the report
sets and records; a provider that changes it is reported as failed. A provider on a named backend has it forced
around each block of its timed calls (:func:`forcing`), not per call.

Floor: the report measures at the start of the run the GEMM rate of this machine (a square ``torch.mm``, and on CPU
the ``cpu`` backend's own product kernels on the same square; the faster of the two is the rate's source), and then
in every row, interleaved with its providers (:data:`FLOOR_CELLS`): that product, a copy at the configuration's weight
size and of one element, and one tiny ``nn.Linear`` step of the row's mode; a row's floor is ``max(FLOPs / rate,
bytes / bandwidth) + that step`` (:func:`floor`), from the row's own rate, bandwidth and step.

Nothing here asserts speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from . import backends, reference
from .configs import SpinalConfig
from .gpu_model import Problem
from .module import SpinalLinear

MODES = ("forward", "backward", "fwd+bwd")
DEVICES = ("cpu", "cuda")
NOISY_SPREAD = 0.10  # a row whose interquartile range exceeds this fraction of its median is noisy
MIN_BLOCKS = 5  # blocks per cell, at least
BLOCKS_PER_RUN = 20  # a block lasts about min_run_time / BLOCKS_PER_RUN
GEMM_SIZE = {"cpu": 1024, "cuda": 4096}  # n of the n x n x n GEMM that measures the machine's rate


class BenchmarkError(RuntimeError):
    """A cell that cannot be timed honestly (failed compilation, a fallback, a changed thread count)."""


class _ScriptChain(nn.Module):
    """The original scripts' loop: sub-layer ``i`` (:meth:`sub_layer`) on ``cat([x_chunk_i, h_{i-1}])`` (the chunk
    alone for ``i = 0``), the head on the concatenated outputs."""

    def __init__(self, spinal: SpinalLinear, head: nn.Module | None):
        super().__init__()
        self.head = head
        self.chunk = spinal.chunk
        self.starts = spinal._spec.starts

    def sub_layer(self, i: int, inp: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        outs = []
        h = None
        for i, s in enumerate(self.starts):
            xi = reference.chunk_of(x, s, self.chunk)  # as the original scripts slice it
            h = self.sub_layer(i, xi if h is None else torch.cat([xi, h], dim=1))
            outs.append(h)
        hcat = torch.cat(outs, dim=1)
        return self.head(hcat) if self.head is not None else hcat


class EagerSpinal(_ScriptChain):
    """The original scripts' code path, built from a :class:`SpinalLinear` (same weights)."""

    def __init__(self, spinal: SpinalLinear):
        layers, head = spinal.to_linears()
        super().__init__(spinal, head)
        self.layers = nn.ModuleList(layers)
        self.activation = spinal.activation
        self.negative_slope = spinal.negative_slope

    def sub_layer(self, i, inp):
        return reference.activate(self.layers[i](inp), self.activation, self.negative_slope)


class OriginalBlocks(_ScriptChain):
    """The VGG / transfer-learning scripts' head, built from a :class:`SpinalLinear` with dropout and batch norms
    (same weights and batch-norm state): ``Dropout -> Linear -> BatchNorm1d -> ReLU`` per sub-layer on
    ``cat([x_chunk, h])``, ``Dropout -> Linear`` on the concatenated outputs (:meth:`SpinalLinear.to_blocks`)."""

    def __init__(self, spinal: SpinalLinear):
        blocks, head = spinal.to_blocks()
        super().__init__(spinal, head)
        self.blocks = nn.ModuleList(blocks)

    def sub_layer(self, i, inp):
        return self.blocks[i](inp)


def dense_equivalent(cfg: SpinalConfig, dtype=None, device=None) -> nn.Module:
    """The dense layer a spinal head replaces: same input, same hidden width ``L*w``, same outputs."""
    hidden = cfg.num_layers * cfg.width
    act = nn.LeakyReLU() if cfg.activation == "leaky_relu" else nn.ReLU()
    return nn.Sequential(nn.Linear(cfg.in_features, hidden), act, nn.Linear(hidden, cfg.out)).to(device, dtype)


def fused_backends(device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
    """Backends timed as ``fused[<name>]`` on ``device`` in ``dtype``.

    The backends the automatic choice picks from on that device type (:data:`backends.CANDIDATES`: on CPU the cpu
    kernels; interpreted Triton is a correctness tool only) that run ``dtype`` there, the reference aside; where none
    does, the one ``spinal_ops`` chooses automatically, so the label names the backend that actually runs.
    """
    candidates = backends.CANDIDATES["cuda" if device.type == "cuda" else "cpu"]
    names = [b for b in candidates if b != "reference" and backends._serves(b, device.type, dtype)]
    return names or [backends.select_backend(device, dtype)]


@dataclasses.dataclass
class Provider:
    """One column of the report: ``module`` run under spinal_ops backend ``backend`` (None: no forcing).

    ``compiled``: ``module`` is compiled afresh (:func:`compile_fresh`) for every cell it is timed in.
    """

    module: nn.Module
    backend: str | None = None
    compiled: bool = False


REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def make_providers(cfg: SpinalConfig, dtype, device, compile_eager: bool = True) -> dict[str, Provider]:
    """``{name: Provider}`` for one configuration, all with the same spinal weights."""
    spinal = SpinalLinear(cfg.in_features, cfg.out, layer_width=cfg.width, num_layers=cfg.num_layers,
                          num_splits=cfg.num_splits, activation=cfg.activation, device=device, dtype=dtype)
    providers = {f"fused[{b}]": Provider(spinal, b) for b in fused_backends(torch.device(device), dtype)}
    if dtype in REDUCED_DTYPES:
        providers["reference"] = Provider(spinal, "reference")
    providers["eager"] = Provider(EagerSpinal(spinal))
    if compile_eager:
        providers["compiled"] = Provider(EagerSpinal(spinal), compiled=True)
    providers["dense"] = Provider(dense_equivalent(cfg, dtype, device))
    return providers


class GraphCounter:
    """A ``torch.compile`` backend: inductor, counting the graphs dynamo hands it."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


def compile_fresh(module: nn.Module) -> tuple[nn.Module, GraphCounter]:
    """``torch.compile(module)`` with nothing cached: dynamo is reset first, so no recompile limit carries over."""
    torch._dynamo.reset()
    counter = GraphCounter()
    return torch.compile(module, backend=counter, dynamic=False), counter


def forcing(backend: str | None):
    """``backends.use_backend(backend)``, or nothing for a provider that runs on the automatic choice (None)."""
    return contextlib.nullcontext() if backend is None else backends.use_backend(backend)


def _call(module, backend, x):
    with forcing(backend):
        return module(x)


def make_step(module, backend, x, mode: str):
    """A no-argument callable running one ``mode`` step of one provider on ``x``.

    The step itself does not force ``backend``: call it inside ``forcing(backend)`` (:func:`time_providers` enters
    it around the warm-up and around each block of timed calls, as a user forces a backend around a training loop;
    entering ``use_backend`` per call would add ~2 us to every step, as much as a B = 1 forward's own Python). The
    forward that sets up ``fwd+bwd`` and ``backward`` steps runs under ``forcing(backend)`` here.

    ``fwd+bwd`` and ``backward`` run one forward with gradients while they are set up (the output's shape, the
    retained graph): the same shapes and grad mode as the timed calls, so a compiled module compiles nothing else.
    Each of their steps first sets the gradients of the input and the parameters to None, as a training loop's
    ``optimizer.zero_grad()`` does: a step writes its gradients once, as new tensors, and does not add them to the
    previous step's (which would time PyTorch's gradient accumulation, a pass over every parameter, in each cell).
    """
    if mode == "forward":
        def step():
            with torch.no_grad():
                module(x)
        return step
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    xg = x.detach().requires_grad_()
    leaves = [xg, *(p for p in module.parameters() if p.requires_grad)]
    if mode == "fwd+bwd":
        grad = torch.ones_like(_call(module, backend, xg))

        def step():
            for t in leaves:
                t.grad = None
            module(xg).backward(grad)
    else:
        y = _call(module, backend, xg)
        grad = torch.ones_like(y)

        def step():
            for t in leaves:
                t.grad = None
            y.backward(grad, retain_graph=True)
    return step


def _cpu_block(step, number: int, device) -> float:
    start = time.perf_counter()
    for _ in range(number):
        step()
    return time.perf_counter() - start


def _cuda_block(step, number: int, device) -> float:
    """Seconds for ``number`` calls, timed on the GPU by CUDA events around the queued work."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)  # nothing queued earlier is counted
    start.record()
    for _ in range(number):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(step, min_run_time: float, device="cpu", min_blocks: int = MIN_BLOCKS) -> dict:
    """Blocked timing of one ``step`` (already warm): :func:`measure_interleaved` with one entry."""
    result = measure_interleaved({"step": (step, contextlib.nullcontext)}, min_run_time, device, min_blocks)["step"]
    if isinstance(result, Exception):
        raise result
    return result


def measure_interleaved(steps: dict, min_run_time: float, device="cpu", min_blocks: int = MIN_BLOCKS,
                        after_block=None) -> dict:
    """Blocked timing of several steps (each already warm), their blocks interleaved.

    ``steps``: ``{name: (step, context)}``; ``context()`` is entered around each of the step's blocks, outside the
    timed calls (a forced backend). A block is ``number`` calls of one step timed together (``number`` chosen per
    step so that a block lasts about ``min_run_time / BLOCKS_PER_RUN``). The blocks run in rounds, one block of
    every step per round, each round in another order, until every step has ``min_run_time`` seconds and
    ``min_blocks`` blocks: a slow spell of the machine then falls on every step of a row alike, not on the one that
    happened to be timed in it, and the ratios between steps hold up where their absolute times do not.
    ``after_block(name)``, called after each block, may raise to fail that step. The garbage collector is off while
    timing.

    Returns ``{name: result}``: seconds per call as the median of the step's blocks, quartiles, min, max, blocks,
    ``number`` and ``spread`` (interquartile range over median); or the exception a failed step raised (it leaves
    the rounds, the others go on).
    """
    device = torch.device(device)
    block = _cuda_block if device.type == "cuda" else _cpu_block
    results: dict = {}
    numbers: dict[str, int] = {}
    times: dict[str, list[float]] = {name: [] for name in steps}
    totals = dict.fromkeys(steps, 0.0)

    def timed(name: str, number: int) -> float:
        step, context = steps[name]
        with context():
            seconds = block(step, number, device)
        if after_block is not None:
            after_block(name)
        return seconds

    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in steps:
            try:
                one = timed(name, 1)
                numbers[name] = max(1, int(min_run_time / BLOCKS_PER_RUN / max(one, 1e-9)))
            except Exception as e:  # reported as the step's result
                results[name] = e
        rounds = 0
        while True:
            live = [n for n in steps if n not in results
                    and (totals[n] < min_run_time or len(times[n]) < min_blocks)]
            if not live:
                break
            shift = rounds % len(live)
            for name in live[shift:] + live[:shift]:
                try:
                    seconds = timed(name, numbers[name])
                except Exception as e:  # the step fails, the others go on
                    results[name] = e
                    continue
                totals[name] += seconds
                times[name].append(seconds / numbers[name])
            rounds += 1
    finally:
        if gc_enabled:
            gc.enable()
    for name, blocks in times.items():
        if name in results:
            continue
        q1, median, q3 = statistics.quantiles(blocks, n=4, method="inclusive")
        results[name] = {"seconds": median, "q1": q1, "q3": q3, "min": min(blocks), "max": max(blocks),
                         "blocks": len(blocks), "number": numbers[name],
                         "spread": (q3 - q1) / median if median > 0 else 0.0}
    return {name: results[name] for name in steps}


def time_provider(module, backend, x, mode: str, min_run_time: float, threads: int | None = None,
                  compiled: bool = False, warmup: int = 2) -> dict:
    """Time one ``mode`` step of one provider on ``x`` (:func:`time_providers` with one entry); raises
    :class:`BenchmarkError` (or the step's own error) where it fails."""
    result = time_providers({"provider": Provider(module, backend, compiled)}, x, mode, min_run_time, threads,
                            warmup)["provider"]
    if isinstance(result, Exception):
        raise result
    return result


def time_providers(providers: dict, x, mode: str, min_run_time: float, threads: int | None = None,
                   warmup: int = 2, steps: dict | None = None) -> dict:
    """Time one ``mode`` step of every provider of ``{name: Provider}`` on ``x``, and the no-argument callables of
    ``steps`` (``{name: step}``, the floor's measurements), their blocks interleaved (:func:`measure_interleaved`),
    with ``threads`` intra-op threads (default: torch's now).

    A compiled provider is compiled afresh first (:func:`compile_fresh`); its result then has ``graphs`` (the graphs
    dynamo compiled) and ``compile_s``. Each provider's warm-up and blocks run with its backend forced
    (:func:`forcing`). Returns ``{name: result | exception}``: a provider fails (with a :class:`BenchmarkError`)
    where its numbers would not be what they claim: a compiled module that compiled no graph, hit the recompile limit
    or recompiled while timed, or a step that changed torch's thread count (restored before the next block).
    """
    threads = threads or torch.get_num_threads()
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    limit = {"fail_on_recompile_limit_hit": True} if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit") \
        else {}
    results: dict = {}
    timed: dict = {}
    extras: dict[str, dict] = {}
    counters: dict = {}
    with torch._dynamo.config.patch(**limit):
        for name, p in providers.items():
            try:
                started = time.perf_counter()
                module = p.module
                if p.compiled:
                    module, counters[name] = compile_fresh(module)
                with forcing(p.backend):
                    step = make_step(module, p.backend, x, mode)
                    for _ in range(warmup):  # and compilation for the compiled provider
                        step()
                if name in counters:
                    extras[name] = {"graphs": counters[name].graphs, "compile_s": time.perf_counter() - started}
                    if counters[name].graphs == 0:
                        raise BenchmarkError("torch.compile compiled no graph: the module ran eagerly")
                timed[name] = (step, lambda b=p.backend: forcing(b))
            except Exception as e:  # reported as the provider's result
                results[name] = e
        for name, step in (steps or {}).items():
            step()
            timed[name] = (step, contextlib.nullcontext)

        def after_block(name):
            seen = torch.get_num_threads()
            if seen != threads:
                torch.set_num_threads(threads)
                raise BenchmarkError(f"the step changed torch's thread count from {threads} to {seen} while timed")

        torch.set_num_threads(threads)
        results |= measure_interleaved(timed, min_run_time, device, after_block=after_block)
    for name, counter in counters.items():
        if isinstance(results[name], dict) and counter.graphs != extras[name]["graphs"]:
            results[name] = BenchmarkError(
                f"torch.compile recompiled while timed ({counter.graphs - extras[name]['graphs']} graphs)")
    return {name: results[name] if isinstance(results[name], Exception)
            else results[name] | {"threads": threads} | extras.get(name, {}) for name in [*providers, *(steps or {})]}


def saved_activation_values(module, backend, x) -> int:
    """Values autograd saves for backward beyond the input and the parameters (activation memory)."""
    xg = x.detach().requires_grad_()
    known = {xg.data_ptr()} | {p.data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in known:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _call(module, backend, xg)
    return sum(seen.values())


# --- dropout / batch-norm heads against the original blocks ----------------------------------------------------

HEAD_CONFIGS = ("vgg-head", "wide-resnet-head")  # their scripts build Dropout -> Linear -> BatchNorm1d -> ReLU blocks
HEAD_DROPOUT = 0.5  # the scripts' nn.Dropout(p=0.5)
HEAD_MODES = (("train", "fwd+bwd"), ("eval", "forward"), ("eval", "fwd+bwd"))


def _cell_record(result, threads: int) -> dict:
    """A timing result of :func:`time_providers` as a report cell: ``status`` ok, or failed with the error's first
    line (a failed cell is reported as failed, never replaced by another provider's time)."""
    if isinstance(result, Exception):
        message = (str(result).strip().splitlines() or [type(result).__name__])[0]
        return {"status": "failed", "error": f"{type(result).__name__}: {message}", "seconds": None,
                "threads": threads}
    return {"status": "ok"} | result


def time_heads(configs, batch_sizes, dtype, device, min_run_time: float, threads: int, progress) -> list[dict]:
    """``SpinalLinear(dropout=HEAD_DROPOUT, batch_norm=True)`` against :class:`OriginalBlocks` with the same
    weights, per configuration, batch size and :data:`HEAD_MODES` (train mode: unfused, bit for bit the blocks;
    eval mode: batch norms folded, fused). Train mode needs two rows or more (batch statistics)."""
    out = []
    for cfg in configs:
        torch.manual_seed(0)
        spinal = SpinalLinear(cfg.in_features, cfg.out, layer_width=cfg.width, num_layers=cfg.num_layers,
                              num_splits=cfg.num_splits, activation=cfg.activation, dropout=HEAD_DROPOUT,
                              batch_norm=True, device=device, dtype=dtype)
        providers = {"spinal": spinal, "blocks": OriginalBlocks(spinal)}
        x1 = torch.randn(max(batch_sizes), cfg.in_features, device=device).to(dtype)
        for rows in batch_sizes:
            for train, mode in HEAD_MODES:
                if train == "train" and rows < 2:
                    continue
                print(f"[head] {cfg.name} B={rows} {train} {mode}", file=progress, flush=True)
                record = {"config": cfg.name, "rows": rows, "train": train, "mode": mode}
                for module in providers.values():
                    module.train(train == "train")
                results = time_providers({n: Provider(m) for n, m in providers.items()}, x1[:rows].contiguous(),
                                         mode, min_run_time, threads)
                for name, result in results.items():
                    record[name] = _cell_record(result, threads)
                cells = [record[n] for n in providers]
                ok = all(c["status"] == "ok" for c in cells)
                record["ratio"] = record["spinal"]["seconds"] / record["blocks"]["seconds"] if ok else None
                record["spread"] = max((c["spread"] for c in cells if c["status"] == "ok"), default=None)
                record["noisy"] = not (record["spread"] is not None and record["spread"] <= NOISY_SPREAD)
                out.append(record)
    return out


def _head_lines(report: dict, markdown: bool) -> list[str]:
    heads = report.get("heads") or []
    if not heads:
        return []
    title = (f"dropout ({HEAD_DROPOUT}) / batch-norm heads: SpinalLinear (train mode unfused, bit for bit the "
             "blocks; eval mode folded and fused) vs the original Dropout -> Linear -> BatchNorm1d -> ReLU blocks, "
             "median microseconds")

    def us(cell):
        return f"{cell['seconds'] * 1e6:.0f}" if cell["status"] == "ok" else "failed"

    cols = ["config", "B", "mode", "spinal", "blocks", "spinal/blocks", "spread"]
    rows = [[h["config"], str(h["rows"]), f"{h['train']} {h['mode']}" + (" (noisy)" if h["noisy"] else ""),
             us(h["spinal"]), us(h["blocks"]), "-" if h["ratio"] is None else f"{h['ratio']:.2f}",
             "-" if h["spread"] is None else f"{100 * h['spread']:.1f}%"] for h in heads]
    if markdown:
        return ["", title + ":", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                *("| " + " | ".join(r) + " |" for r in rows)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) + 2 for i, c in enumerate(cols)]  # a long mode stays apart
    return ["", title + ":", *("".join(f"{c:>{n}}" for c, n in zip(r, widths, strict=True))
                               for r in [cols, *rows])]


# --- the machine: CPU, native dtypes, GEMM rate, copy bandwidth, one op call -------------------------------------

_ISA_FLAGS = (  # (/proc/cpuinfo flag, name recorded)
    ("sse4_2", "SSE4.2"), ("avx", "AVX"), ("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX512_VNNI"), ("avx512_bf16", "AVX512_BF16"), ("avx512_fp16", "AVX512_FP16"),
    ("amx_tile", "AMX"), ("amx_bf16", "AMX_BF16"), ("amx_fp16", "AMX_FP16"), ("amx_int8", "AMX_INT8"),
    ("asimd", "NEON"), ("sve", "SVE"), ("bf16", "BF16"), ("asimdhp", "FP16"),
)
_NATIVE_ISA = {"bfloat16": ("AVX512_BF16", "AMX_BF16", "BF16"), "float16": ("AVX512_FP16", "AMX_FP16", "FP16")}


def cpu_info(cpuinfo: str | None = None) -> dict:
    """Model, vendor, family, model number and vector ISA of this CPU (``/proc/cpuinfo``, or ``cpuinfo`` text)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():  # the first processor describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = [name for flag, name in _ISA_FLAGS if flag in flags]
    vector = next((v for v in ("AMX", "AVX-512", "AVX2", "AVX", "SVE", "NEON") if v in isa), "unknown")
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id") or fields.get("CPU implementer", ""),
        "family": fields.get("cpu family") or fields.get("CPU architecture", ""),
        "model_number": fields.get("model") or fields.get("CPU part", ""),
        "vector_isa": vector,
        "isa": isa,
        "flags_known": bool(flags),
    }


def native_dtype_support(dtype_name: str, device: torch.device, cpu: dict) -> str | None:
    """None if ``device`` computes ``dtype_name`` natively, else the reason it does not (recorded in the report)."""
    if dtype_name in ("float32", "float64"):
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported() if dtype_name == "bfloat16" else True
        return None if ok else f"{torch.cuda.get_device_name(device)} has no native bfloat16"
    if not cpu["flags_known"]:
        return "CPU flags unknown"
    wanted = _NATIVE_ISA[dtype_name]
    if any(name in cpu["isa"] for name in wanted):
        return None
    return f"unsupported: no {' / '.join(wanted[:2])} in the CPU flags"


def gemm_step(dtype: torch.dtype, device: torch.device, kernels: str = "torch"):
    """``(step, n)``: one ``n x n x n`` product in ``dtype`` on ``device`` (n from :data:`GEMM_SIZE`), ``torch.mm``
    or the ``cpu`` backend's own product kernels (``kernels="spinal_ops"``: ``torch.ops.spinal_ops._cpu_gemm``)."""
    n = GEMM_SIZE[device.type]
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)

    def step():
        if kernels == "torch":
            torch.mm(a, b, out=out)
        else:
            torch.ops.spinal_ops._cpu_gemm(a, b, False, False)

    return step, n


def gemm_rate(dtype: torch.dtype, device: torch.device, min_run_time: float, threads: int,
              kernels: str = "torch") -> dict:
    """FLOP/s of :func:`gemm_step`'s product."""
    step, n = gemm_step(dtype, device, kernels)
    step()
    torch.set_num_threads(threads)
    timing = measure(step, min_run_time, device)
    return {"n": n, "flops_per_s": 2 * n**3 / timing["seconds"], "timing": timing}


def copy_steps(nbytes: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """``dst.copy_(src)`` with ``nbytes`` in ``src``, and the same copy of one element."""
    esize = torch.empty((), dtype=dtype).element_size()
    steps = []
    for numel in (max(1, nbytes // esize), 1):
        src = torch.randn(numel, device=device).to(dtype)
        dst = torch.empty_like(src)
        steps.append(lambda s=src, d=dst: d.copy_(s))
    return tuple(steps)


def bandwidth_of(nbytes: int, copy_s: float, one_element_copy_s: float) -> float | None:
    """Bytes per second (read + write) of a copy of ``nbytes`` that took ``copy_s``, less a one-element copy's time
    (the cost of an op call is counted once, by the floor's call term, not again in its bytes term); None where it
    took no longer (too small to see: the floor's bytes term is then 0)."""
    data_s = copy_s - one_element_copy_s
    return 2 * nbytes / data_s if data_s > 0 else None


CALL = "call"  # the floor's call term, timed in every row: one step of a tiny nn.Linear (tiny_op)
FLOOR_GEMM, FLOOR_COPY, FLOOR_COPY1 = "gemm", "copy", "copy1"  # the floor's rate and bandwidth steps of every row
FLOOR_CELLS = (CALL, FLOOR_GEMM, FLOOR_COPY, FLOOR_COPY1)


def tiny_op(dtype, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """A tiny ``nn.Linear(1, 1)`` and one row for it: one step of it is the cost of an op call (the floor's call
    term, the :data:`CALL` cell of every row, :func:`make_step`)."""
    return nn.Linear(1, 1).to(device, dtype), torch.randn(1, 1, device=device).to(dtype)


def parameter_count(cfg: SpinalConfig) -> int:
    """Parameters of the spinal layer of ``cfg`` (:attr:`spinal_ops.gpu_model.Problem.parameters`)."""
    return Problem.of(cfg, 0).parameters


def x_columns(cfg: SpinalConfig) -> int:
    """Columns of ``x`` some chunk reads."""
    return Problem.of(cfg, 0).x_columns


def mode_flops(cfg: SpinalConfig, rows: int, mode: str) -> int:
    """FLOPs of one ``mode`` step of the spinal layer on ``rows`` rows (:meth:`spinal_ops.gpu_model.Problem.flops`:
    the backward does twice the forward's)."""
    return Problem.of(cfg, rows).flops(mode)


def min_elements(cfg: SpinalConfig, rows: int, mode: str) -> int:
    """Elements one ``mode`` step must move at least once (:meth:`spinal_ops.gpu_model.Problem.min_elements`)."""
    return Problem.of(cfg, rows).min_elements(mode)


def floor(cfg: SpinalConfig, rows: int, mode: str, machine: dict, measured: dict | None = None) -> dict:
    """The floor of one row: ``max(FLOPs / rate, bytes / bandwidth) + one tiny step of the same mode``.

    ``rate``: the measured GEMM rate of the report's dtype; ``bandwidth``: the copy bandwidth measured at the
    configuration's weight size (None: too small to see; no bytes term); the call term is the time of one step of a
    tiny ``nn.Linear`` in the same mode (forward; backward alone; forward and backward). Each is taken from
    ``measured`` (``flops_per_s``, ``bytes_per_s``, ``call_s``: timed in the row, interleaved with its providers,
    :func:`row_floor_inputs`); the rate, where the row has none, from the run's ``machine`` (``floor_rate``,
    measured at its start). Reports from before 2026-12-08 measured the bandwidth and the call term at the start
    too (``machine["bandwidth"]``, ``machine["call"]``): where they have them, they stand in for a row's own. A
    term measured nowhere (a failed cell) makes the floor NaN.
    """
    measured = measured or {}
    flops = mode_flops(cfg, rows, mode)
    nbytes = min_elements(cfg, rows, mode) * machine["element_size"]
    rate = measured.get("flops_per_s", machine["floor_rate"]["flops_per_s"])
    nan = float("nan")
    bandwidth = measured["bytes_per_s"] if "bytes_per_s" in measured else \
        machine.get("bandwidth", {}).get(cfg.name, {}).get("bytes_per_s", nan)
    call_s = measured.get("call_s", machine.get("call", {}).get(mode, {}).get("seconds", nan))
    compute_s = flops / rate
    memory_s = nbytes / bandwidth if bandwidth else 0.0  # NaN where unmeasured
    seconds = nan if math.isnan(memory_s) else max(compute_s, memory_s) + call_s
    return {"seconds": seconds, "flops": flops, "bytes": nbytes, "compute_s": compute_s,
            "memory_s": memory_s, "call_s": call_s, "flops_per_s": rate, "bytes_per_s": bandwidth,
            "bound": None if math.isnan(seconds) else "compute" if compute_s >= memory_s else "memory"}


def floor_steps(machine: dict, cfg: SpinalConfig, dtype, device: torch.device) -> dict:
    """The floor's rate and bandwidth steps of one configuration, to be timed in each of its rows (``gemm``: the
    product of the rate the run chose at its start, ``copy`` / ``copy1``: the copy at the weights' size and of one
    element)."""
    rate = machine["floor_rate"]
    gemm, _ = gemm_step(getattr(torch, rate["dtype"]), device,
                        "spinal_ops" if rate.get("source") == "spinal_ops kernels" else "torch")
    copy, copy1 = copy_steps(parameter_count(cfg) * machine["element_size"], dtype, device)
    return {FLOOR_GEMM: gemm, FLOOR_COPY: copy, FLOOR_COPY1: copy1}


def row_floor_inputs(row: dict, cfg: dict, machine: dict) -> dict:
    """``floor``'s ``measured`` from a row's cells: the rate, bandwidth and call time timed in the row."""
    seconds = {name: cell["seconds"] for name in FLOOR_CELLS
               if (cell := row.get(name)) is not None and cell.get("status", "ok") == "ok"}
    measured = {}
    if CALL in seconds:
        measured["call_s"] = seconds[CALL]
    if FLOOR_GEMM in seconds:
        n = machine["gemm"][machine["floor_rate"]["dtype"]]["n"]
        measured["flops_per_s"] = 2 * n**3 / seconds[FLOOR_GEMM]
    if FLOOR_COPY in seconds and FLOOR_COPY1 in seconds:
        measured["bytes_per_s"] = bandwidth_of(cfg["parameters"] * machine["element_size"], seconds[FLOOR_COPY],
                                               seconds[FLOOR_COPY1])
    return measured


def measure_machine(dtype, device: torch.device, min_run_time: float, threads: int, cpu: dict) -> dict:
    """The GEMM rates, measured now, and the floor's rate source (the rate of each row is timed in the row, as
    are its copy bandwidth and call term: :func:`floor_steps`, :data:`CALL`)."""
    name = str(dtype).replace("torch.", "")
    gemm: dict[str, dict] = {}
    for other in dict.fromkeys(("float32", name, "bfloat16")):
        reason = native_dtype_support(other, device, cpu)
        if reason is None:
            gemm[other] = gemm_rate(getattr(torch, other), device, min_run_time, threads)
        else:
            gemm[other] = {"unsupported": reason}
    # The cpu backend's own products may run faster than torch.mm (its BLAS may take a generic path on this CPU):
    # the floor takes the faster of the two, so that no kernel of this project beats its own floor by construction.
    spinal: dict[str, dict] = {}
    if device.type == "cpu" and backends._native_kernel("CPU"):
        for other in dict.fromkeys(("float32", name)):
            if other in ("float32", "float64"):
                spinal[other] = gemm_rate(getattr(torch, other), device, min_run_time, threads, kernels="spinal_ops")
    rate_dtype = name if "flops_per_s" in gemm[name] else "float32"  # else computed in float32 units anyway
    candidates = [("torch.mm", gemm[rate_dtype]["flops_per_s"])]
    if rate_dtype in spinal:
        candidates.append(("spinal_ops kernels", spinal[rate_dtype]["flops_per_s"]))
    source, rate = max(candidates, key=lambda c: c[1])
    floor_rate = {"dtype": rate_dtype, "flops_per_s": rate, "source": source}
    if rate_dtype != name:
        floor_rate["note"] = f"{name} is not native here: the float32 rate"
    return {"gemm": gemm, "gemm_spinal_ops": spinal, "floor_rate": floor_rate,
            "element_size": torch.empty((), dtype=dtype).element_size()}


def environment(dtype, device="cpu", cpu: dict | None = None) -> dict:
    """Device, CPU, versions, dtype and threads: recorded with every number."""
    import spinal_ops

    device = torch.device(device)
    cpu = cpu or cpu_info()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "cpu": cpu["model"],
        "cpu_vendor": cpu["vendor"],
        "cpu_family": cpu["family"],
        "cpu_model_number": cpu["model_number"],
        "vector_isa": cpu["vector_isa"],
        "isa": cpu["isa"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": backends.cpu_kernel_isa(),
        "mkl": torch.backends.mkl.is_available(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "spinal_ops": spinal_ops.__version__,
        "python": platform.python_version(),
        "backends": backends.available_backends(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def check_device(device) -> torch.device:
    """``torch.device(device)``, or a :class:`BenchmarkError` saying why this process cannot time on it."""
    device = torch.device(device)
    if device.type not in DEVICES:
        raise BenchmarkError(f"--device must be one of {', '.join(DEVICES)}, got {device.type!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise BenchmarkError(f"--device cuda: no CUDA GPU is available to this process (torch {torch.__version__}, "
                             f"built with {build})")
    return device


def run(configs, batch_sizes, modes=MODES, dtype=torch.float32, min_run_time=0.2, compile_eager=True,
        device="cpu", threads: int | None = None, progress=sys.stderr, heads=HEAD_CONFIGS) -> dict:
    """Time every provider for every configuration, batch size and mode. Returns the JSON-able report.

    ``heads``: names of the configurations also timed as dropout / batch-norm heads (:func:`time_heads`), where
    they are among ``configs``.

    ``threads``: torch's intra-op thread count for the run (None: leave torch's); set before the first
    measurement, used by every cell, restored afterwards. The report records it, with the count before and after.
    """
    device = check_device(device)
    cpu = cpu_info()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # the run's start
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    records, memory = [], []
    total = len(configs) * len(batch_sizes) * len(modes)
    done = 0
    started = time.perf_counter()
    try:
        print(f"measuring the machine: GEMM rate ({used} threads)", file=progress, flush=True)
        machine = measure_machine(dtype, device, min_run_time, used, cpu)
        tiny, tiny_x = tiny_op(dtype, device)
        for cfg in configs:
            torch.manual_seed(0)
            providers = make_providers(cfg, dtype, device, compile_eager)
            x1 = torch.randn(max(batch_sizes), cfg.in_features, device=device).to(dtype)
            fused_name = next(n for n in providers if n.startswith("fused"))
            mem_rows = min(64, x1.shape[0])
            memory.append({
                "config": cfg.name,
                "rows": mem_rows,
                "fused": saved_activation_values(providers[fused_name].module, providers[fused_name].backend,
                                                 x1[:mem_rows]),
                "eager": saved_activation_values(providers["eager"].module, None, x1[:mem_rows]),
            })
            measuring = floor_steps(machine, cfg, dtype, device)
            for rows in batch_sizes:
                x = x1[:rows].contiguous()
                for mode in modes:
                    done += 1
                    print(f"[{done}/{total}] {cfg.name} B={rows} {mode} ({time.perf_counter() - started:.0f}s)",
                          file=progress, flush=True)
                    results = time_providers(providers, x, mode, min_run_time, used,
                                             steps={CALL: make_step(tiny, None, tiny_x, mode)} | measuring)
                    for name, result in results.items():
                        record = {"config": cfg.name, "rows": rows, "mode": mode, "provider": name}
                        record |= _cell_record(result, used)
                        if record["status"] == "failed":
                            print(f"  {name} failed: {record['error']}", file=progress, flush=True)
                        records.append(record)
        head_records = time_heads([c for c in configs if c.name in heads], batch_sizes, dtype, device,
                                  min_run_time, used, progress)
    finally:
        torch.set_num_threads(threads_before)
        if compile_eager:
            torch._dynamo.reset()
    env = environment(dtype, device, cpu) | {"date": date, "threads": used, "threads_before": threads_before,
                                             "threads_after": torch.get_num_threads(),
                                             "min_run_time": min_run_time, "noisy_spread": NOISY_SPREAD}
    report = {"environment": env, "machine": machine,
              "configs": [c._asdict() | {"flop_ratio": c.flops_per_row() / c.dense_flops_per_row(),
                                         "parameters": parameter_count(c)} for c in configs],
              "records": records, "memory": memory, "heads": head_records}
    report["rows"] = ratios(report)
    return report


def ratios(report: dict) -> list[dict]:
    """One row per (config, rows, mode): times, spread, floor, and the fused time's ratio to each other column.

    ``fused`` is the fastest fused provider of the row; a failed cell's time and ratios are NaN. ``spread`` is the
    largest spread of the row's timed cells; ``noisy`` when it exceeds ``NOISY_SPREAD``.
    """
    cells: dict[tuple, dict] = {}
    for r in report["records"]:
        cells.setdefault((r["config"], r["rows"], r["mode"]), {})[r["provider"]] = r
    configs = {c["name"]: SpinalConfig(**{k: c[k] for k in SpinalConfig._fields}) for c in report["configs"]}
    flop = {c["name"]: c["flop_ratio"] for c in report["configs"]}
    config_records = {c["name"]: c for c in report["configs"]}
    nan = float("nan")

    def seconds(cell):
        return cell["seconds"] if cell is not None and cell.get("status", "ok") == "ok" else nan

    rows = []
    for (cfg, b, mode), row in cells.items():
        fused_cells = {k: v for k, v in row.items() if k.startswith("fused")}
        fused_name = min(fused_cells, key=lambda k: (math.isnan(seconds(fused_cells[k])), seconds(fused_cells[k])))
        fused = seconds(row[fused_name])
        others = [k for k in ("dense", "eager", "compiled", "reference") if k in row or k != "reference"]
        times = {"fused": fused} | {k: seconds(row.get(k)) for k in others}
        spread = max((c["spread"] for c in row.values() if c.get("status", "ok") == "ok"), default=nan)
        out = {"config": cfg, "rows": b, "mode": mode, "fused_provider": fused_name}
        out |= {f"{k}_us": v * 1e6 for k, v in times.items()}
        if "machine" in report:
            fl = floor(configs[cfg], b, mode, report["machine"],
                       row_floor_inputs(row, config_records[cfg], report["machine"]))
            out |= {"floor_us": fl["seconds"] * 1e6, "floor_bound": fl["bound"], "call_us": fl["call_s"] * 1e6,
                    "floor_flops_per_s": fl["flops_per_s"], "floor_bytes_per_s": fl["bytes_per_s"]}
            times["floor"] = fl["seconds"]
        for k in ("dense", "eager", "compiled", "reference", "floor"):
            if k in times:
                out[f"fused/{k}"] = fused / times[k] if times[k] > 0 else nan
        compiled = row.get("compiled")
        out |= {"flop_ratio": flop[cfg], "spread": spread, "noisy": not spread <= NOISY_SPREAD,
                "graphs": compiled.get("graphs") if compiled else None,
                "failed": sorted(k for k, c in row.items() if c.get("status", "ok") != "ok")}
        rows.append(out)
    return rows


# --- output: text table, markdown table, plot, results folder ----------------------------------------------------

COLUMNS = (  # (header, row key, format)
    ("fused", "fused_us", "time"), ("dense", "dense_us", "time"), ("eager", "eager_us", "time"),
    ("compiled", "compiled_us", "time"), ("floor", "floor_us", "time"), ("f/dense", "fused/dense", "ratio"),
    ("f/eager", "fused/eager", "ratio"), ("f/comp", "fused/compiled", "ratio"), ("f/floor", "fused/floor", "ratio"),
    ("flops", "flop_ratio", "ratio"), ("graphs", "graphs", "count"), ("spread", "spread", "percent"),
    ("reference", "reference_us", "time"), ("f/ref", "fused/reference", "ratio"),
)


def _cell(row: dict, key: str, kind: str) -> str:
    value = row.get(key)
    if kind == "count":
        return "-" if value is None else str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        provider = row["fused_provider"] if key == "fused_us" else key.removesuffix("_us")
        return "failed" if kind == "time" and provider in row["failed"] else "-"
    if kind == "time":
        return f"{value:.0f}" if value >= 1000 else f"{value:.1f}"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    return f"{value:.2f}"


def _columns(report: dict) -> list[tuple[str, str, str]]:
    compiled = any(r["provider"] == "compiled" for r in report["records"])
    floor_present = "machine" in report
    reference = any(r["provider"] == "reference" for r in report["records"])
    return [c for c in COLUMNS if (compiled or c[0] not in ("compiled", "f/comp", "graphs"))
            and (floor_present or c[0] not in ("floor", "f/floor"))
            and (reference or c[0] not in ("reference", "f/ref"))]


def _fused_label(rows: list[dict]) -> str:
    return ", ".join(dict.fromkeys(r["fused_provider"] for r in rows))


def _threads(env: dict) -> str:
    return f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.1f}" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f}"


def describe_machine(report: dict) -> list[str]:
    """Lines on where and how the numbers were taken (CPU, threads, dtype, rates, noisy rows, failures)."""
    env, rows = report["environment"], ratios(report)
    where = env.get("gpu") or env["cpu"]
    cpu = (f"{env['cpu']} (vendor {env.get('cpu_vendor') or '?'}, family {env.get('cpu_family') or '?'}, model "
           f"{env.get('cpu_model_number') or '?'}; {env.get('vector_isa', '?')}, torch capability "
           f"{env.get('cpu_capability')}, spinal_ops cpu kernels {env.get('cpu_kernels') or 'none'})")
    lines = [f"{env['date']}, {where}, {_threads(env)}, {env['dtype']}, torch {env['torch']}"
             f"{' with MKL' if env.get('mkl') else ''}, spinal_ops {env.get('spinal_ops')}, backends "
             f"{', '.join(env['backends'])}",
             f"cpu: {cpu}; threads before/used/after: {env.get('threads_before')}/{env['threads']}/"
             f"{env.get('threads_after')}"]
    machine = report.get("machine")
    if machine:
        rates = []
        for name, g in machine["gemm"].items():
            own = machine.get("gemm_spinal_ops", {}).get(name)
            rates.append((f"{name} {g['flops_per_s'] / 1e9:.1f} GFLOP/s torch.mm" if "flops_per_s" in g
                          else f"{name} {g['unsupported']}")
                         + (f", {own['flops_per_s'] / 1e9:.1f} GFLOP/s spinal_ops kernels" if own else "")
                         + (f" (n={g['n']})" if "n" in g else ""))
        lines.append(f"GEMM rate at the start: {'; '.join(rates)}; floor uses {machine['floor_rate']['dtype']}, "
                     f"{machine['floor_rate'].get('source', 'torch.mm')}"
                     + (f" ({machine['floor_rate']['note']})" if "note" in machine["floor_rate"] else ""))
        per_mode: dict[str, list[float]] = {}
        for r in rows:
            if not math.isnan(r.get("call_us", math.nan)):
                per_mode.setdefault(r["mode"], []).append(r["call_us"])
        calls = ", ".join(f"{m} {_span(v)}" for m, v in per_mode.items()) or "-"
        if "bandwidth" in machine:  # a report from before 2026-12-08: the copies timed at the start too
            bw = [b["bytes_per_s"] for b in machine["bandwidth"].values() if b["bytes_per_s"]] or [math.nan]
            lines.append(f"copy bandwidth at the weights' size at the start: {min(bw) / 1e9:.1f} to "
                         f"{max(bw) / 1e9:.1f} GB/s")
        row_rates = [r["floor_flops_per_s"] / 1e9 for r in rows if "floor_flops_per_s" in r]
        row_bw = [r["floor_bytes_per_s"] / 1e9 for r in rows if r.get("floor_bytes_per_s")]
        timed_in_rows = any(r["provider"] == FLOOR_GEMM for r in report["records"])
        lines.append((f"the floor of each row, timed in the row: GEMM rate {_span(row_rates)} GFLOP/s, copy "
                      f"bandwidth {_span(row_bw) if row_bw else '-'} GB/s, " if timed_in_rows and row_rates else "")
                     + f"one tiny op step (us): {calls}")
    noisy = sum(r["noisy"] for r in rows)
    failed = [f"{r['config']} B={r['rows']} {r['mode']}: {', '.join(r['failed'])}" for r in rows if r["failed"]]
    graphs = [r["graphs"] for r in rows if r["graphs"] is not None]
    lines.append(f"fused = {_fused_label(rows)}; noisy rows (spread > {NOISY_SPREAD:.0%} of the median): {noisy} "
                 f"of {len(rows)}" + ("" if graphs == [] else f"; compiled graphs per cell {min(graphs)} to "
                                                              f"{max(graphs)}")
                 + (f"; failed cells: {'; '.join(failed)}" if failed else "; no failed cell"))
    return lines


def format_table(report: dict) -> str:
    rows = ratios(report)
    cols = _columns(report)
    lines = describe_machine(report)
    lines[0] = f"spinal_ops benchmark -- {lines[0]}"
    lines += [
        "median times in microseconds; ratios < 1 mean the fused layer is faster; flops = fused/dense FLOP ratio;",
        "floor = max(FLOPs / GEMM rate, bytes / bandwidth) + one tiny op step; spread = largest IQR / median of "
        "the row; graphs = graphs torch.compile compiled",
        "",
        f"{'config':<20}{'B':>6} {'mode':<8}" + "".join(f"{h:>10}" for h, _, _ in cols),
    ]
    for r in rows:
        lines.append(f"{r['config']:<20}{r['rows']:>6} {r['mode']:<8}"
                     + "".join(f"{_cell(r, k, kind):>10}" for _, k, kind in cols) + ("  NOISY" if r["noisy"] else ""))
    lines += ["", "activation memory saved for backward (values):"]
    for m in report["memory"]:
        lines.append(f"  {m['config']:<20} B = {m['rows']:<4} fused {m['fused']:>9}  eager {m['eager']:>9}  "
                     f"({m['fused'] / max(m['eager'], 1):.2f}x)")
    return "\n".join(lines + _head_lines(report, markdown=False))


def format_markdown(report: dict) -> str:
    """The README's tables: how the run was obtained, then one pipe-table row per (config, B, mode), then the
    dropout / batch-norm heads."""
    env, rows, cols = report["environment"], ratios(report), _columns(report)
    heads = report.get("heads") or []
    noisy = sum(r["noisy"] for r in rows) + sum(h["noisy"] for h in heads)
    lines = []
    if noisy:
        lines += [f"**Not for the README: {noisy} of {len(rows) + len(heads)} rows are noisy (spread > "
                  f"{NOISY_SPREAD:.0%}); "
                  "rerun on a quiet machine.**", ""]
    lines += [f"`{env.get('command', 'python -m spinal_ops bench')}`:\n" + ";\n".join(describe_machine(report)), "",
              "| config | B | mode | " + " | ".join(h for h, _, _ in cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        noisy_mark = " (noisy)" if r["noisy"] else ""
        lines.append(f"| {r['config']} | {r['rows']} | {r['mode']}{noisy_mark} | "
                     + " | ".join(_cell(r, k, kind) for _, k, kind in cols) + " |")
    return "\n".join(lines + _head_lines(report, markdown=True)) + "\n"


PLOT_STYLE = {"fused": ("C0", "o"), "dense": ("C1", "s"), "eager": ("C2", "^"), "compiled": ("C3", "v"),
              "reference": ("C4", "D")}


def plot(report: dict, path: str) -> None:
    """PNG: time per call against batch size, one panel per (configuration, mode), log-log.

    Every provider with its interquartile range as error bars, the floor as a dashed line, and fused/floor
    written next to each fused point; one legend shared by all panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = ratios(report)
    cells = {(r["config"], r["rows"], r["mode"], r["provider"]): r for r in report["records"]}
    configs = list(dict.fromkeys(r["config"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    batch = sorted({r["rows"] for r in rows})
    fig, axes = plt.subplots(len(configs), len(modes), figsize=(4.6 * len(modes), 2.9 * len(configs) + 0.8),
                             squeeze=False)
    for i, cfg in enumerate(configs):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            mine = sorted((r for r in rows if r["config"] == cfg and r["mode"] == mode), key=lambda r: r["rows"])
            for provider, (color, marker) in PLOT_STYLE.items():
                pts = []
                for r in mine:
                    name = r["fused_provider"] if provider == "fused" else provider
                    c = cells.get((cfg, r["rows"], mode, name))
                    if c is not None and c.get("status", "ok") == "ok":
                        pts.append((r["rows"], c["seconds"], c["q1"], c["q3"]))
                if pts:
                    label = _fused_label(rows) if provider == "fused" else provider
                    ax.errorbar([p[0] for p in pts], [p[1] * 1e6 for p in pts],
                                yerr=[[(p[1] - p[2]) * 1e6 for p in pts], [(p[3] - p[1]) * 1e6 for p in pts]],
                                color=color, marker=marker, markersize=4, capsize=3, linewidth=1.2, label=label)
            if mine and "floor_us" in mine[0]:
                ax.plot([r["rows"] for r in mine], [r["floor_us"] for r in mine], color="black", linestyle="--",
                        linewidth=1, label="floor")
                for r in mine:
                    if not math.isnan(r["fused_us"]):
                        ax.annotate(f"{r['fused/floor']:.1f}x", (r["rows"], r["fused_us"]), fontsize=7,
                                    textcoords="offset points", xytext=(4, 4), color="C0")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(batch, [str(b) for b in batch])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            low, high = ax.get_ylim()
            subs = (1.0, 2.0, 5.0) if high / low < 10**2.5 else (1.0,)  # 1-2-5 ticks unless they would crowd
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{cfg} -- {mode}", fontsize=9)
            if i == len(configs) - 1:
                ax.set_xlabel("batch size B")
            if j == 0:
                ax.set_ylabel("time per call (us)")
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    order = sorted(handles, key=lambda label: label == "floor")  # the providers, then the floor
    fig.legend([handles[k] for k in order], order, loc="upper center", ncol=len(order), fontsize=9,
               title="median per call, interquartile range as error bars; the label at each fused point is "
                     "fused/floor", title_fontsize=8)
    env = report["environment"]
    fig.suptitle(f"{env.get('gpu') or env['cpu']}, {_threads(env)}, {env['dtype']}, torch {env['torch']}",
                 fontsize=9, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.25 / fig.get_figheight(), 1, 1 - 0.55 / fig.get_figheight()))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _jsonable(value):
    """``value`` with NaN and infinities as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_folder(out_root: str, date: str) -> str:
    """A new folder under ``out_root`` named after ``date`` (a second run in the same second gets ``-2``, ...)."""
    stamp = datetime.datetime.fromisoformat(date).strftime("%Y%m%d-%H%M%S")
    os.makedirs(out_root, exist_ok=True)
    for n in range(1, 1000):
        path = os.path.join(out_root, stamp if n == 1 else f"{stamp}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise BenchmarkError(f"no free run folder for {stamp} under {out_root}")


def point_latest(out_root: str, folder: str) -> str | None:
    """Point ``out_root/latest`` at ``folder`` (a relative symlink, replaced atomically).

    Returns the link, or None where there is something else called ``latest`` (left alone) or no symlinks.
    """
    link = os.path.join(out_root, "latest")
    if os.path.lexists(link) and not os.path.islink(link):
        return None
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        os.symlink(os.path.basename(folder), tmp)
        os.replace(tmp, link)
    except OSError:
        return None
    return link


def save(report: dict, out_root: str) -> dict[str, str]:
    """Write the report into a new timestamped folder under ``out_root``; point ``out_root/latest`` at it.

    Files: ``bench.json`` (everything), ``bench.txt`` (the printed table), ``bench.md`` (the README table) and
    ``bench.png``. Returns their paths, with ``folder`` and ``latest`` (None where the link could not be made).
    """
    folder = run_folder(out_root, report["environment"]["date"])
    paths = {name: os.path.join(folder, f"bench.{name}") for name in ("json", "txt", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(_jsonable(report), f, indent=1, allow_nan=False)
    with open(paths["txt"], "w") as f:
        f.write(format_table(report) + "\n")
    with open(paths["md"], "w") as f:
        f.write(format_markdown(report))
    plot(report, paths["png"])
    return paths | {"folder": folder, "latest": point_latest(out_root, folder)}
