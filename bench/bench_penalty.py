"""What the L1/L2 penalties cost: fastmu.mu plain beside fastmu.mu penalised, same inputs, one run.

The penalties enter the fused kernels per factor, not per pixel (L1 joins ε,
L2 the Gram matrices' diagonals), so a penalised iteration should cost what a
plain one does. Two workloads on the CPU backend, rank 4: the paper's single
problem (65 × 16384) and a batch of 150 smaller ones (65 × 1024). Plain and
penalised runs take turns after a warm-up (which compiles both kernels); the
median is the figure, and ``ratio`` is penalised over plain time.

    python bench/bench_penalty.py [--iters 1000] [--repeats 7] [--dtype float32]
                                  [--plain-only] [--out bench/results/penalty_cpu.json]

``--plain-only`` times the plain runs alone, so that the same command can
time a checkout from before the penalties (``PYTHONPATH=<old checkout>``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

WORKLOADS = {"paper": (1, 65, 16384), "batched": (150, 65, 1024)}
PENALTY = dict(l1_A=0.01, l2_A=0.1, l1_S=0.01, l2_S=0.1)


def run(iters: int, repeats: int, dtype: str, plain_only: bool = False, rank: int = 4) -> dict[str, Any]:
    import fastmu
    import fastmu.kernels
    from fastmu.benchmarks.machine import machine_info

    res: dict[str, Any] = {"suite": "penalty", "machine": machine_info(), "fastmu_path": fastmu.__file__,
                           "kernels_path": fastmu.kernels.__file__,
                           "workload": {"iters": iters, "repeats": repeats, "dtype": dtype, "rank": rank,
                                        "penalty": PENALTY, "backend": "cpu"}, "shapes": {}}
    for name, (b, m, t) in WORKLOADS.items():
        rng = np.random.default_rng(0)
        X = (rng.random((b, m, rank)) @ rng.random((b, rank, t)) + 0.01 * rng.random((b, m, t))).astype(dtype)
        A0, S0 = fastmu.mu(X, rank, n_iter=0, random_state=0, backend="cpu")
        cases = {"plain": {}} if plain_only else {"plain": {}, "penalised": PENALTY}
        out = {k: fastmu.mu(X, A0=A0, S0=S0, n_iter=5, backend="cpu", **kw) for k, kw in cases.items()}  # compile
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):
            for k, kw in cases.items():
                t0 = time.perf_counter()
                out[k] = fastmu.mu(X, A0=A0, S0=S0, n_iter=iters, backend="cpu", **kw)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        entry: dict[str, Any] = {"shape": [b, m, t], "seconds": times, "median_s": med,
                                 "ms_per_iter": {k: 1e3 * v / iters for k, v in med.items()}}
        if not plain_only:
            entry["ratio_median"] = med["penalised"] / med["plain"]
            entry["ratio_best"] = min(times["penalised"]) / min(times["plain"])
            # the penalty did act: the factors differ
            entry["max_abs_diff_S_relative"] = float(
                np.abs(out["penalised"][1] - out["plain"][1]).max() / np.abs(out["plain"][1]).max())
        res["shapes"][name] = entry
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--plain-only", action="store_true", help="time the plain runs alone (any checkout)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = run(args.iters, args.repeats, args.dtype, args.plain_only)
    for name, r in res["shapes"].items():
        line = f"{name:8s} {tuple(r['shape'])}: plain {r['ms_per_iter']['plain']:.3f} ms/iter"
        if "ratio_median" in r:
            line += (f", penalised {r['ms_per_iter']['penalised']:.3f} ms/iter -> {r['ratio_median']:.3f}x "
                     f"(best {r['ratio_best']:.3f}x)")
        print(line)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
