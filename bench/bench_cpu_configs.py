"""Which CPU code paths win on this machine: the kernels' vector width and MU kernel, side by side.

fastmu picks its CPU code path from the CPU's features: on an AVX-512 host it
compiles every kernel for 512-bit vectors (``fastmu.kernels.cpu_target``) and
runs MU at ranks up to 4 on the tiled kernel (``fastmu.kernels.cpu_tiled``);
elsewhere, 256-bit vectors and the blocked kernel with explicit 256-bit tiles.
Both choices are made once per process, so each configuration here runs in a
fresh process, the configurations taking turns round after round:

- ``default``: what fastmu picks on this machine;
- ``FASTMU_CPU_TILED=0``: the blocked MU kernel at the same vector width;
- ``FASTMU_CPU_ZMM=0``: 256-bit vectors for every kernel (on an AVX-512 host
  this is the AVX2 code path, the blocked kernel's explicit 256-bit tiles).

Each worker times, float32, rank 4, best of ``--repeats`` runs: MU on one
65 × 16384 problem, on 150 × (65 × 1024) and on one 16384 × 65 problem
(ms per iteration); coordinate descent on one 65 × 16384 problem (ms per
iteration); one NALMU training step, forward + backward, 20 layers, 25
problems of 65 × 4096 (ms per step). The JSON keeps every round; the table
gives, per configuration, the median over rounds of each worker's best.

Usage::

    python bench/bench_cpu_configs.py                  # bench/results/cpu_configs.json
    python bench/bench_cpu_configs.py --rounds 2 --out /tmp/configs.json
    python bench/bench_cpu_configs.py --table bench/results/cpu_configs_zen4.json

Timings on a machine with other load are not meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: name → environment added to the worker's
CONFIGS = {
    "default": {},
    "FASTMU_CPU_TILED=0": {"FASTMU_CPU_TILED": "0"},
    "FASTMU_CPU_ZMM=0": {"FASTMU_CPU_ZMM": "0"},
}
#: workload → (what one timed unit is, its unit)
WORKLOADS = {
    "mu_65x16384": "MU, one 65 × 16384 problem, ms / iteration",
    "mu_150x65x1024": "MU, 150 × (65 × 1024), ms / iteration",
    "mu_16384x65": "MU, one 16384 × 65 problem, ms / iteration",
    "cd_65x16384": "CD, one 65 × 16384 problem, ms / iteration",
    "nalmu_step": "NALMU step (fwd + bwd), 20 layers, 25 × 65 × 4096, ms",
}


def _problem(b: int, m: int, n: int, t: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    X = rng.random((b, m, n)) @ rng.random((b, n, t)) ** 2 + 0.01 * rng.random((b, m, t))
    A0, S0 = rng.random((b, m, n)) + 0.1, rng.random((b, n, t)) + 0.1
    return tuple(a.astype(np.float32) for a in (X, A0, S0))


def worker(repeats: int) -> dict:
    """Time the workloads in this process (its configuration is its environment)."""
    import fastmu
    from fastmu.baselines import cd
    from fastmu.benchmarks.machine import machine_info
    from fastmu.benchmarks.mu_cpu import cpu_kernel
    from fastmu.benchmarks.nalmu import make_step

    def best(fn, per: int) -> float:
        fn()  # compile / load the kernels, warm the caches
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) / per * 1e3)
        return min(times)

    out: dict = {"mu_kernel": cpu_kernel(4), "machine": machine_info()}
    for name, shape, iters in (("mu_65x16384", (1, 65, 4, 16384), 1000), ("mu_150x65x1024", (150, 65, 4, 1024), 200),
                               ("mu_16384x65", (1, 16384, 4, 65), 500)):
        X, A0, S0 = _problem(*shape)
        if name == "mu_16384x65":  # one tall problem (the rows are shared out), not a batch of one
            X, A0, S0 = X[0], A0[0], S0[0]
        out[name] = best(lambda: fastmu.mu(X, A0=A0, S0=S0, n_iter=iters, backend="cpu"), iters)
    X, A0, S0 = _problem(1, 65, 4, 16384)
    out["cd_65x16384"] = best(lambda: cd(X, A0=A0, S0=S0, n_iter=100), 100)
    step, _ = make_step("fused", 25, 65, 4096, 4, 20, "float32", "cpu", 0)
    out["nalmu_step"] = best(step, 1)
    return out


def table(res: dict) -> str:
    names = list(res["configs"])
    head = "| workload | " + " | ".join(f"`{c}`" for c in names) + " |"
    lines = [head, "| --- |" + " ---: |" * len(names)]
    for w, label in WORKLOADS.items():
        med = {c: statistics.median(r[w] for r in res["rounds"][c]) for c in names}
        base = med[names[0]]
        cells = [f"{med[c]:.3f}" + ("" if c == names[0] else f" ({med[c] / base:.2f}×)") for c in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    kernels = {c: res["rounds"][c][0]["mu_kernel"] for c in names}
    zmm = {c: res["rounds"][c][0]["machine"].get("cpu_vectors_512bit", {}).get("active") for c in names}
    lines.append("")
    lines.append("MU kernel: " + ", ".join(f"{c}: {kernels[c]}" for c in names) + "; 512-bit vectors: "
                 + ", ".join(f"{c}: {zmm[c]}" for c in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of all configurations, taking turns (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workload in a worker; the best counts")
    ap.add_argument("--out", default="bench/results/cpu_configs.json")
    ap.add_argument("--table", metavar="JSON", help="print the table of a saved run and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.repeats)))
        return 0
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be >= 1")
    res: dict = {"configs": CONFIGS, "workloads": WORKLOADS, "repeats": args.repeats,
                 "rounds": {c: [] for c in CONFIGS}, "load_average": []}
    for r in range(args.rounds):
        for name, env in CONFIGS.items():
            res["load_average"].append((r, name, os.getloadavg()))
            run = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(args.repeats)],
                                 env={**os.environ, **env}, capture_output=True, text=True, check=True)
            res["rounds"][name].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(
                f"{w} {res['rounds'][name][-1][w]:.3f}" for w in WORKLOADS), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
