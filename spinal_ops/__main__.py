"""Command line: ``python -m spinal_ops {bench,check,demo}``."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

import torch


def _check(args) -> int:
    import spinal_ops
    from spinal_ops import backends, ops

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    print(f"spinal_ops {spinal_ops.__version__}, torch {torch.__version__} (CUDA build: {torch.version.cuda}), "
          f"triton {version('triton')}, python {sys.version.split()[0]}")
    native = "loaded" if ops.NATIVE_IMPORT_ERROR is None else f"NOT loaded ({ops.NATIVE_IMPORT_ERROR})"
    print(f"native extension spinal_ops._C: {native}")
    print(f"  C++ CPU kernels: {'yes' if backends._native_kernel('CPU') else 'no'}; "
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
        worst = 0.0
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
            for a, b in zip(*results, strict=False):
                scale = max(a.abs().max().item(), 1.0)
                worst = max(worst, (a - b).abs().max().item() / scale)
        ok = worst <= 1e-12
        failures += not ok
        print(f"  {name:<10} {'OK  ' if ok else 'FAIL'} max relative difference to the reference "
              f"{worst:.1e} (float64, outputs and every gradient, {len(cases)} layers)")
    return 1 if failures else 0


def _bench(args) -> int:
    from spinal_ops import benchmark
    from spinal_ops.configs import BENCH_BATCH_SIZES, CONFIG_BY_NAME, CONFIGS

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = CONFIGS if not args.configs else [CONFIG_BY_NAME[n] for n in args.configs]
    batch_sizes = args.batch_sizes or list(BENCH_BATCH_SIZES)
    dtype = getattr(torch, args.dtype)
    report = benchmark.run(configs, batch_sizes, args.modes or benchmark.MODES, dtype=dtype,
                           min_run_time=args.min_run_time, compile_eager=not args.no_compile)
    print(benchmark.format_table(report))
    json_path, png_path = benchmark.save(report, args.out)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def _demo(args) -> int:
    from spinal_ops import demo

    if args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {args.epochs}")
    demo.run(epochs=args.epochs, seed=args.seed, out=args.out, progress=not args.no_progress, threads=args.threads)
    return 0


def main(argv=None) -> int:
    from spinal_ops.configs import CONFIG_BY_NAME

    parser = argparse.ArgumentParser(prog="python -m spinal_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time SpinalLinear against nn.Linear, the eager chain and torch.compile")
    bench.add_argument("--configs", nargs="+", choices=sorted(CONFIG_BY_NAME), help="default: all")
    bench.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 64 1024")
    bench.add_argument("--modes", nargs="+", choices=["forward", "backward", "fwd+bwd"], help="default: all")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    bench.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    bench.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per measurement")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    bench.add_argument("--out", default="bench-results", help="directory for bench.json and bench.png")
    bench.set_defaults(func=_bench)
    check = sub.add_parser("check", help="list backends and build flags; verify each backend against the reference")
    check.set_defaults(func=_check)
    demo = sub.add_parser("demo", help="train a small CNN on the 8x8 digits with an nn.Linear head and with a "
                                       "SpinalLinear head; print accuracy and time per epoch, plot the curves")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs per head (default: 15)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the batches")
    demo.add_argument("--out", default="demo-results", help="directory for demo.png (default: demo-results)")
    demo.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1; 0: torch's choice)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
