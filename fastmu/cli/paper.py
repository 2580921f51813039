"""``fastmu paper``: the paper's Tables I–II and Fig. 2, trained and measured in one command."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastmu.cli import _checks

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
            "--preset small takes about half a minute on 2 CPU cores; --preset paper is the paper's size "
            "(750 training and 2 × 150 test problems of 65 × 16384, 10 000 MU iterations): use a GPU."
        ),
        epilog=(
            "Checkpoints. The models trained are saved in OUT/models and reused by a later run into the same "
            "--out only if they were trained with exactly that run's settings; otherwise they are trained "
            "anew and overwritten (the log says why). --models DIR is yours: its <kind>.pt or "
            "fastmu-<kind>.pt (from `fastmu train`) are loaded and never overwritten; one that cannot be "
            "read, or of another kind, m, n or depth, is refused before any training; one trained with other "
            "settings (epochs, SNR, ...) or recording none is used, and the log, the tables and "
            "results.json say so. The models missing from DIR are trained and saved there."
        ),
    )
    p.add_argument("--preset", choices=("small", "paper"), default="small",
                   help="set sizes: small = 64 train and 2 × 16 test problems of 65×1024 (default); "
                        "paper = 750 and 2 × 150 of 65×16384")
    p.add_argument("--out", type=_checks.path, default=Path("fastmu-paper"),
                   help="output folder (default fastmu-paper)")
    p.add_argument("--models", type=_checks.path, default=None,
                   help="folder of checkpoints to load, and to write the ones it trains (default: OUT/models; "
                        "see below)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="the methods to run and score (default: all)")
    p.add_argument("--epochs", type=_checks.int_at_least(1), default=None,
                   help="training epochs per model (ALMU: per stage; default 10)")
    p.add_argument("--batch-size", type=_checks.int_at_least(1), default=None,
                   help="training batch size (default 25)")
    p.add_argument("--lr", type=_checks.positive_float, default=None,
                   help="Adam learning rate (default 0.01; ALMU's MLP stage uses lr/10)")
    p.add_argument("--layers", type=_checks.int_at_least(1), default=None,
                   help="NALMU depth (default 50); ALMU = half front, half adaptive, so >= 2 with almu")
    p.add_argument("--dnmf-layers", type=_checks.int_at_least(1), default=None, help="DNMF depth (default 10)")
    p.add_argument("--snmf-layers", type=_checks.int_at_least(1), default=None, help="SNMF-Net depth (default 9)")
    p.add_argument("--mu-iters", type=_checks.int_at_least(1), default=None, help="default 10000")
    p.add_argument("--cd-iters", type=_checks.int_at_least(1), default=None, help="default 1000")
    p.add_argument("--train-spectra", choices=("generated", "real"), default=None,
                   help="train on generated spectra (default) or on the real Chandra set of the reference-data folder")
    p.add_argument("--snr", type=_checks.finite_float, default=60.0, help="SNR in dB of every set (default 60)")
    _checks.add_set_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the log lines stay)")
    p.set_defaults(func=run, interrupt_note="the models trained so far are saved, and the one in training "
                                           "after its last epoch: the same command reuses them and goes on")


#: the options that only some methods use, their defaults, and the methods (refused, not ignored, without them)
_LEARNED = {"nalmu", "almu", "dnmf", "snmf_net"}
_METHOD_OPTIONS: dict[str, tuple[object, set[str]]] = {
    "epochs": (10, _LEARNED), "lr": (1e-2, _LEARNED), "batch_size": (25, _LEARNED),
    "train_spectra": ("generated", _LEARNED),
    "models": (None, _LEARNED), "n_train": (None, _LEARNED), "layers": (50, {"nalmu", "almu"}),
    "dnmf_layers": (10, {"dnmf"}), "snmf_layers": (9, {"snmf_net"}), "mu_iters": (10_000, {"mu"}),
    "cd_iters": (1_000, {"cd"}),
}


def _method_options(args: argparse.Namespace) -> None:
    """Refuse options none of ``--methods`` uses (as unmix and bench do), then fill in the defaults."""
    methods = set(args.methods)
    unused = [dest for dest, (_, users) in _METHOD_OPTIONS.items()
              if getattr(args, dest) is not None and not users & methods]
    if unused:
        names = ", ".join("--" + d.replace("_", "-") for d in unused)
        raise ValueError(f"{names}: not used by --methods {' '.join(args.methods)}; drop "
                         + ("them" if len(unused) > 1 else "it") + " or add a method that uses "
                         + ("them" if len(unused) > 1 else "it"))
    for dest, (default, _) in _METHOD_OPTIONS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)


def run(args: argparse.Namespace) -> int:
    _method_options(args)
    if "almu" in args.methods and args.layers < 2:
        raise ValueError("--layers must be >= 2 with ALMU (half NALMU front, half adaptive layers)")
    # the folders are checked again by run_paper; here before torch is imported
    _checks.check_output_folder(args.out, "--out")
    if args.models is not None and args.models.exists() and not args.models.is_dir():
        raise ValueError(f"--models {args.models} is a file, not a folder")

    from fastmu.experiments import ExperimentConfig, format_table, run_paper

    cfg = ExperimentConfig(
        preset=args.preset, seed=args.seed, snr_db=args.snr, methods=tuple(args.methods),
        mu_iters=args.mu_iters, cd_iters=args.cd_iters, nalmu_layers=args.layers, dnmf_layers=args.dnmf_layers,
        snmf_layers=args.snmf_layers, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        train_spectra=args.train_spectra, device=args.device, dtype=args.dtype, size=args.size,
        n_train=args.n_train, n_test=args.n_test)
    res = run_paper(cfg, args.out, models_dir=args.models, progress=not args.no_progress, log=print)
    for set_name in ("test_simple", "test_realistic"):
        print()
        print(format_table(res, set_name))
    return 0
