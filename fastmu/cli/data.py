"""``fastmu data``: preview figures and realism statistics of the data generators."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``data`` command (with ``preview`` and ``stats``) to ``subparsers``."""
    p = subparsers.add_parser("data", help="preview and check the data generators",
                              description="Figures and realism statistics of fastmu's data generators.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--spectra", type=Path, help="spectra file (.npz key A, or .npy) instead of generated ones")
        q.add_argument("--n", type=int, default=750, help="number of generated spectra (default 750)")
        q.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
        q.add_argument("--m", type=int, default=65, help="channels of generated spectra (default 65)")
        q.add_argument("--reference", type=Path,
                       help="real spectra to compare with (default: chandra_mixing_matrices.npz "
                            "in the reference-data folder, if found)")

    pv = sub.add_parser("preview", help="write PNG figures like the paper's Fig. 1")
    common(pv)
    pv.add_argument("--out", type=Path, required=True, help="output folder for the PNGs")
    pv.add_argument("--size", type=int, default=128, help="map size (default 128)")
    pv.set_defaults(func=_preview)

    st = sub.add_parser("stats", help="print the realism statistics of spectra")
    common(st)
    st.set_defaults(func=_stats)


def _spectra_sets(args) -> dict:
    from fastmu.data import load_spectra, shared_data_dir, spectra

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    sets = {}
    if args.spectra is not None:
        sets[args.spectra.stem] = load_spectra(args.spectra)
    else:
        sets["generated"] = spectra(args.n, seed=args.seed, m=args.m)
    ref = args.reference
    if ref is None:
        d = shared_data_dir()
        if d is not None and (d / "chandra_mixing_matrices.npz").exists():
            ref = d / "chandra_mixing_matrices.npz"
    if ref is not None:
        sets = {"real": load_spectra(ref), **sets}
    return sets


def _stats(args) -> int:
    from fastmu.data import format_stats, stats

    sets = _spectra_sets(args)
    print(format_stats({k: stats(v) for k, v in sets.items()}))
    return 0


def _preview(args) -> int:
    from fastmu.data import natural_images, remnant, shared_data_dir
    from fastmu.data.figures import plot_maps, plot_spectra_fan

    from fastmu.data.remnant import _MIN_SIZE

    if args.size < _MIN_SIZE:  # before any figure is written
        raise ValueError(f"--size must be at least {_MIN_SIZE} (the remnant's smallest map), got {args.size}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = _spectra_sets(args)
    written = [plot_spectra_fan(sets, out / "spectra.png")]
    size = args.size
    rows = {"natural": natural_images(4, size, seed=args.seed)}
    rows["remnant"] = remnant(size, seed=args.seed)
    d = shared_data_dir()
    if d is not None and (d / "casa_source_maps.npz").exists():
        from fastmu.data import load_maps

        rows["Cas A"] = load_maps(d / "casa_source_maps.npz", size=size)[0]
    written.append(plot_maps(rows, out / "maps.png"))
    for w in written:
        print(w)
    return 0
