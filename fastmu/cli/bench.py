"""``fastmu bench``: throughput workloads, printed as a table and saved as JSON with machine info."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run the throughput benchmarks (fastmu beside its peers) and save JSON",
        description="Time fastmu beside NumPy, torch and scikit-learn on the same inputs, in one run.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--suite", choices=("mu", "nalmu"), default="mu",
                   help="mu: plain MU solver workloads; nalmu: 50-layer NALMU forward+backward")
    p.add_argument("--workload", choices=("paper", "batched", "tall", "all"), default="all",
                   help="mu suite: paper = 1×65×16384, batched = 150×65×1024, tall = 1×16384×65 (CPU); "
                        "W1/W2 on CUDA")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default: the workload's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per peer (mu: the fastest counts; nalmu: steps per variant, the median counts)")
    p.add_argument("--quick", action="store_true", help="100 iterations, 1 repeat: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: fastmu-bench-<suite>-<device>.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmu.benchmarks.machine import machine_info

    iters = 100 if args.quick and args.iters is None else args.iters
    repeats = 1 if args.quick else args.repeats
    if iters is not None and iters < 1:
        raise ValueError("--iters must be >= 1")
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    result: dict[str, Any] = {"suite": args.suite, "device": args.device, "machine": machine_info()}
    if args.suite == "mu" and args.device == "cpu":
        from fastmu.benchmarks import mu_cpu

        names = list(mu_cpu.WORKLOADS) if args.workload == "all" else [args.workload]
        rows = []
        for name in names:
            rows += mu_cpu.run_workload(name, n_iter=iters, repeats=repeats)
        print(mu_cpu.format_table(rows))
        result["workloads"] = {k: dict(mu_cpu.WORKLOADS[k], n_iter=iters or mu_cpu.WORKLOADS[k]["n_iter"]) for k in names}
        result["cpu_kernel"] = mu_cpu.cpu_kernel(4)
        result["results"] = mu_cpu.as_json(rows)
    elif args.suite == "mu":
        from fastmu.benchmarks import mu_gpu

        res = mu_gpu.run_gpu_benchmarks(iters=iters or 10_000, quick=args.quick)
        print(mu_gpu.format_table(res))
        result.update(res)
    else:
        from fastmu.benchmarks import nalmu

        kw = dict(n_layers=10, t=1024, repeats=1, measure_memory=False) if args.quick else dict(repeats=args.repeats)
        res = nalmu.run_nalmu_benchmark(device=args.device, **kw)
        print(nalmu.format_table(res))
        result.update(res)
    out = args.out or Path(f"fastmu-bench-{args.suite}-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"saved {out}")
    return 0
