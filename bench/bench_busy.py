"""MU on a machine that is busy with other work: OpenMP's wait policy and the thread count.

fastmu's CPU kernels run on Numba's OpenMP threading layer. Between parallel
regions OpenMP's threads spin, waiting for the next one; the single-problem
schedule opens one region per iteration. When other processes want the same
cores, a spinning thread holds a core that a working one needs, and an
iteration can wait a whole scheduler time slice. fastmu's default is to
govern the thread count while it runs (:mod:`fastmu.cpu_threads`);
``FASTMU_ADAPTIVE_THREADS=0`` keeps every thread. This script measures it: each
configuration runs in a fresh process (OpenMP reads its environment once, at
load): on a quiet machine, beside ``--hogs`` Python loops (one per core by
default), and beside a process running torch matrix products on every core,
the loads and configurations taking turns round after round.

Usage::

    python bench/bench_busy.py                     # writes bench/results/mu_cpu_busy.json
    python bench/bench_busy.py --iters 500 --rounds 1 --out /tmp/busy.json
    python bench/bench_busy.py --table bench/results/mu_cpu_busy.json   # the README's table
    python bench/bench_busy.py --layers            # NALMU's forward: bench/results/nalmu_cpu_busy.json
    python bench/bench_busy.py --training          # NALMU training steps: bench/results/nalmu_train_cpu_busy.json

Timings on a machine with other load than the hogs are not meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: name → environment added to the worker's. "default" governs the thread count
#: (fastmu.cpu_threads); FASTMU_ADAPTIVE_THREADS=0 keeps every thread, as fastmu did before.
CONFIGS = {
    "default": {},
    "FASTMU_ADAPTIVE_THREADS=0": {"FASTMU_ADAPTIVE_THREADS": "0"},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
    "NUMBA_NUM_THREADS=1": {"NUMBA_NUM_THREADS": "1"},
}

#: name → (b, m, t): the paper's single problem (one parallel region per
#: iteration) and a batch (problem-major: one region for the whole run)
WORKLOADS = {"single 65 × 16384": (1, 65, 16384), "batch 16 × 65 × 1024": (16, 65, 1024)}

_WORKER = """
import json, sys, time
import numpy as np
import fastmu
b, m, t, iters, reps = (int(v) for v in sys.argv[1:6])
rng = np.random.default_rng(0)
X = (rng.random((b, m, 4)) @ rng.random((b, 4, t))).astype(np.float32)
fastmu.mu(X, 4, n_iter=5, random_state=0)  # compile / load, start the threads
from fastmu import cpu_threads
cpu_threads._last = None  # the warm-up's threads are not remembered
ms, ended = [], []
for _ in range(reps):
    t0 = time.perf_counter()
    fastmu.mu(X, 4, n_iter=iters, random_state=0)
    ms.append(1e3 * (time.perf_counter() - t0) / iters)
    last = cpu_threads._last  # None where no run was governed
    ended.append(None if last is None else cpu_threads.thread_levels(last[1])[last[2]])
    cpu_threads._last = None  # each run starts afresh, as a first call in a new process would
print(json.dumps([ms, ended]))
"""


#: the learned layers' CPU forward (the stack's layers are the governor's iterations)
LAYER_WORKLOADS = {"NALMU forward, 65 × 16384, 50 layers": (1, 65, 16384)}

#: a NALMU training step on the CPU, forward and backward (the layers' backward is one parallel
#: region per layer too, whatever the batch)
TRAIN_WORKLOADS = {"NALMU training step, 8 × 65 × 4096, 50 layers": (8, 65, 4096),
                   "NALMU training step, 1 × 65 × 16384, 50 layers": (1, 65, 16384)}

#: a 50-layer NALMU on the CPU: ``TRAIN`` False times forwards under no_grad (ms per layer), True
#: training steps, forward and backward with gradients for every layer's W (ms per step)
_STACK_WORKER = """
import json, sys, time
import numpy as np
import torch
import fastmu
b, m, t, runs, reps = (int(v) for v in sys.argv[1:6])
rng = np.random.default_rng(0)
X = torch.from_numpy((rng.random((b, m, 4)) @ rng.random((b, 4, t))).astype(np.float32))
torch.manual_seed(0)
model = fastmu.NALMU(n_layers=50, m=m, n=4)

def once():
    if TRAIN:
        A, S = model(X)
        (A.sum() + S.sum()).backward()
    else:
        with torch.no_grad():
            model(X)

once()  # compile / load, start the threads
ms = []
for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(runs):
        once()
    ms.append(1e3 * (time.perf_counter() - t0) / (runs if TRAIN else runs * 50))  # per step / per layer
print(json.dumps([ms, [None] * reps]))
"""
_LAYER_WORKER = "TRAIN = False\n" + _STACK_WORKER
_TRAIN_WORKER = "TRAIN = True\n" + _STACK_WORKER

_AB_WORKER = """
import json, os, sys, time
import numpy as np
import fastmu
from fastmu import cpu_threads
b, m, t, iters, reps = (int(v) for v in sys.argv[1:6])
rng = np.random.default_rng(0)
X = (rng.random((b, m, 4)) @ rng.random((b, 4, t))).astype(np.float32)
fastmu.mu(X, 4, n_iter=5, random_state=0)
ms = {"governed": [], "FASTMU_ADAPTIVE_THREADS=0": []}
for _ in range(reps):
    for name, flag in (("governed", "1"), ("FASTMU_ADAPTIVE_THREADS=0", "0")):
        os.environ[cpu_threads.ENV] = flag  # read when the run starts
        cpu_threads._last = None
        t0 = time.perf_counter()
        fastmu.mu(X, 4, n_iter=iters, random_state=0)
        ms[name].append(1e3 * (time.perf_counter() - t0) / iters)
print(json.dumps(ms))
"""


def quiet_ab(shape: tuple[int, int, int], iters: int, reps: int) -> dict[str, list[float]]:
    """Governed and fixed thread counts on the quiet machine, alternating in one process (ms/it):
    the governor's cost where there is nothing to gain, without the spread between processes."""
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_ENV}
    out = subprocess.run([sys.executable, "-c", _AB_WORKER, *map(str, shape), str(iters), str(reps)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the A/B worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


#: name → the competing processes' code (started ``--hogs`` times for the Python loop; once,
#: on every core, for torch, whose OpenMP threads spin between its operations as fastmu's do)
LOADS = {
    "quiet": None,
    "Python loops": "while True: pass",
    "torch matmuls": "import torch\nx = torch.rand(512, 512)\nwhile True: x = torch.tanh(x @ x)",
}


#: inherited settings that would change the "default" configuration or the loads
_THREAD_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER",
               "FASTMU_ADAPTIVE_THREADS")


def _start(load: str, hogs: int) -> list[subprocess.Popen]:
    code = LOADS[load]
    if code is None:
        return []
    k = hogs if load == "Python loops" else 1
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(k)]
    time.sleep(2.0)  # let them start (torch's import takes a second)
    return procs


def _measure(shape: tuple[int, int, int], env: dict[str, str], iters: int, reps: int,
             worker: str = _WORKER) -> tuple[list, list]:
    full = dict(os.environ, **env)
    for k in _THREAD_ENV:  # only what the configuration sets
        if k not in env:
            full.pop(k, None)
    out = subprocess.run([sys.executable, "-c", worker, *map(str, shape), str(iters), str(reps)],
                         env=full, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the worker failed ({env}):\n{out.stderr[-3000:]}")
    ms, ended = json.loads(out.stdout.strip().splitlines()[-1])
    return ms, ended


def run(iters: int = 2000, rounds: int = 3, hogs: int | None = None, layers: bool = False,
        training: bool = False) -> dict:
    """Every load, workload and configuration, ``rounds`` times; with ``layers``, the learned
    layers' forward (``iters`` forwards a run) instead of MU (``iters`` iterations a run); with
    ``training``, NALMU training steps (``iters`` steps a run)."""
    from fastmu.benchmarks.machine import machine_info

    if hogs is None:
        hogs = os.cpu_count() or 2
    workloads, configs, worker = (TRAIN_WORKLOADS, CONFIGS, _TRAIN_WORKER) if training else \
        (LAYER_WORKLOADS, CONFIGS, _LAYER_WORKER) if layers else (WORKLOADS, CONFIGS, _WORKER)
    times: dict[tuple[str, str, str], list[float]] = {}
    ended: dict[tuple[str, str, str], list] = {}
    # rounds outermost, so that a drift of the machine's speed spreads over every cell
    for r in range(rounds):
        for load in LOADS:
            procs = _start(load, hogs)
            try:
                for wname, shape in workloads.items():
                    for cname, env in configs.items():
                        ms, threads = _measure(shape, env, iters, 3, worker)
                        times.setdefault((load, wname, cname), []).extend(ms)
                        ended.setdefault((load, wname, cname), []).extend(threads)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
        print(f"round {r + 1}/{rounds} done")
    ab = None if layers or training else quiet_ab(WORKLOADS["single 65 × 16384"], iters, 5 * rounds)
    rows = [{"load": load, "workload": w, "config": c, "ms_per_iter": ts, "median_ms": float(np.median(ts)),
             "threads_at_end": ended[(load, w, c)]}
            for (load, w, c), ts in times.items()]
    res = {"iters": iters, "rounds": rounds, "hogs": hogs, "loads": LOADS, "configs": configs,
           "workloads": workloads, "results": rows, "machine": machine_info()}
    if ab is not None:
        res["quiet_ab_single"] = ab
    else:
        res["unit"] = "ms per training step" if training else "ms per layer (a forward of 50 layers / 50)"
    return res


def format_table(res: dict) -> str:
    """Markdown: one row per workload and load, one column per configuration (median ms per iteration,
    and its ratio to the quiet machine's default)."""
    names = list(res["configs"])
    lines = ["| workload | competing work | " + " | ".join(f"`{c}`" for c in names) + " |",
             "| --- | --- |" + " ---: |" * len(names)]
    by = {(r["load"], r["workload"], r["config"]): r["median_ms"] for r in res["results"]}
    for w in res["workloads"]:
        for load in res["loads"]:
            quiet_default = by[("quiet", w, "default")]
            cells = [f"{by[(load, w, c)]:.3f} ({by[(load, w, c)] / quiet_default:.2g}×)" for c in names]
            label = {"quiet": "none", "Python loops": f"{res['hogs']} Python loops"}.get(load, load)
            lines.append(f"| {w} | {label} | " + " | ".join(cells) + " |")
    ab = res.get("quiet_ab_single")
    if ab:
        g, f = (float(np.median(ab[k])) for k in ("governed", "FASTMU_ADAPTIVE_THREADS=0"))
        lines.append(f"\nQuiet machine, one process, alternating ({len(ab['governed'])} runs each): "
                     f"governed {g:.3f}, FASTMU_ADAPTIVE_THREADS=0 {f:.3f} ms per iteration ({g / f:.2f}×)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=None,
                    help="MU iterations per run (default 2000), forwards per run with --layers (default 10), "
                         "training steps per run with --training (default 3)")
    ap.add_argument("--layers", action="store_true",
                    help="the learned layers' forward instead of MU (default out: bench/results/nalmu_cpu_busy.json)")
    ap.add_argument("--training", action="store_true",
                    help="NALMU training steps, forward and backward (default out: "
                         "bench/results/nalmu_train_cpu_busy.json)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=None, help="busy-loop processes (default: one per core)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="print the table of a saved JSON and exit")
    args = ap.parse_args()
    if args.table is not None:
        print(format_table(json.loads(args.table.read_text())))
        return
    if args.layers and args.training:
        ap.error("--layers and --training: pick one")
    iters = args.iters if args.iters is not None else (10 if args.layers else 3 if args.training else 2000)
    if args.out is None:
        args.out = Path("bench/results/nalmu_train_cpu_busy.json" if args.training else
                        "bench/results/nalmu_cpu_busy.json" if args.layers else "bench/results/mu_cpu_busy.json")
    res = run(iters, args.rounds, args.hogs, args.layers, args.training)
    print(format_table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
