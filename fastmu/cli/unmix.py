"""``fastmu unmix``: factorise a matrix or cube from a file (or a built-in demo scene)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastmu.cli import _checks

LAYOUTS = {
    "mt": "(m channels, t pixels)",
    "bmt": "(b problems, m channels, t pixels)",
    "hwm": "image cube (rows, cols, m bands)",
    "mhw": "image cube (m bands, rows, cols)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "unmix",
        help="factorise X ≈ A S with fused MU (a .npy/.npz file, or --demo)",
        description=(
            "Factorise non-negative data X ≈ A S with multiplicative updates. Reads a .npy "
            "or .npz file (or builds a demo scene), writes A, S, the iterations run (n_iter) and, "
            "given the truth, the separation scores to an .npz file."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="layouts:\n" + "\n".join(f"  {k:<4} {v}" for k, v in LAYOUTS.items())
        + "\n\nA 3-D array without --layout is a batch (bmt); an image cube needs --layout hwm or mhw.",
    )
    p.add_argument("input", nargs="?", type=_checks.path, help=".npy or .npz file holding X")
    p.add_argument("--demo", action="store_true",
                   help="unmix a built-in scene: generated Chandra-like spectra × a procedural supernova remnant, "
                        "60 dB, 4 components (takes no input, --key, --layout or --truth)")
    p.add_argument("--key", default=None,
                   help="array name inside an .npz input (default: X, or the only array); not for .npy")
    p.add_argument("--layout", choices=tuple(LAYOUTS), default=None,
                   help="how X is laid out (default: mt for 2-D, bmt, a batch of problems, for 3-D)")
    p.add_argument("-n", "--n-components", type=_checks.int_at_least(1), default=None,
                   help="rank (required for a file; --demo has 4 components)")
    p.add_argument("--iters", type=_checks.int_at_least(0), default=1000,
                   help="maximum number of MU iterations (default 1000)")
    p.add_argument("--tol", type=_checks.non_negative_float, default=None,
                   help="stop early once, for every problem, the objective ½‖X − AS‖² fell by less than TOL "
                        "times its initial value over the last 10 iterations (checked every 10; "
                        "default: run all --iters)")
    p.add_argument("--init", choices=("random", "nndsvda", "nndsvdar", "nndsvd"), default="random",
                   help="the start: random = scikit-learn's random start, seeded by --seed (default); "
                        "nndsvda = NNDSVD, zeros filled with the mean; nndsvdar = NNDSVD, zeros filled with "
                        "small random values (seeded by --seed); nndsvd = NNDSVD as is (MU never updates its "
                        "zeros)")
    for name, what in (("l1-A", "L1 (sparsity)"), ("l2-A", "L2"), ("l1-S", "L1 (sparsity)"), ("l2-S", "L2")):
        p.add_argument(f"--{name}", type=_checks.non_negative_float, default=0.0, metavar="W",
                       dest=name.replace("-", "_"),
                       help=f"weight of an {what} penalty on {name[-1]} (default 0; see fastmu.mu; with "
                            "--normalise it applies to the normalised X)")
    p.add_argument("--seed", type=_checks.seed, default=0,
                   help="seed of the random start (and the demo scene), 0 … 2**32-1 (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="precision of the run and of the saved factors (default: float32; float64 for "
                        "integer or bool input, and for float input whose values float32 cannot hold)")
    p.add_argument("--normalise", action="store_true",
                   help="divide each problem's X by its mean before MU and scale A back (MU is scale-free): "
                        "for data whose values are so small that eps=1e-12 matters, e.g. fluxes")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda", "torch"), default="auto",
                   help="auto (default) and cpu: the fused CPU kernels; cuda: the fused CUDA kernels "
                        "(needs a GPU and Numba CUDA); torch: the pure-torch reference update")
    p.add_argument("--truth", type=_checks.path, default=None,
                   help=".npz with the true factors, to score the result")
    p.add_argument("--truth-keys", nargs=2, default=None, metavar=("A_KEY", "S_KEY"),
                   help="names of the true A and S inside the --truth file (default: A S)")
    p.add_argument("--out", type=_checks.path, default=Path("fastmu-unmix.npz"),
                   help="output .npz (default fastmu-unmix.npz; .npz is added to a name without it)")
    p.add_argument("--figure", type=_checks.path, default=None,
                   help="also draw spectra and maps to this image (.png, .pdf, .svg, ...; .png is added "
                        "to a name without a suffix)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, scale_hint="Here: --normalise does that.")


def _load_array(path: Path, key: str | None, *, key_option: str = "--key", key_given: bool = True,
                option: str = "") -> np.ndarray:
    """The array in a .npy file, or the one named ``key`` (default: X, or the only one) in an .npz.

    ``key_option`` is the option that names the array, ``key_given`` whether the user gave it (the
    messages then say the name is wrong rather than that one is needed).
    """
    _checks.check_input_file(path, option)
    from fastmu.data.io import read_array

    if path.suffix.lower() not in (".npy", ".npz"):
        raise ValueError(f"{path}: expected a .npy or .npz file")

    def choose(names: list[str]) -> str:
        if not names:
            raise ValueError(f"{path} holds no arrays")
        listed = ", ".join(names)
        if key is not None:
            if key not in names:
                if key_given:
                    raise ValueError(f"{path} has no array {key!r} (given with {key_option}); its arrays: {listed}")
                raise ValueError(f"{path} has no array {key!r} (its arrays: {listed}); name them with {key_option}")
            return key
        if "X" in names:
            return "X"
        if len(names) == 1:
            return names[0]
        raise ValueError(f"{path} holds {listed}; name the array with {key_option}")

    return read_array(path, choose)


def _to_problems(X: np.ndarray, layout: str | None) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """Reshape to (m, t) or (b, m, t); return the layout and the pixel-grid shape."""
    if layout is None:
        layout = {2: "mt", 3: "bmt"}.get(X.ndim)
        if layout is None:
            raise ValueError(f"X has {X.ndim} dimensions; expected 2 or 3 (see --layout)")
    want = {"mt": 2, "bmt": 3, "hwm": 3, "mhw": 3}[layout]
    if X.ndim != want:
        raise ValueError(f"--layout {layout} expects a {want}-D array, got shape {X.shape}")
    if layout == "hwm":
        h, w, m = X.shape
        return X.reshape(h * w, m).T, layout, (h, w)
    if layout == "mhw":
        m, h, w = X.shape
        return X.reshape(m, h * w), layout, (h, w)
    return X, layout, (X.shape[-1],)


#: components of the demo scene (Chandra-like spectra: sync, therm, fe1, fe2)
DEMO_COMPONENTS = 4


def _demo_scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    from fastmu import data

    A = data.spectra(1, seed=seed)[0]  # (65, 4)
    maps = data.remnant(128, seed=seed)  # (4, 128, 128)
    S = maps.reshape(DEMO_COMPONENTS, -1)
    import torch

    X = data.mix(A[None], S[None], 60.0, seeds=[seed], dtype=torch.float64)[0][0]
    # Gaussian noise makes a few dark pixels slightly negative; MU needs X >= 0.
    return np.maximum(X.numpy(), 0.0), A, S, maps.shape[1:]


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that would be silently ignored, before any work."""
    if args.demo:
        if args.input is not None:
            raise ValueError("give an input file or --demo, not both")
        unused = [opt for opt, value in (("--key", args.key), ("--layout", args.layout), ("--truth", args.truth),
                                         ("--truth-keys", args.truth_keys)) if value is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to --demo "
                             "(it builds its own X and truth)")
        if args.n_components not in (None, DEMO_COMPONENTS):
            raise ValueError(f"the demo scene has {DEMO_COMPONENTS} components: leave -n out or give -n "
                             f"{DEMO_COMPONENTS}, not {args.n_components}")
        return
    if args.input is None:
        raise ValueError("give an input .npy/.npz file, or --demo")
    if args.key is not None and args.input.suffix.lower() == ".npy":
        raise ValueError(f"--key names an array inside an .npz; {args.input} is a .npy file, which holds one")
    if args.truth_keys is not None and args.truth is None:
        raise ValueError("--truth-keys names the arrays of the --truth file; give --truth too")
    if args.truth is not None and args.truth.suffix.lower() != ".npz":
        raise ValueError(f"--truth {args.truth}: expected an .npz holding the true A and S (see --truth-keys)")


def _out_path(out: Path) -> Path:
    """The .npz file written, checked before the work."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'fastmu-unmix.npz'}")
    # np.savez adds .npz to a name without it: say the name it writes
    path = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
    _checks.check_output_file(path, "--out")
    return path


def _out_of_range(X: np.ndarray, dtype: np.dtype) -> str | None:
    """Why ``dtype`` cannot hold X's finite values (None where it can): a value past its
    largest, or a non-zero one below its smallest normal number (which the kernels read as 0)."""
    if X.dtype.kind != "f" or np.finfo(X.dtype).bits <= np.finfo(dtype).bits:
        return None
    info = np.finfo(dtype)
    a = np.abs(X[np.isfinite(X)])
    big = float(a.max(initial=0.0))
    small = float(a.min(initial=np.inf, where=a > 0))
    if big > float(info.max):
        return f"X's largest value, {big:.3g}, is past {dtype}'s largest ({float(info.max):.3g})"
    if small < float(info.tiny):
        return f"X's smallest non-zero value, {small:.3g}, is below {dtype}'s smallest normal number " \
               f"({float(info.tiny):.3g})"
    return None


def _working_dtype(X: np.ndarray, requested: str | None) -> np.dtype:
    """The precision MU runs in: --dtype, else float32 for float input that float32 holds and
    float64 otherwise (integers, bools, and float64 values out of float32's range)."""
    if requested is not None:
        dtype = np.dtype(requested)
        why = _out_of_range(X, dtype)
        if why is not None:  # the cast would turn them into inf or 0, and the run would factorise those
            raise ValueError(f"{why}: --dtype {requested} cannot hold X; use --dtype float64")
        return dtype
    if X.dtype.kind == "f" and _out_of_range(X, np.dtype(np.float32)) is None:
        return np.dtype(np.float32)
    if X.dtype.kind == "f":
        print(f"running in float64: {_out_of_range(X, np.dtype(np.float32))} (--dtype chooses)")
    return np.dtype(np.float64)


def run(args: argparse.Namespace) -> int:
    from fastmu import metrics
    import fastmu

    _check_options(args)
    if args.backend == "cuda":  # before any work, in the command's words (the solver's name backend='cpu')
        from fastmu.dispatch import cuda_available

        if not cuda_available():
            raise RuntimeError("--backend cuda: no CUDA GPU is visible to Numba here; use --backend cpu (or "
                               "auto), or install fastmu[cuda12] or fastmu[cuda13] on a machine with a GPU")
    out_path = _out_path(args.out)
    for option, given in (("input", args.input), ("--truth", args.truth)):
        if given is not None and Path(given).resolve() == out_path.resolve():
            raise ValueError(f"--out {out_path} is the {option} file itself; the results would replace it: "
                             "give another name")
    figure = _checks.figure_path(args.figure) if args.figure is not None else None
    truth: tuple[np.ndarray, np.ndarray] | None = None
    if args.demo:
        X, A_true, S_true, grid = _demo_scene(args.seed)
        truth = (A_true, S_true)
        n = DEMO_COMPONENTS
        layout = "mt"
        print(f"demo scene: Chandra-like spectra (65 channels × 4) × procedural remnant maps {grid[0]}×{grid[1]}, 60 dB")
    else:
        X, layout, grid = _to_problems(_load_array(args.input, args.key), args.layout)
        if args.n_components is None:
            raise ValueError("-n/--n-components is required for a file input")
        n = args.n_components
        if args.truth is not None:
            keys = args.truth_keys or ("A", "S")
            kw = dict(key_option="--truth-keys A_KEY S_KEY", key_given=args.truth_keys is not None,
                      option="--truth")
            truth = _check_truth(_load_array(args.truth, keys[0], **kw), _load_array(args.truth, keys[1], **kw),
                                 X.shape, n, grid)
    if figure is not None and np.ndim(X) == 3:
        raise ValueError(f"--figure draws one problem; X holds {np.shape(X)[0]} (shape {np.shape(X)})")

    X = np.asarray(X)
    dtype = _working_dtype(X, args.dtype)
    if X.dtype.kind in "fiub":  # others (complex, ...) go to MU as they are, which says what is wrong
        X = X.astype(dtype, copy=False)
    scale: Any = 1.0
    if args.normalise:  # MU is scale-free; divided by its mean, X meets eps at a scale of 1
        with np.errstate(over="ignore", invalid="ignore"):  # an inf or NaN X: MU says what is wrong
            mean = X.mean(axis=(-2, -1), keepdims=True, dtype=np.float64)
        scale = np.where(np.isfinite(mean) & (mean > 0), mean, 1.0).astype(dtype)
    t0 = time.perf_counter()
    A, S, n_iter = fastmu.mu(  # n_iter: fewer than --iters when --tol stops early
        X / scale if args.normalise else X, n, n_iter=args.iters, tol=args.tol, init=args.init,
        random_state=args.seed, backend=args.backend, progress=not args.no_progress, return_n_iter=True,
        l1_A=args.l1_A, l2_A=args.l2_A, l1_S=args.l1_S, l2_S=args.l2_S,
    )
    seconds = time.perf_counter() - t0
    A, S = np.asarray(A) * scale, np.asarray(S)
    X64 = X.astype(np.float64)  # float32 norms of a large X overflow
    with np.errstate(over="ignore", invalid="ignore"):  # (X's largest entry as the unit, for float64 too)
        unit = float(np.abs(X64).max(initial=0.0))
        unit = unit if np.isfinite(unit) and unit > 0 else 1.0
        R = (X64 - A.astype(np.float64) @ S) / unit
    rel = float(np.linalg.norm(R) / max(np.linalg.norm(X64 / unit), 1e-300))
    early = f" (stopped early by --tol; --iters {args.iters})" if n_iter < args.iters else ""
    print(f"{n_iter} iterations{early} in {seconds:.2f} s (includes kernel load/compile); "
          f"relative residual {rel:.3e}")

    out: dict[str, Any] = {"A": A, "S": S, "residual": rel, "seconds": seconds, "n_iter": n_iter}
    if truth is not None:
        A_t, S_t = truth
        S_t = S_t.reshape(S.shape)  # maps (n, h, w) to rows (n, h·w); _check_truth allowed only that
        sc = metrics.evaluate(A, S, A_t, S_t)
        # save in the true order, in the run's precision (apply_permutation returns float64)
        A, S = metrics.apply_permutation(A, S, sc.perm)
        out.update({"A": A.astype(dtype), "S": S.astype(dtype), "perm": sc.perm})
        summary = sc.summary()
        out.update({f"score_{k}": v for k, v in summary.items()})
        print("scores against the truth (components matched by the Hungarian method):")
        print(f"  mean cosine (paper's 'SAD')  A {summary['cos_A']:.5f}   S {summary['cos_S']:.5f}")
        print(f"  spectral angle (degrees)     A {summary['angle_A_deg']:.3f}   S {summary['angle_S_deg']:.3f}")
        print(f"  NMSE (dB)                    A {summary['nmse_A_db']:.2f}   S {summary['nmse_S_db']:.2f}")
    if layout in ("hwm", "mhw") or args.demo:
        out["S_maps"] = out["S"].reshape(n, *grid)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **out)
    print(f"saved {out_path}")
    if figure is not None:
        _figure(figure, out["A"], out["S"], grid if len(grid) == 2 else None, truth)
        print(f"saved {figure}")
    return 0


def _check_truth(A_t: Any, S_t: Any, x_shape: tuple[int, ...], n: int,
                 grid: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The true factors as float64, checked against X's problems before any work is done."""
    batch, m, t = x_shape[:-2], x_shape[-2], x_shape[-1]
    A_t, S_t = np.asarray(A_t), np.asarray(S_t)
    want_A, want_S = (*batch, m, n), (*batch, n, t)
    maps = (*batch, n, *grid) if len(grid) == 2 else None
    if A_t.shape != want_A:
        raise ValueError(f"the truth's A has shape {A_t.shape}; X and -n {n} need {want_A}")
    if S_t.shape != want_S and S_t.shape != maps:
        also = f" or maps {maps}" if maps is not None else ""
        raise ValueError(f"the truth's S has shape {S_t.shape}; X and -n {n} need {want_S}{also}")
    for name, v in (("A", A_t), ("S", S_t)):
        if v.dtype.kind not in "iuf":
            raise ValueError(f"the truth's {name} has dtype {v.dtype}; it must be real numbers")
        if not np.isfinite(v).all():
            raise ValueError(f"the truth's {name} contains NaN or infinite values")
    return A_t.astype(np.float64), S_t.astype(np.float64)


def _figure(path: Path, A: np.ndarray, S: np.ndarray, grid: tuple[int, int] | None, truth: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if A.ndim != 2:
        raise ValueError("--figure draws one problem (2-D X)")
    n = A.shape[1]
    rows = 2 if grid is not None else 1
    fig, axes = plt.subplots(rows, n, figsize=(3.2 * n, 3.0 * rows), squeeze=False)
    for k in range(n):
        ax = axes[0, k]
        scale = np.linalg.norm(A[:, k]) or 1.0
        ax.plot(A[:, k] / scale, label="fastmu")
        if truth is not None:
            At = np.asarray(truth[0])[:, k]
            ax.plot(At / (np.linalg.norm(At) or 1.0), "--", label="truth")
        ax.set_title(f"component {k}: spectrum")
        ax.set_xlabel("channel")
        if k == 0:
            ax.legend()
        if grid is not None:
            axes[1, k].imshow(S[k].reshape(grid), cmap="magma")
            axes[1, k].set_title(f"component {k}: map")
            axes[1, k].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, format=path.suffix[1:].lower())  # figure_path checked the suffix
    plt.close(fig)
