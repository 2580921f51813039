"""``fastmu bench``: throughput workloads, printed as a table and saved as JSON with machine info."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fastmu.cli import _checks


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run the throughput benchmarks (fastmu beside its peers) and save JSON",
        description="Time fastmu beside NumPy, torch and scikit-learn on the same inputs, in one run.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--suite", choices=("mu", "nalmu"), default="mu",
                   help="mu: plain MU solver workloads; nalmu: NALMU training step (forward+backward), "
                        "fused vs plain autograd, 50 layers, 25 problems of 65×4096")
    p.add_argument("--workload", choices=("paper", "batched", "tall", "all"), default=None,
                   help="mu suite on the CPU only: paper = 1×65×16384, batched = 150×65×1024, "
                        "tall = 1×16384×65, all (default); on CUDA the mu suite runs W1 and W2")
    p.add_argument("--iters", type=_checks.int_at_least(1), default=None,
                   help="mu suite only: iterations per run (default: the workload's)")
    p.add_argument("--repeats", type=_checks.int_at_least(1), default=None,
                   help="runs per peer, default 3 (mu on the CPU: the fastest counts; nalmu: steps per variant, "
                        "the median counts; not for the mu suite on CUDA, which times its own way)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run, 1 repeat: mu suite 100 iterations (CUDA: also a batch of 8); "
                        "nalmu suite 10 layers at t=1024, no memory measurement")
    p.add_argument("--out", type=_checks.path, default=None,
                   help="JSON file (default: fastmu-bench-<suite>-<device>.json)")
    p.set_defaults(func=run)


def _check_options(args: argparse.Namespace) -> None:
    """Refuse the options this suite and device would silently ignore."""
    if args.suite == "nalmu":
        given = [opt for opt, v in (("--workload", args.workload), ("--iters", args.iters)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the mu suite "
                             "only; --suite nalmu times one fixed workload (see --quick)")
    elif args.device == "cuda" and args.workload is not None:
        raise ValueError("--workload picks CPU workloads; on CUDA the mu suite runs its workloads W1 and W2")
    elif args.device == "cuda" and args.repeats is not None:
        raise ValueError("--repeats does not apply to the mu suite on CUDA, which times its own way")


def run(args: argparse.Namespace) -> int:
    from fastmu.benchmarks.machine import machine_info

    _check_options(args)
    out = args.out or Path(f"fastmu-bench-{args.suite}-{args.device}.json")
    _checks.check_output_file(out, "--out")  # before the benchmark, not after it
    iters = 100 if args.quick and args.iters is None else args.iters
    repeats = args.repeats or (1 if args.quick else 3)  # --quick's defaults give way to explicit options
    result: dict[str, Any] = {"suite": args.suite, "device": args.device, "machine": machine_info()}
    if args.suite == "mu" and args.device == "cpu":
        from fastmu.benchmarks import mu_cpu

        names = list(mu_cpu.WORKLOADS) if args.workload in (None, "all") else [args.workload]
        rows = []
        for name in names:
            rows += mu_cpu.run_workload(name, n_iter=iters, repeats=repeats)
        print(mu_cpu.format_table(rows))
        kernels = {k: mu_cpu.workload_kernel(k) for k in names}
        transposed = {k: mu_cpu.workload_transposed(k) for k in names}
        print("fastmu's kernel: " + ", ".join(f"{k} {v}" + (" (on Xᵀ)" if transposed[k] else "")
                                              for k, v in kernels.items()))
        result["workloads"] = {k: dict(mu_cpu.WORKLOADS[k], n_iter=iters or mu_cpu.WORKLOADS[k]["n_iter"]) for k in names}
        result["cpu_kernel"] = kernels  # per workload (one string, the wide shapes', before 2026-11-29)
        result["cpu_transposed"] = transposed  # per workload: run on Xᵀ (since 2026-11-29, second session)
        from fastmu.benchmarks.machine import SETTLE_S

        result["settle_s"] = SETTLE_S  # the rest before every timed run (since 2026-11-29)
        result["results"] = mu_cpu.as_json(rows)
    elif args.suite == "mu":
        from fastmu.benchmarks import mu_gpu

        res = mu_gpu.run_gpu_benchmarks(iters=iters or 10_000, quick=args.quick)
        print(mu_gpu.format_table(res))
        result.update(res)
    else:
        from fastmu.benchmarks import nalmu

        kw = dict(n_layers=10, t=1024, measure_memory=False) if args.quick else {}
        res = nalmu.run_nalmu_benchmark(device=args.device, repeats=repeats, **kw)
        print(nalmu.format_table(res))
        result.update(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"saved {out}")
    return 0
