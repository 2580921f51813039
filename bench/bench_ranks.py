"""MU on the CPU at other ranks and shapes: fastmu beside the NumPy loop and the torch backend.

Usage::

    python bench/bench_ranks.py                       # writes bench/results/mu_cpu_ranks.json
    python bench/bench_ranks.py --iters 50 --rounds 1 --out /tmp/ranks.json

One problem per shape, the same start for every peer, the peers taking
turns (one run each per round); the median of the rounds counts.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

#: (m, t, rank, dtype)
SHAPES = [
    (65, 16384, 8, "float32"),
    (65, 16384, 20, "float32"),
    (500, 2000, 10, "float64"),
    (500, 2000, 20, "float64"),
    (200, 5000, 16, "float32"),
    (156, 9025, 3, "float32"),  # the Samson scene's size: 156 bands, 95 × 95 pixels, 3 sources
]


def run(iters: int = 100, rounds: int = 3, shapes: list | None = None) -> dict:
    import fastmu
    from fastmu.benchmarks.machine import machine_info, settle
    from fastmu.reference import mu_numpy

    rows = []
    for m, t, n, dt in shapes or SHAPES:
        rng = np.random.default_rng(0)
        X = (rng.random((m, n)) @ rng.random((n, t))).astype(dt)
        A0 = (rng.random((m, n)) + 0.1).astype(dt)
        S0 = (rng.random((n, t)) + 0.1).astype(dt)
        peers = {
            "fastmu": lambda: fastmu.mu(X, A0=A0, S0=S0, n_iter=iters, backend="cpu"),
            "numpy": lambda: mu_numpy(X, A0, S0, iters),
            "torch": lambda: fastmu.mu(X, A0=A0, S0=S0, n_iter=iters, backend="torch"),
        }
        for fn in peers.values():  # warm-up: compilation, BLAS threads
            fn()
        times: dict[str, list[float]] = {k: [] for k in peers}
        for _ in range(rounds):
            for k, fn in peers.items():
                settle()  # the last peer's BLAS/OpenMP threads must not spin into this one's run
                t0 = time.perf_counter()
                fn()
                times[k].append(1e3 * (time.perf_counter() - t0) / iters)
        med = {k: float(np.median(v)) for k, v in times.items()}
        row = {"m": m, "t": t, "rank": n, "dtype": dt, "iters": iters, "rounds": rounds,
               "ms_per_iter": med, "numpy_over_fastmu": med["numpy"] / med["fastmu"],
               "torch_over_fastmu": med["torch"] / med["fastmu"]}
        rows.append(row)
        print(f"{m} × {t} {dt}, rank {n}: " + "  ".join(f"{k} {v:.3f}" for k, v in med.items())
              + f" ms/it; NumPy/fastmu {row['numpy_over_fastmu']:.2f}", flush=True)
    return {"suite": "mu-cpu-ranks", "machine": machine_info(), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mu_cpu_ranks.json")
    args = ap.parse_args(argv)
    res = run(args.iters, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"written to {args.out}")
    return res


if __name__ == "__main__":
    main()
