"""Command line of spinal_ops: python -m spinal_ops {bench,check,demo,gpu-model}.

Building the parser and printing help import nothing heavy (no torch): every subcommand imports what it needs
when it runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shlex
import sys

PROG = "python -m spinal_ops"
DESCRIPTION = ("Fused SpinalNet layers for PyTorch. Subcommands: bench (the benchmark report), check (backends and "
               "build flags, each backend verified against the reference), demo (a small classifier trained with "
               "three heads), gpu-model (the GPU cost model's table: no GPU needed, no GPU measured).")
# The report's defaults, as the help shows them (spinal_ops.configs and spinal_ops.benchmark hold the values;
# the tests check that these texts agree with them).
BENCH_DEFAULTS_TEXT = {"configs": "all", "batch_sizes": "1 64 1024", "modes": "forward backward fwd+bwd"}
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64", "bfloat16", "float16")
MODES = ("forward", "backward", "fwd+bwd")
# The GPU cost model's choices (spinal_ops.gpu_model holds the values; the tests check that these agree with them).
GPU_MODEL_DEVICES = ("h100-sxm", "h200", "a100-sxm")
GPU_MODEL_DEFAULT_DEVICES = ("h100-sxm", "h200")
GPU_MODEL_MATHS = ("bf16", "fp32", "tf32")
GPU_MODEL_DEFAULT_MATHS = ("bf16", "fp32")
GPU_MODEL_MODES = ("forward", "fwd+bwd")
GPU_MODEL_BATCH_SIZES_TEXT = "1 64 1024 65536"


def _number(convert, accept, what: str):
    """An argparse type: ``convert(text)`` where ``accept`` holds, else one error line saying it must be ``what``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")


def config_names() -> list[str]:
    """The benchmark configurations' names (importing spinal_ops.configs, hence torch: call it only to check)."""
    from spinal_ops.configs import CONFIG_BY_NAME

    return sorted(CONFIG_BY_NAME)


def config_name(text: str) -> str:
    """argparse type: a configuration of spinal_ops/configs.py (read when an argument is checked, not for help)."""
    names = config_names()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown configuration {text!r} (choose from {', '.join(names)})")
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown for every option; an option whose help already says its default is left as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _check(args) -> int:
    import torch

    import spinal_ops
    from spinal_ops import _tolerance, backends, ops

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    print(f"spinal_ops {spinal_ops.__version__}, torch {torch.__version__} (CUDA build: {torch.version.cuda}), "
          f"triton {version('triton')}, python {sys.version.split()[0]}")
    error = ops.NATIVE_IMPORT_ERROR
    if error is None:
        print("native extension spinal_ops._C: loaded")
    elif isinstance(error, ModuleNotFoundError):
        print("native extension spinal_ops._C: not built (a source checkout: `pip install --no-build-isolation -e .`)")
    else:
        print(f"native extension spinal_ops._C: NOT loaded. {ops.native_load_message(error)}")
    try:
        from spinal_ops._build_info import CONFIG

        print("  built with: " + ", ".join(f"{k}={v}" for k, v in CONFIG.items()))
    except ImportError:
        pass
    isa = backends.cpu_kernel_isa()
    print(f"  C++ CPU kernels: {f'yes ({isa} kernels)' if isa else 'no'}; "
          f"CUDA kernels compiled in: {'yes' if backends._native_kernel('CUDA') else 'no'}")
    print(f"TRITON_INTERPRET=1: {backends.triton_interpreted()}; GPU present: {torch.cuda.is_available()}")
    usable = spinal_ops.available_backends()
    print(f"available backends: {', '.join(usable)}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [  # (D, K, w, L, out, split_mode, activation, shared, head)
        (13, 3, 5, 4, 3, "cyclic", "relu", False, True),
        (16, 2, 8, 4, 10, "alternate", "gelu", False, True),
        (12, 3, 4, 6, 0, "cyclic", "tanh", True, False),
    ]
    failures = 0
    for name in usable:
        if not backends._serves(name, device):
            print(f"  {name:<10} skipped (does not run on {device} tensors)")
            continue
        worst, ok = 0.0, True
        for d, k, w, L, out, mode, act, shared, head in cases:
            torch.manual_seed(0)
            m = spinal_ops.SpinalLinear(d, out if head else L * w, layer_width=w, num_layers=L, num_splits=k,
                                        split_mode=mode, activation=act, shared_weights=shared, head=head,
                                        device=device, dtype=torch.float64)
            x = torch.randn(9, d, dtype=torch.float64, device=device)
            results = []
            for backend in ("reference", name):
                xg = x.clone().requires_grad_()
                m.zero_grad()
                with spinal_ops.use_backend(backend):
                    y = m(xg)
                y.square().sum().backward()
                results.append([y.detach(), xg.grad] + [p.grad.clone() for p in m.parameters()])
            for a, b in zip(*results, strict=False):  # a: the reference, b: the backend
                err = _tolerance.max_error(b, a)
                ok = ok and err <= _tolerance.tolerance(a, None, torch.float64)  # the tests' rule: floor alone
                scale = a.abs().max().item() if a.numel() else 0.0
                worst = max(worst, err / scale if scale else (0.0 if err == 0 else float("inf")))
        failures += not ok
        print(f"  {name:<10} {'OK  ' if ok else 'FAIL'} max relative difference to the reference "
              f"{worst:.1e} (float64, outputs and every gradient, {len(cases)} layers; tolerance "
              f"{_tolerance.FLOOR[torch.float64]:.0e} of the largest value)")
    return 1 if failures else 0


def _error(message: str, command: str = "bench") -> int:
    """One error line on stderr, exit status 2 (as argparse's own errors)."""
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


# Packages a command needs beyond torch: the package's extra that installs them, and the modules.
EXTRAS = {"bench": ("matplotlib",), "demo": ("numpy", "sklearn", "matplotlib", "tqdm")}


def _missing_extra(command: str) -> str | None:
    """The error line when a package the command needs is not installed (``pip install 'spinal_ops[<command>]'``)."""
    missing = [m for m in EXTRAS[command] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"needs {', '.join(missing)}, not installed: pip install 'spinal_ops[{command}]' (from a source "
            "checkout: pip install -r requirements.txt)")


def _bench(args) -> int:
    if (missing := _missing_extra("bench")) is not None:
        return _error(missing)
    import torch

    from spinal_ops import benchmark
    from spinal_ops.configs import BENCH_BATCH_SIZES, CONFIG_BY_NAME, CONFIGS

    try:
        benchmark.check_device(args.device)
    except benchmark.BenchmarkError as e:
        return _error(str(e))
    configs = CONFIGS if not args.configs else [CONFIG_BY_NAME[n] for n in args.configs]
    report = benchmark.run(configs, args.batch_sizes or list(BENCH_BATCH_SIZES), args.modes or benchmark.MODES,
                           dtype=getattr(torch, args.dtype), min_run_time=args.min_run_time,
                           compile_eager=not args.no_compile, device=args.device, threads=args.threads)
    report["environment"]["command"] = f"{PROG} {shlex.join(args.argv)}"
    print(benchmark.format_table(report))
    paths = benchmark.save(report, args.out)
    print(f"\nwrote {paths['json']}, {paths['txt']}, {paths['md']} (the README table) and {paths['png']}")
    print(f"{paths['latest']} -> {paths['folder']}" if paths["latest"] else
          f"{args.out}/latest not updated (it is not a symbolic link here)")
    return 0


def _gpu_model(args) -> int:
    from spinal_ops import gpu_model
    from spinal_ops.configs import CONFIG_BY_NAME, CONFIGS, ROOFLINE_BATCH_SIZES

    configs = CONFIGS if not args.configs else [CONFIG_BY_NAME[n] for n in args.configs]
    rows = gpu_model.model_rows(devices=args.devices or GPU_MODEL_DEFAULT_DEVICES, configs=configs,
                                batch_sizes=args.batch_sizes or ROOFLINE_BATCH_SIZES,
                                modes=args.modes or GPU_MODEL_MODES, maths=args.math or GPU_MODEL_DEFAULT_MATHS)
    print(gpu_model.format_markdown(rows) if args.markdown else gpu_model.format_table(rows))
    print()
    print(gpu_model.summary(rows))
    return 0


def _demo(args) -> int:
    if (missing := _missing_extra("demo")) is not None:
        return _error(missing, "demo")
    from spinal_ops import demo

    demo.run(epochs=args.epochs, seed=args.seed, out=args.out, progress=not args.no_progress, threads=args.threads)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser (by name)."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,check,demo,gpu-model}")

    def command(name, func, summary, description):
        p = sub.add_parser(name, formatter_class=HelpFormatter, help=summary, description=description)
        p.set_defaults(func=func)
        return p

    bench = command(
        "bench", _bench,
        "time SpinalLinear against the dense layer, the eager chain and torch.compile",
        "Time the fused SpinalLinear against the dense layer it replaces, the original eager chain "
        "and torch.compile of that chain, per configuration, batch size and mode. Every cell is "
        "timed in blocks (median and interquartile range; rows spreading over 10 percent are flagged "
        "noisy) on the thread count the report records; each row has a floor measured on this "
        "machine. Prints a table and writes bench.json, bench.txt, bench.md (the README table) and "
        "bench.png into a new timestamped folder under --out, with a 'latest' link to it.")
    bench.add_argument("--configs", nargs="+", type=config_name, metavar="NAME",
                       help=f"configurations of spinal_ops/configs.py (default: {BENCH_DEFAULTS_TEXT['configs']})")
    bench.add_argument("--batch-sizes", nargs="+", type=positive_int, metavar="B",
                       help=f"batch sizes (default: {BENCH_DEFAULTS_TEXT['batch_sizes']})")
    bench.add_argument("--modes", nargs="+", choices=MODES,
                       help=f"what is timed (default: {BENCH_DEFAULTS_TEXT['modes']})")
    bench.add_argument("--device", default="cpu", choices=DEVICES, help="device the tensors live on")
    bench.add_argument("--dtype", default="float32", choices=DTYPES,
                       help="dtype of inputs and weights (bfloat16/float16 add a column for the reference backend)")
    bench.add_argument("--threads", type=positive_int,
                       help="torch.set_num_threads for the run, restored afterwards (default: torch's choice)")
    bench.add_argument("--min-run-time", type=positive_float, default=0.2,
                       help="seconds of timing per cell, at least")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    bench.add_argument("--out", default="bench-results", help="folder holding one timestamped folder per run")

    check = command(
        "check", _check,
        "list backends and build flags; verify each backend against the reference",
        "Print versions, build flags and the backends usable in this process, then run each "
        "backend on three small layers in float64 and compare outputs and gradients with the "
        "reference backend. Exit status 1 if one differs.")

    demo = command(
        "demo", _demo,
        "train a small CNN on the 8x8 digits with a linear, a dense and a spinal head",
        "Train a small CNN on scikit-learn's 8x8 digits (no download) three times, with an "
        "nn.Linear head, the dense two-layer head of the spinal head's hidden width, and a "
        "SpinalLinear head; print parameters, FLOPs, test accuracy and time per epoch of each, and "
        "plot the curves.")
    demo.add_argument("--epochs", type=positive_int, default=15, help="training epochs per head")
    demo.add_argument("--seed", type=non_negative_int, default=0, help="seed of the split, the weights and the "
                                                                       "batches")
    demo.add_argument("--out", default="demo-results", help="folder for demo.png")
    demo.add_argument("--threads", type=non_negative_int, default=1, help="torch.set_num_threads (0: torch's "
                                                                          "choice)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    model = command(
        "gpu-model", _gpu_model,
        "print the GPU cost model: the plan chosen per configuration, batch and precision (a model, no GPU)",
        "Print the GPU cost model of spinal_ops.gpu_model for each device, precision, mode, configuration and "
        "batch size: the backend the automatic choice picks, the modelled time of each fused backend, of the "
        "eager chain and of the dense layer, the floor, and the targets the row misses. A model, not a "
        "measurement: it needs no GPU and times nothing.")
    model.add_argument("--devices", nargs="+", choices=GPU_MODEL_DEVICES, metavar="DEVICE",
                       help=f"devices of the model's table, from {', '.join(GPU_MODEL_DEVICES)} "
                            f"(default: {' '.join(GPU_MODEL_DEFAULT_DEVICES)})")
    model.add_argument("--math", nargs="+", choices=GPU_MODEL_MATHS,
                       help=f"precisions (default: {' '.join(GPU_MODEL_DEFAULT_MATHS)})")
    model.add_argument("--modes", nargs="+", choices=GPU_MODEL_MODES,
                       help=f"what is modelled (default: {' '.join(GPU_MODEL_MODES)})")
    model.add_argument("--configs", nargs="+", type=config_name, metavar="NAME",
                       help=f"configurations of spinal_ops/configs.py (default: {BENCH_DEFAULTS_TEXT['configs']})")
    model.add_argument("--batch-sizes", nargs="+", type=positive_int, metavar="B",
                       help=f"batch sizes (default: {GPU_MODEL_BATCH_SIZES_TEXT})")
    model.add_argument("--markdown", action="store_true",
                       help="README's Markdown table: per device, configuration and B, the chosen plan, its time and "
                            "its ratios to min(eager, dense) and to the floor")
    return parser, {"bench": bench, "check": check, "demo": demo, "gpu-model": model}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, with its usage
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
