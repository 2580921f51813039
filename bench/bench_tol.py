"""What the ``tol`` checks cost: fastmu.mu without a tolerance beside the same run with one.

A check every ``check_every`` iterations reads the objective. In float64 it
comes from the kernels' ``X Sᵀ`` and ``S Sᵀ`` (no pass over X); in float32
it is the residual itself, one pass over X, since that sum cancels below
float32's precision (README, Architecture). Two workloads on the CPU
backend, rank 4: the paper's single problem (65 × 16384) and a batch of 150
smaller ones (65 × 1024). The tolerance, 1e-300, never stops a run, so both
runs do the same iterations; they take turns after a warm-up, and the
median is the figure (``ratio``: with checks over without).

    python bench/bench_tol.py [--iters 500] [--repeats 7] [--check-every 10] [--dtype float32]
                              [--out bench/results/tol_cpu.json]

The same command times another checkout with ``PYTHONPATH=<checkout>``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

WORKLOADS = {"paper": (1, 65, 16384), "batched": (150, 65, 1024)}


def run(iters: int, repeats: int, check_every: int, dtype: str, rank: int = 4) -> dict[str, Any]:
    import fastmu
    from fastmu.benchmarks.machine import machine_info

    res: dict[str, Any] = {"suite": "tol", "machine": machine_info(), "fastmu_path": fastmu.__file__,
                           "workload": {"iters": iters, "repeats": repeats, "check_every": check_every,
                                        "dtype": dtype, "rank": rank, "backend": "cpu", "tol": 1e-300},
                           "shapes": {}}
    for name, (b, m, t) in WORKLOADS.items():
        rng = np.random.default_rng(0)
        X = (rng.random((b, m, rank)) @ rng.random((b, rank, t)) ** 4).astype(dtype)
        runs = {"no_tol": dict(tol=None), "tol": dict(tol=1e-300, check_every=check_every)}
        for kw in runs.values():  # warm-up: compiles (or loads) every kernel either run uses
            fastmu.mu(X, rank, n_iter=2 * check_every, random_state=0, **kw)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for k, kw in runs.items():
                t0 = time.perf_counter()
                *_, done = fastmu.mu(X, rank, n_iter=iters, random_state=0, return_n_iter=True, **kw)
                times[k].append(time.perf_counter() - t0)
                assert done == iters  # the same work in both
        med = {k: statistics.median(v) for k, v in times.items()}
        res["shapes"][name] = {"shape": [b, m, t], "seconds": times, "median_s": med,
                               "ms_per_iter": {k: v * 1e3 / iters for k, v in med.items()},
                               "ratio": med["tol"] / med["no_tol"]}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = run(args.iters, args.repeats, args.check_every, args.dtype)
    for name, r in res["shapes"].items():
        ms = r["ms_per_iter"]
        print(f"{name:8s} {tuple(r['shape'])}: {ms['no_tol']:.4f} ms/iter without tol, {ms['tol']:.4f} with "
              f"(checks every {args.check_every}) -> {r['ratio']:.2f}x")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
