"""``fastmu train``: train one learned model on the paper's training set and save it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastmu.cli import _checks

KINDS = ("nalmu", "almu", "dnmf", "snmf_net")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train NALMU, ALMU, DNMF or SNMF-Net with the paper's loss and save a checkpoint",
        description=(
            "Train one unrolled model on the paper's training set (generated Chandra-like spectra, or the real "
            "ones with --train-spectra real, mixed with natural-image maps at 60 dB), scoring it on the "
            "held-out simple test set after every epoch. ALMU trains in two stages: its NALMU front, then "
            "its MLPs with the front frozen (--epochs each). The checkpoint loads with "
            "fastmu.training.load_model and records the settings it was trained with; `fastmu paper "
            "--models DIR` loads DIR/<kind>.pt or DIR/fastmu-<kind>.pt (this command's default name) when "
            "its kind, m, n and depth match the paper run's, and says so where it was trained with other "
            "settings."
        ),
    )
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--preset", choices=("small", "paper"), default="small",
                   help="set sizes: small = 64 train problems of 65×1024 (default); paper = 750 of 65×16384")
    p.add_argument("--layers", type=_checks.int_at_least(1), default=None,
                   help="depth (default: nalmu/almu 50, dnmf 10, snmf_net 9); ALMU splits it in half, so >= 2")
    p.add_argument("--epochs", type=_checks.int_at_least(1), default=10,
                   help="epochs (ALMU: per stage; default 10)")
    p.add_argument("--batch-size", type=_checks.int_at_least(1), default=25, help="default 25")
    p.add_argument("--lr", type=_checks.positive_float, default=1e-2,
                   help="Adam learning rate (ALMU's MLP stage: a tenth; default 0.01)")
    p.add_argument("--train-spectra", choices=("generated", "real"), default="generated",
                   help="train on generated spectra (default) or on the real Chandra set of the reference-data folder")
    _checks.add_set_options(p)
    p.add_argument("--out", type=_checks.path, default=None, help="checkpoint path (default: fastmu-<kind>.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the log lines stay)")
    p.set_defaults(func=run, interrupt_note="the epochs done are kept in the checkpoint path + '.part': "
                                           "the same command goes on from there")


def run(args: argparse.Namespace) -> int:
    if args.kind == "almu" and args.layers is not None and args.layers < 2:
        raise ValueError("--layers must be >= 2 for ALMU (half NALMU front, half adaptive layers)")
    out = args.out or Path(f"fastmu-{args.kind}.pt")
    _checks.check_output_file(out, "--out")  # before the training, not after it

    from fastmu.experiments import (ExperimentConfig, fit_resumable, make_sets, partial_path, save_finished,
                                    training_settings)

    # --layers sets the depth field of this kind; the others keep ExperimentConfig's defaults
    depth = {"nalmu": "nalmu_layers", "almu": "nalmu_layers", "dnmf": "dnmf_layers", "snmf_net": "snmf_layers"}
    layers = {depth[args.kind]: args.layers} if args.layers is not None else {}
    cfg = ExperimentConfig(
        preset=args.preset, seed=args.seed, methods=(args.kind,), **layers, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, train_spectra=args.train_spectra, device=args.device,
        dtype=args.dtype, size=args.size, n_train=args.n_train, n_test=args.n_test)
    _checks.check_output_file(partial_path(out), "--out")
    args.interrupt_note = f"the epochs done are kept in {partial_path(out)}: the same command goes on from there"
    sets = make_sets(cfg)
    tr = sets["train"]
    print(f"training {args.kind} on {tr.name} {tr.shape}, validating on {sets['test_simple'].name} "
          f"{sets['test_simple'].shape}; each epoch is kept in {partial_path(out)}")

    def show(e) -> None:
        print(f"{e.stage} epoch {e.epoch}: loss {e.train_loss:.4f}, held-out cos A {e.val_cos_A:.4f}, "
              f"cos S {e.val_cos_S:.4f} ({e.seconds:.1f} s)")

    model, hist, seconds = fit_resumable(args.kind, cfg, tr, out, log=print, val_set=sets["test_simple"],
                                         progress=not args.no_progress, on_epoch=show)
    # trained_with lets `fastmu paper --models` check that the checkpoint is the model it asks for
    save_finished(model, out, hist, seconds, config=json.loads(json.dumps(cfg.__dict__, default=list)),
                  trained_with=training_settings(args.kind, cfg, tr))
    print(f"{args.kind}: {sum(p.numel() for p in model.parameters())} parameters, trained in {seconds:.1f} s; "
          f"saved {out}")
    return 0
