"""Figure of a GPU kernel-knob sweep: ms per iteration against blocks per problem.

Usage::

    python bench/plot_gpu_sweep.py bench/results/mu_gpu_sweep_h200.json \
        --peers bench/results/mu_gpu_h200.json --out bench/results/mu_gpu_sweep_h200.png

One panel per batch size (W1: one problem, W2: 150), one line per (staging,
prefetch, threads, unroll, occupancy) in grid mode (runs at the automatic
block count have no x position and are left out), block mode as a marker at one block per
problem, and, given ``--peers`` (a ``run_gpu_benchmarks`` JSON from the same
kind of GPU), torch eager as a horizontal line. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(sweeps: list[dict], peers: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for s in sweeps for r in s["rows"] if "ms_per_iter" in r]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == b]
        def key(r: dict) -> tuple:
            return (r.get("staging") or "rows", bool(r.get("prefetch")), r["threads"], r["unroll"],
                    r.get("occupancy", 512))

        for st, pf, tpb, ur, occ in sorted({key(r) for r in mine}):
            # rows at the automatic block count (blocks_per_problem null) have no x position
            grid = sorted((r["blocks_per_problem"], r["ms_per_iter"]) for r in mine
                          if r["mode"] == "grid" and r["blocks_per_problem"] is not None
                          and key(r) == (st, pf, tpb, ur, occ))
            label = (f"regs{' prefetch' if pf else ''}, {occ}/SM" if st == "regs"
                     else f"{st}: {tpb} threads, unroll {ur}, {occ}/SM")
            if grid:
                line, = ax.plot(*zip(*grid), marker="o", label=label)
                color = line.get_color()
            else:
                color = None
            block = [r["ms_per_iter"] for r in mine if r["mode"] == "block" and key(r) == (st, pf, tpb, ur, occ)]
            if block:
                ax.plot([1], block[:1], marker="s", linestyle="none", color=color, mfc="none", ms=9)
        if peers is not None:
            w = "W1" if b == 1 else "W2"
            eager = peers.get("workloads", {}).get(w, {}).get("results", {}).get("torch_eager", {})
            if "ms_per_iter" in eager:
                ax.axhline(eager["ms_per_iter"], color="k", linestyle="--", label="torch eager")
                ax.axhline(eager["ms_per_iter"] / (10 if b == 1 else 3), color="k", linestyle=":",
                           label=f"target ({10 if b == 1 else 3}× torch eager)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("blocks per problem (grid mode; squares: block mode)")
        ax.set_ylabel("ms per iteration")
        ax.set_title(f"{b} problem{'s' if b > 1 else ''} of 65×16384, float32, rank 4")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    dev = sweeps[0].get("device", "GPU")
    fig.suptitle(f"fastmu CUDA kernels on {dev}: knob sweep", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path, help="sweep JSON files (python -m fastmu.benchmarks.mu_gpu --sweep)")
    ap.add_argument("--peers", type=Path, default=None, help="a W1/W2 benchmark JSON for the torch eager line")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sweeps = [json.loads(p.read_text()) for p in args.sweeps]
    peers = json.loads(args.peers.read_text()) if args.peers else None
    plot(sweeps, peers, args.out)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
