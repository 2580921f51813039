"""fastmu.NMF beside scikit-learn's NMF, solver="mu" and solver="cd": the same fit, side by side.

The paper's scene in both orientations: tall (pixels as samples, 16384 × 65:
how scikit-learn users hold hyperspectral data) and wide (65 × 16384), rank
4, a fixed number of iterations (``tol=0``; ``--tol`` for scikit-learn's stopping
rule, each estimator then running to its own stop), scikit-learn's random start. For
each solver the two estimators (``NMF(solver=s)`` from fastmu and from
scikit-learn) take turns after a warm-up (fastmu's compiles its kernels), and
the median fit is the figure; both factorisations are checked to agree.
Then each fitted model's ``transform`` of the same X is timed the same way,
at ``--transform-tol`` (scikit-learn's default tol, 1e-4: at ``tol=0`` it
would run ``max_iter`` sweeps), under ``transform`` in the JSON.

    python bench/bench_estimator.py [--solver {mu,cd,both}] [--iters 1000] [--repeats 5]
                                    [--dtype float32] [--alpha 0] [--l1-ratio 0] [--tol 0]
                                    [--transform-tol 1e-4] [--shuffle]
                                    [--out bench/results/estimator_cpu.json]

``--alpha`` > 0 times the regularised fit (``alpha_W=alpha``, ``alpha_H="same"``,
``l1_ratio``) of both estimators.

In the JSON, ``shapes`` holds one entry per solver and orientation: ``tall``
and ``wide`` for solver="mu" (the keys of earlier runs), ``tall-cd`` and
``wide-cd`` for solver="cd"; each entry names its ``solver``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

import numpy as np


SOLVERS = ("mu", "cd")


def run(iters: int, repeats: int, dtype: str, m: int = 65, t: int = 16384, n: int = 4,
        solvers: tuple[str, ...] = SOLVERS, alpha: float = 0.0, l1_ratio: float = 0.0,
        tol: float = 0.0, transform_tol: float = 1e-4, shuffle: bool = False) -> dict[str, Any]:
    from sklearn.decomposition import NMF as SkNMF

    from fastmu import NMF
    from fastmu.benchmarks.machine import machine_info, settle

    rng = np.random.default_rng(0)
    X_wide = (rng.random((m, n)) @ rng.random((n, t)) + 0.01 * rng.random((m, t))).astype(dtype)
    res: dict[str, Any] = {"suite": "estimator", "machine": machine_info(),
                           "workload": {"iters": iters, "repeats": repeats, "dtype": dtype, "rank": n,
                                        "solvers": list(solvers), "alpha_W": alpha, "alpha_H": "same",
                                        "l1_ratio": l1_ratio, "tol": tol, "shuffle": shuffle}, "shapes": {}}
    cases = [(solver, orient) for solver in solvers for orient in ("tall", "wide")]
    for solver, orient in cases:
        X = np.ascontiguousarray(X_wide.T) if orient == "tall" else X_wide
        name = orient if solver == "mu" else f"{orient}-{solver}"
        kw = dict(init="random", solver=solver, random_state=0, tol=tol, max_iter=iters, alpha_W=alpha,
                  l1_ratio=l1_ratio, shuffle=shuffle)
        makers = {
            "fastmu": lambda kw=kw: NMF(n, **kw),
            "sklearn": lambda kw=kw: SkNMF(n, **kw),
        }
        fitted = {k: make() for k, make in makers.items()}
        W = {k: est.fit_transform(X) for k, est in fitted.items()}  # warm-up (kernel compilation)
        times: dict[str, list[float]] = {k: [] for k in makers}
        for _ in range(repeats):
            for k, make in makers.items():
                est = make()
                settle()  # the last fit's BLAS/OpenMP threads must not spin into this one
                t0 = time.perf_counter()
                est.fit(X)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        scale = float(np.abs(W["sklearn"]).max())
        # transform of the same X by each fitted model, at scikit-learn's default tol (at tol=0
        # it would run max_iter sweeps)
        for est in fitted.values():
            est.set_params(tol=transform_tol)
        Wt = {k: est.transform(X) for k, est in fitted.items()}  # warm-up
        ttimes: dict[str, list[float]] = {k: [] for k in fitted}
        for _ in range(repeats):
            for k, est in fitted.items():
                settle()
                t0 = time.perf_counter()
                est.transform(X)
                ttimes[k].append(time.perf_counter() - t0)
        tmed = {k: statistics.median(v) for k, v in ttimes.items()}
        res["shapes"][name] = {
            "solver": solver,
            "shape": list(X.shape),
            "seconds": times,
            "median_s": med,
            "speedup_median": med["sklearn"] / med["fastmu"],
            "speedup_best": min(times["sklearn"]) / min(times["fastmu"]),
            "max_abs_diff_W_relative": float(np.abs(W["fastmu"] - W["sklearn"]).max()) / scale,
            "n_iter": {k: int(est.n_iter_) for k, est in fitted.items()},
            "transform": {
                "tol": transform_tol,
                "seconds": ttimes,
                "median_s": tmed,
                "speedup_median": tmed["sklearn"] / tmed["fastmu"],
                "max_abs_diff_W_relative": float(np.abs(Wt["fastmu"] - Wt["sklearn"]).max())
                / float(np.abs(Wt["sklearn"]).max()),
            },
        }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solver", default="both", choices=["mu", "cd", "both"],
                    help="which solver to time, fastmu's against scikit-learn's (default: both)")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--alpha", type=float, default=0.0,
                    help="alpha_W of both estimators (alpha_H='same'); 0: unregularised (default)")
    ap.add_argument("--l1-ratio", type=float, default=0.0, help="l1_ratio of both estimators (default 0)")
    ap.add_argument("--tol", type=float, default=0.0,
                    help="tol of both estimators (default 0: --iters iterations; scikit-learn's default is 1e-4)")
    ap.add_argument("--transform-tol", type=float, default=1e-4,
                    help="tol of both fitted models' transform of X, timed after the fits (default 1e-4)")
    ap.add_argument("--shuffle", action="store_true",
                    help="shuffle=True for both estimators (solver='cd': a new order of the components each sweep)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning-free at tol=0; threadpool notes
        res = run(args.iters, args.repeats, args.dtype,
                  solvers=SOLVERS if args.solver == "both" else (args.solver,), alpha=args.alpha,
                  l1_ratio=args.l1_ratio, tol=args.tol, transform_tol=args.transform_tol, shuffle=args.shuffle)
    for name, r in res["shapes"].items():
        orient = name.split("-")[0]
        print(f"{r['solver']:2s} {orient:4s} {tuple(r['shape'])}: fastmu {r['median_s']['fastmu'] * 1e3:8.1f} ms, "
              f"scikit-learn {r['median_s']['sklearn'] * 1e3:8.1f} ms -> {r['speedup_median']:.2f}x "
              f"(best {r['speedup_best']:.2f}x); |ΔW|/max|W| = {r['max_abs_diff_W_relative']:.1e}; "
              f"iterations {r['n_iter']['fastmu']} and {r['n_iter']['sklearn']}")
        tr = r["transform"]
        print(f"   transform (tol={tr['tol']:g}): fastmu {tr['median_s']['fastmu'] * 1e3:8.1f} ms, scikit-learn "
              f"{tr['median_s']['sklearn'] * 1e3:8.1f} ms -> {tr['speedup_median']:.2f}x; "
              f"|ΔW|/max|W| = {tr['max_abs_diff_W_relative']:.1e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
