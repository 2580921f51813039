"""Training length: the learned models of two ``fastmu paper`` runs side by side, against MU.

Both runs must score the same test problems (one preset, seed and SNR); MU's
scores come from the first run. Prints a Markdown table: per test set, MU
and each learned model after each run's epochs, with the mean ± std of the
matched cosines and how many problems each model scores above MU on::

    fastmu paper --preset paper --epochs 5 --out bench/results/paper_cpu
    fastmu paper --preset paper --epochs 20 --methods nalmu almu --out bench/results/paper_cpu_20_epochs
    fastmu paper --preset paper --epochs 20 --methods dnmf snmf_net --out bench/results/paper_cpu_20_epochs_baselines
    python bench/paper_epochs.py bench/results/paper_cpu bench/results/paper_cpu_20_epochs \
        bench/results/paper_cpu_20_epochs_baselines
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SETS = {"test_simple": "I (simple)", "test_realistic": "II (realistic)"}
NAMES = {"nalmu": "NALMU (50 layers)", "almu": "ALMU (25 + 25 layers)", "dnmf": "DNMF (10 layers)",
         "snmf_net": "SNMF-Net (9 layers)"}


def _load(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _same_problems(a: dict, b: dict) -> None:
    keys = ("preset", "seed", "snr_db", "train_spectra", "size", "n_train", "n_test", "dtype")
    diff = {k: (a["config"].get(k), b["config"].get(k)) for k in keys if a["config"].get(k) != b["config"].get(k)}
    if diff:
        raise SystemExit(f"the two runs did not score the same problems: {diff}")


def table(runs: list[dict]) -> str:
    base = runs[0]
    for r in runs[1:]:
        _same_problems(base, r)
    lines = ["| table | method | epochs | cos A ↑ | cos S ↑ | problems above MU (A / S) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for ts, label in SETS.items():
        mu = base["scores"][ts]["mu"]
        muA, muS = np.asarray(mu["cos_A"]), np.asarray(mu["cos_S"])
        iters = f"{base['config']['mu_iters']:,}".replace(",", " ")
        lines.append(f"| {label} | MU ({iters} it.) | | {muA.mean():.4f} ± {muA.std():.4f} "
                     f"| {muS.mean():.4f} ± {muS.std():.4f} | |")
        for method, name in NAMES.items():
            for r in runs:
                s = r["scores"][ts].get(method)
                if s is None:
                    continue
                a, b = np.asarray(s["cos_A"]), np.asarray(s["cos_S"])
                lines.append(f"| {label} | {name} | {r['config']['epochs']} | {a.mean():.4f} ± {a.std():.4f} | "
                             f"{b.mean():.4f} ± {b.std():.4f} | {int((a > muA).sum())} / {int((b > muS).sum())} "
                             f"of {a.size} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="fastmu paper output folders; the first one has MU")
    args = ap.parse_args()
    print(table([_load(f) for f in args.runs]))


if __name__ == "__main__":
    main()
