"""Side-by-side benchmark of a spinal layer against what it replaces (``python -m spinal_ops bench``).

Providers, all holding the same weights:

- ``fused[<backend>]``: :class:`SpinalLinear` on a backend of this device (interpreted Triton excluded);
- ``eager``: the original scripts' code path, an ``nn.Linear`` per sub-layer fed ``torch.cat([chunk, h])``;
- ``compiled``: ``torch.compile`` of ``eager`` (inductor);
- ``dense``: ``nn.Linear(D, L*w) + ReLU + nn.Linear(L*w, out)``, the dense layer a spinal head replaces.

Modes: ``forward`` (under ``torch.no_grad``), ``backward`` (one retained graph, backward timed alone) and
``fwd+bwd``. Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange``. Nothing here asserts speed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import torch
from torch import nn

from . import backends, reference
from .configs import SpinalConfig
from .module import SpinalLinear

MODES = ("forward", "backward", "fwd+bwd")


class EagerSpinal(nn.Module):
    """The original scripts' code path, built from a :class:`SpinalLinear` (same weights)."""

    def __init__(self, spinal: SpinalLinear):
        super().__init__()
        layers, head = spinal.to_linears()
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.chunk = spinal.chunk
        self.starts = reference.split_starts(spinal.in_features, spinal.num_splits, spinal.num_layers,
                                             spinal.split_mode)
        self.activation = spinal.activation
        self.negative_slope = spinal.negative_slope

    def _chunk(self, x, s):
        end = s + self.chunk
        if end <= x.shape[1]:
            return x[:, s:end]
        return torch.cat([x[:, s:], x[:, : end - x.shape[1]]], dim=1)

    def forward(self, x):
        outs = []
        h = None
        for lin, s in zip(self.layers, self.starts, strict=False):
            xi = self._chunk(x, s)
            z = lin(xi if h is None else torch.cat([xi, h], dim=1))
            h = reference.activate(z, self.activation, self.negative_slope)
            outs.append(h)
        hcat = torch.cat(outs, dim=1)
        return self.head(hcat) if self.head is not None else hcat


def dense_equivalent(cfg: SpinalConfig, dtype=None, device=None) -> nn.Module:
    """The dense layer a spinal head replaces: same input, same hidden width ``L*w``, same outputs."""
    hidden = cfg.num_layers * cfg.width
    act = nn.LeakyReLU() if cfg.activation == "leaky_relu" else nn.ReLU()
    return nn.Sequential(nn.Linear(cfg.in_features, hidden), act, nn.Linear(hidden, cfg.out)).to(device, dtype)


def fused_backends(device: torch.device) -> list[str]:
    """Native/compiled backends worth timing on ``device`` (interpreted Triton is a correctness tool only)."""
    names = [b for b in backends.available_backends() if b != "reference" and backends._serves(b, device.type)]
    return [b for b in names if not (b == "triton" and device.type == "cpu")]


def make_providers(cfg: SpinalConfig, dtype, device, compile_eager: bool = True) -> dict:
    """``{name: (module, backend or None)}`` for one configuration, all with the same spinal weights."""
    spinal = SpinalLinear(cfg.in_features, cfg.out, layer_width=cfg.width, num_layers=cfg.num_layers,
                          num_splits=cfg.num_splits, activation=cfg.activation, device=device, dtype=dtype)
    eager = EagerSpinal(spinal)
    providers = {f"fused[{b}]": (spinal, b) for b in fused_backends(torch.device(device))}
    providers["eager"] = (eager, None)
    if compile_eager:
        providers["compiled"] = (torch.compile(EagerSpinal(spinal), dynamic=False), None)
    providers["dense"] = (dense_equivalent(cfg, dtype, device), None)
    return providers


def _call(module, backend, x):
    if backend is None:
        return module(x)
    with backends.use_backend(backend):
        return module(x)


def make_step(module, backend, x, mode: str):
    """A no-argument callable running one ``mode`` step of one provider on ``x``."""
    if mode == "forward":
        def step():
            with torch.no_grad():
                _call(module, backend, x)
    elif mode == "fwd+bwd":
        xg = x.detach().requires_grad_()
        grad = torch.ones(x.shape[0], _call(module, backend, x[:1]).shape[1], dtype=x.dtype, device=x.device)

        def step():
            _call(module, backend, xg).backward(grad)
    elif mode == "backward":
        xg = x.detach().requires_grad_()
        y = _call(module, backend, xg)
        grad = torch.ones_like(y)

        def step():
            y.backward(grad, retain_graph=True)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return step


def time_provider(module, backend, x, mode: str, min_run_time: float) -> float:
    """Median seconds per call of ``mode`` for one provider, with all of torch's intra-op threads.

    ``torch.utils.benchmark.Timer`` runs single-threaded unless told otherwise (``num_threads=1`` is its default):
    it is given the thread count the report records, so every provider runs as it would in the caller's process.
    """
    from torch.utils.benchmark import Timer

    step = make_step(module, backend, x, mode)
    for _ in range(2):  # warm-up (and compilation for the compiled provider)
        step()
    timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


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


def environment(dtype) -> dict:
    """Device, versions, dtype and threads: recorded with every number."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import spinal_ops

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "spinal_ops": spinal_ops.__version__,
        "python": platform.python_version(),
        "backends": backends.available_backends(),
    }


def run(configs, batch_sizes, modes=MODES, dtype=torch.float32, min_run_time=0.2, compile_eager=True,
        progress=sys.stderr) -> dict:
    """Time every provider for every configuration, batch size and mode. Returns the JSON-able report."""
    device = "cpu"
    records = []
    memory = []
    total = len(configs) * len(batch_sizes) * len(modes)
    step = 0
    started = time.perf_counter()
    for cfg in configs:
        torch.manual_seed(0)
        providers = make_providers(cfg, dtype, device, compile_eager)
        x1 = torch.randn(max(batch_sizes), cfg.in_features, dtype=dtype, device=device)
        fused_name = next(n for n in providers if n.startswith("fused"))
        mem_rows = min(64, x1.shape[0])
        memory.append({
            "config": cfg.name,
            "rows": mem_rows,
            "fused": saved_activation_values(*providers[fused_name], x1[:mem_rows]),
            "eager": saved_activation_values(*providers["eager"], x1[:mem_rows]),
        })
        for rows in batch_sizes:
            x = x1[:rows].contiguous()
            for mode in modes:
                step += 1
                print(f"[{step}/{total}] {cfg.name} B={rows} {mode} ({time.perf_counter() - started:.0f}s)",
                      file=progress, flush=True)
                for name, (module, backend) in providers.items():
                    seconds = time_provider(module, backend, x, mode, min_run_time)
                    records.append({"config": cfg.name, "rows": rows, "mode": mode, "provider": name,
                                    "seconds": seconds})
    return {"environment": environment(dtype), "configs": [c._asdict() | {
        "flop_ratio": c.flops_per_row() / c.dense_flops_per_row()} for c in configs], "records": records,
        "memory": memory}


def ratios(report: dict) -> list[dict]:
    """One row per (config, rows, mode): fused time and its ratio to dense, eager and compiled."""
    times: dict[tuple, dict] = {}
    for r in report["records"]:
        times.setdefault((r["config"], r["rows"], r["mode"]), {})[r["provider"]] = r["seconds"]
    flop = {c["name"]: c["flop_ratio"] for c in report["configs"]}
    rows = []
    for (cfg, b, mode), t in times.items():
        fused = min(v for k, v in t.items() if k.startswith("fused"))
        rows.append({
            "config": cfg, "rows": b, "mode": mode, "fused_us": fused * 1e6,
            "dense_us": t["dense"] * 1e6, "eager_us": t["eager"] * 1e6,
            "compiled_us": t["compiled"] * 1e6 if "compiled" in t else float("nan"),
            "fused/dense": fused / t["dense"], "fused/eager": fused / t["eager"],
            "fused/compiled": fused / t["compiled"] if "compiled" in t else float("nan"),
            "flop_ratio": flop[cfg],
        })
    return rows


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"spinal_ops benchmark -- {env['date']}, {env['cpu']}, {env['threads']} threads, {env['dtype']}, "
        f"torch {env['torch']}, backends {', '.join(env['backends'])}",
        "median times in microseconds; ratios < 1 mean the fused layer is faster; flops = fused/dense FLOP ratio",
        "",
        f"{'config':<20}{'B':>6} {'mode':<8}{'fused':>11}{'dense':>11}{'eager':>11}{'compiled':>11}"
        f"{'f/dense':>9}{'f/eager':>9}{'f/comp':>9}{'flops':>7}",
    ]
    for r in ratios(report):
        lines.append(
            f"{r['config']:<20}{r['rows']:>6} {r['mode']:<8}{r['fused_us']:>11.1f}{r['dense_us']:>11.1f}"
            f"{r['eager_us']:>11.1f}{r['compiled_us']:>11.1f}{r['fused/dense']:>9.2f}{r['fused/eager']:>9.2f}"
            f"{r['fused/compiled']:>9.2f}{r['flop_ratio']:>7.2f}"
        )
    lines += ["", "activation memory saved for backward (values):"]
    for m in report["memory"]:
        lines.append(f"  {m['config']:<20} B = {m['rows']:<4} fused {m['fused']:>9}  eager {m['eager']:>9}  "
                     f"({m['fused'] / max(m['eager'], 1):.2f}x)")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """PNG: speedup of the fused layer over the dense one vs batch size, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ratios(report)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=False):
        for cfg in dict.fromkeys(r["config"] for r in rows):
            pts = sorted((r["rows"], 1 / r["fused/dense"]) for r in rows if r["config"] == cfg and r["mode"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cfg)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("speedup vs dense (dense time / fused time)")
        ax.set_title(mode)
    axes[0][0].legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"SpinalLinear vs the dense layer it replaces -- {env['cpu']}, {env['threads']} threads, "
                 f"{env['dtype']}, torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(report: dict, out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "bench.json")
    png_path = os.path.join(out_dir, "bench.png")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, png_path)
    return json_path, png_path
