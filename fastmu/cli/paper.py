"""``fastmu paper``: the paper's Tables I–II and Fig. 2, trained and measured in one command."""
from __future__ import annotations

import argparse
from pathlib import Path


#: fastmu.experiments.METHODS, spelt out so that ``fastmu --help`` does not import torch
METHODS = ("mu", "cd", "dnmf", "snmf_net", "nalmu", "almu")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "paper",
        help="reproduce the paper's Tables I-II and Fig. 2 (train, score every method, write tables and figure)",
        description=(
            "Build the paper's sets, train the unrolled models (or load them from --models), run MU and "
            "coordinate descent, score every method on both test sets (Hungarian-matched mean cosine, the "
            "paper's 'SAD'; spectral angle; RMSE) and write results.json, table1.md, table2.md and fig2.png. "
            "--preset small runs in minutes on a CPU; --preset paper is the paper's size (750 training and "
            "2 × 150 test problems of 65 × 16384, 10 000 MU iterations): use a GPU."
        ),
    )
    p.add_argument("--preset", choices=("small", "paper"), default="small")
    p.add_argument("--out", type=Path, default=Path("fastmu-paper"), help="output folder (default fastmu-paper)")
    p.add_argument("--models", type=Path, default=None,
                   help="folder of checkpoints (<kind>.pt) to load, and to write the ones it trains "
                        "(default OUT/models)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--epochs", type=int, default=10, help="training epochs per model (ALMU: per stage)")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--layers", type=int, default=50, help="NALMU depth; ALMU = half front, half adaptive")
    p.add_argument("--mu-iters", type=int, default=10_000)
    p.add_argument("--cd-iters", type=int, default=1_000)
    p.add_argument("--train-spectra", choices=("generated", "real"), default="generated")
    p.add_argument("--snr", type=float, default=60.0, help="SNR in dB of every set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="map side (t = size²), overriding the preset's")
    p.add_argument("--n-train", type=int, default=None, help="training problems, overriding the preset's")
    p.add_argument("--n-test", type=int, default=None, help="problems per test set, overriding the preset's")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmu.experiments import ExperimentConfig, format_table, run_paper

    cfg = ExperimentConfig(
        preset=args.preset, seed=args.seed, snr_db=args.snr, methods=tuple(args.methods),
        mu_iters=args.mu_iters, cd_iters=args.cd_iters, nalmu_layers=args.layers, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, train_spectra=args.train_spectra, device=args.device,
        dtype=args.dtype, size=args.size, n_train=args.n_train, n_test=args.n_test)
    res = run_paper(cfg, args.out, models_dir=args.models, progress=not args.no_progress)
    for set_name in ("test_simple", "test_realistic"):
        print()
        print(format_table(res, set_name))
    return 0
