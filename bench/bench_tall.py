"""MU or CD on a tall X on the CPU: X as given beside the same call on Xᵀ.

fastmu runs a tall X with few columns on its transpose (:mod:`fastmu.transposed`,
:mod:`fastmu.baselines.cd_transposed`); this is the measurement behind that rule.
For each shape (b, m, t), rank 4, float32, the same start: ``fastmu.mu`` (or
``fastmu.baselines.cd`` with ``--solver cd``) with ``FASTMU_CPU_TRANSPOSE=1``
(on Xᵀ, for any X with more rows than columns) and ``=0`` (X as given), taking
turns, each run after the benchmarks' rest; the median of the rounds counts.
Both compute the solver's iterates; each run includes its copies of X and, on
Xᵀ, the half iteration before.

Usage::

    python bench/bench_tall.py                    # writes bench/results/mu_cpu_tall.json
    python bench/bench_tall.py --solver cd        # writes bench/results/cd_cpu_tall.json
    python bench/bench_tall.py --rounds 1 --work 1e8 --out /tmp/tall.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

#: (b, m, t): few columns (65: the paper's bands, pixels as rows), then wider and squarer
SHAPES = [
    (1, 16384, 65), (1, 4096, 65), (1, 150, 65), (8, 4096, 65), (150, 1024, 65), (1, 300, 120),
    (1, 500, 200), (1, 800, 200), (1, 1024, 256), (2, 1024, 256), (1, 1024, 400), (1, 600, 300),
    (1, 4096, 256), (1, 16384, 256), (4, 2048, 256), (1, 2000, 500), (1, 2048, 512), (1, 16384, 512),
    (1, 2048, 640), (1, 4096, 640), (1, 1600, 768), (1, 2048, 768), (1, 3072, 768), (1, 6144, 768),
    (2, 6144, 768), (1, 2048, 1024), (1, 4096, 1024), (1, 8192, 1024), (2, 8192, 1024), (1, 16384, 1024),
    (1, 4096, 2048), (1, 8192, 2048),
]


def run(rounds: int = 5, work: float = 6e8, shapes: list | None = None, solver: str = "mu") -> dict:
    import fastmu
    from fastmu.baselines import cd
    from fastmu.benchmarks.machine import SETTLE_S, machine_info, settle
    from fastmu.baselines.cd_transposed import cd_transposes
    from fastmu.transposed import transposes

    def rule(shape: tuple[int, int, int]) -> bool:
        return cd_transposes(shape, np.float32) if solver == "cd" else transposes(shape)

    def fit(X: np.ndarray, A0: np.ndarray, S0: np.ndarray, n_iter: int) -> None:
        if solver == "cd":
            cd(X, A0=A0, S0=S0, n_iter=n_iter)
        else:
            fastmu.mu(X, A0=A0, S0=S0, n_iter=n_iter, backend="cpu")

    rows = []
    for b, m, t in shapes or SHAPES:
        rng = np.random.default_rng(0)
        X = rng.random((b, m, t), dtype=np.float32)
        A0 = (rng.random((b, m, 4)) + 0.1).astype(np.float32)
        S0 = (rng.random((b, 4, t)) + 0.1).astype(np.float32)
        iters = max(50, int(work / (8 * b * m * t)))  # about `work` bytes of X read in all
        times: dict[str, list[float]] = {"1": [], "0": []}
        for flag in times:  # warm-up: compilation or the cache's load
            os.environ["FASTMU_CPU_TRANSPOSE"] = flag
            fit(X, A0, S0, 2)
        for _ in range(rounds):
            for flag in times:
                os.environ["FASTMU_CPU_TRANSPOSE"] = flag
                settle()
                t0 = time.perf_counter()
                fit(X, A0, S0, iters)
                times[flag].append(1e3 * (time.perf_counter() - t0) / iters)
        del os.environ["FASTMU_CPU_TRANSPOSE"]
        on_xt, as_given = (float(np.median(times[f])) for f in ("1", "0"))
        row = {"solver": solver, "b": b, "m": m, "t": t, "rank": 4, "dtype": "float32", "iters": iters,
               "rounds": rounds,
               "ms_per_iter_on_xt": on_xt, "ms_per_iter_as_given": as_given,
               "speedup_on_xt": as_given / on_xt, "fastmu_transposes": rule((b, m, t))}
        rows.append(row)
        print(f"{b:>4} × {m:>6} × {t:>5}  {iters:>5} it  on Xᵀ {on_xt:8.4f}  as given {as_given:8.4f} ms/it  "
              f"× {as_given / on_xt:4.2f}  {'transposed' if row['fastmu_transposes'] else 'as given'}", flush=True)
    return {"machine": machine_info(), "solver": solver, "settle_s": SETTLE_S, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=float, default=6e8, help="bytes of X read per run (sets the iterations)")
    ap.add_argument("--solver", choices=("mu", "cd"), default="mu")
    ap.add_argument("--shapes", type=int, default=None, help="time only the first this many shapes")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/results/{mu,cd}_cpu_tall.json")
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"{args.solver}_cpu_tall.json"
    res = run(args.rounds, args.work, SHAPES[:args.shapes] if args.shapes else None, args.solver)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
