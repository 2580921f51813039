"""``fastmu data``: preview figures and realism statistics of the data generators."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fastmu.cli import _checks

#: fewest channels the spectral model resolves (fastmu.data.spectra's check, spelt out so that
#: ``fastmu --help`` does not import the generators; a test keeps the two equal)
MIN_CHANNELS = 8
#: smallest map side of ``data preview`` (the remnant generator's; spelt out for the same reason)
MIN_SIZE = 4


def register(subparsers) -> None:
    """Add the ``data`` command (with ``preview`` and ``stats``) to ``subparsers``."""
    p = subparsers.add_parser("data", help="preview and check the data generators",
                              description="Figures and realism statistics of fastmu's data generators.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--spectra", type=_checks.path,
                       help="spectra file (.npz key A, or .npy) instead of generated ones")
        q.add_argument("--n", type=_checks.int_at_least(1), default=None,
                       help="number of generated spectra (default 750)")
        q.add_argument("--seed", type=_checks.seed, default=None, help="seed of the generator (default 0)")
        q.add_argument("--m", type=_checks.int_at_least(MIN_CHANNELS), default=None,
                       help=f"channels of generated spectra, at least {MIN_CHANNELS} (default 65)")
        q.add_argument("--reference", type=_checks.path,
                       help="real spectra to compare with (default: chandra_mixing_matrices.npz "
                            "in the reference-data folder, if found)")

    pv = sub.add_parser("preview", help="write PNG figures like the paper's Fig. 1")
    common(pv)
    pv.add_argument("--out", type=_checks.path, required=True, help="output folder for the PNGs")
    pv.add_argument("--size", type=_checks.int_at_least(MIN_SIZE), default=128,
                    help=f"map size, at least {MIN_SIZE} (default 128)")
    # command_name: errors say "fastmu data preview: ...", the command the user typed
    pv.set_defaults(func=_preview, command_name="data preview")

    st = sub.add_parser("stats", help="print the realism statistics of spectra")
    common(st)
    st.set_defaults(func=_stats, command_name="data stats")


def _read_spectra(path: Path, option: str) -> np.ndarray:
    """Spectra from ``path``, validated; a wrong shape is reported as the file holds it."""
    _checks.check_input_file(path, option)
    from fastmu.data import load_spectra

    try:
        return load_spectra(path)
    except (ValueError, TypeError) as exc:  # load_spectra names the shape or dtype the file holds
        # the library's remedy (its key= argument) is not an option here
        msg = str(exc).replace("; pass key=", ": the file must hold an array named 'A', or only one array")
        raise type(exc)(f"{option} {path}: {msg}") from None


def _spectra_sets(args) -> dict:
    from fastmu.data import shared_data_dir, spectra

    sets = {}
    if args.spectra is not None:
        # refused rather than ignored, as unmix and bench do (preview's maps still take --seed)
        given = [o for o, v in (("--n", args.n), ("--m", args.m)) if v is not None]
        if args.seed is not None and args.command_name == "data stats":
            given.append("--seed")
        if given:
            raise ValueError(f"{' and '.join(given)} {'shape' if len(given) > 1 else 'shapes'} the generated "
                             "spectra; with --spectra the file's are used: drop " + ("them" if len(given) > 1 else "it"))
        sets[args.spectra.stem] = _read_spectra(args.spectra, "--spectra")
    else:
        sets["generated"] = spectra(750 if args.n is None else args.n, seed=args.seed or 0,
                                    m=65 if args.m is None else args.m)
    ref = args.reference
    if ref is None:
        d = shared_data_dir()
        if d is not None and (d / "chandra_mixing_matrices.npz").exists():
            ref = d / "chandra_mixing_matrices.npz"
    if ref is not None:
        sets = {"real": _read_spectra(ref, "--reference"), **sets}
    return sets


def _stats(args) -> int:
    from fastmu.data import format_stats, stats

    sets = _spectra_sets(args)
    print(format_stats({k: stats(v) for k, v in sets.items()}))
    return 0


def _preview(args) -> int:
    from fastmu.data import natural_images, remnant, shared_data_dir
    from fastmu.data.figures import plot_maps, plot_spectra_fan

    out = Path(args.out)
    _checks.check_output_folder(out, "--out")  # before the figures are drawn; creates nothing
    sets = _spectra_sets(args)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_spectra_fan(sets, out / "spectra.png")]
    size = args.size
    seed = args.seed or 0
    rows = {"natural": natural_images(4, size, seed=seed)}
    rows["remnant"] = remnant(size, seed=seed)
    d = shared_data_dir()
    if d is not None and (d / "casa_source_maps.npz").exists():
        from fastmu.data import load_maps

        rows["Cas A"] = load_maps(d / "casa_source_maps.npz", size=size)[0]
    written.append(plot_maps(rows, out / "maps.png"))
    for w in written:
        print(w)
    return 0
