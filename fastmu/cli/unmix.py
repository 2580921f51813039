"""``fastmu unmix``: factorise a matrix or cube from a file (or a built-in demo scene)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

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
            "or .npz file (or builds a demo scene), writes A, S and, given the truth, the "
            "separation scores to an .npz file."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="layouts:\n" + "\n".join(f"  {k:<4} {v}" for k, v in LAYOUTS.items()),
    )
    p.add_argument("input", nargs="?", type=Path, help=".npy or .npz file holding X")
    p.add_argument("--demo", action="store_true",
                   help="unmix a built-in scene: generated Chandra-like spectra × a procedural supernova remnant, 60 dB")
    p.add_argument("--key", default=None, help="array name inside an .npz (default: X, or the only array)")
    p.add_argument("--layout", choices=tuple(LAYOUTS), default=None,
                   help="how X is laid out (default: mt for 2-D, bmt for 3-D)")
    p.add_argument("-n", "--n-components", type=int, default=None, help="rank (default 4 for --demo)")
    p.add_argument("--iters", type=int, default=1000, help="MU iterations (default 1000)")
    p.add_argument("--tol", type=float, default=None, help="stop early at this relative decrease")
    p.add_argument("--init", choices=("random", "nndsvda"), default="random")
    p.add_argument("--seed", type=int, default=0, help="seed of the random start (and the demo scene)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--normalise", action="store_true",
                   help="divide each problem's X by its mean before MU and scale A back (MU is scale-free): "
                        "for data whose values are so small that eps=1e-12 matters, e.g. fluxes")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda", "torch"), default="auto")
    p.add_argument("--truth", type=Path, default=None, help=".npz with the true factors, to score the result")
    p.add_argument("--truth-keys", nargs=2, default=("A", "S"), metavar=("A_KEY", "S_KEY"))
    p.add_argument("--out", type=Path, default=Path("fastmu-unmix.npz"), help="output .npz (default fastmu-unmix.npz)")
    p.add_argument("--figure", type=Path, default=None, help="also draw spectra and maps to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, scale_hint="Here: --normalise does that.")


def _load_array(path: Path, key: str | None) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    from fastmu.data.io import read_array

    if path.suffix.lower() not in (".npy", ".npz"):
        raise ValueError(f"{path}: expected a .npy or .npz file")

    def choose(names: list[str]) -> str:
        k = key if key is not None else ("X" if "X" in names else (names[0] if len(names) == 1 else None))
        if k is None or k not in names:
            raise ValueError(f"{path} holds {names}; name the array with --key")
        return k

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


def _demo_scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    from fastmu import data

    A = data.spectra(1, seed=seed)[0]  # (65, 4)
    maps = data.remnant(128, seed=seed)  # (4, 128, 128)
    S = maps.reshape(4, -1)
    import torch

    X = data.mix(A[None], S[None], 60.0, seeds=[seed], dtype=torch.float64)[0][0]
    # Gaussian noise makes a few dark pixels slightly negative; MU needs X >= 0.
    return np.maximum(X.numpy(), 0.0), A, S, maps.shape[1:]


def run(args: argparse.Namespace) -> int:
    import fastmu
    from fastmu import metrics

    truth: tuple[np.ndarray, np.ndarray] | None = None
    if args.demo:
        if args.input is not None:
            raise ValueError("give an input file or --demo, not both")
        X, A_true, S_true, grid = _demo_scene(args.seed)
        truth = (A_true, S_true)
        n = args.n_components or 4
        layout = "mt"
        print(f"demo scene: Chandra-like spectra (65 channels × 4) × procedural remnant maps {grid[0]}×{grid[1]}, 60 dB")
    else:
        if args.input is None:
            raise ValueError("give an input .npy/.npz file, or --demo")
        X, layout, grid = _to_problems(_load_array(args.input, args.key), args.layout)
        if args.n_components is None:
            raise ValueError("-n/--n-components is required for a file input")
        n = args.n_components
        if args.truth is not None:
            truth = _check_truth(_load_array(args.truth, args.truth_keys[0]),
                                 _load_array(args.truth, args.truth_keys[1]), X.shape, n, grid)
    if args.iters < 0:
        raise ValueError("--iters must be >= 0")
    if args.figure is not None and np.ndim(X) == 3:
        raise ValueError(f"--figure draws one problem; X holds {np.shape(X)[0]} (shape {np.shape(X)})")
    # np.savez adds .npz to a name without it: say the name it writes
    out_path = args.out if args.out.suffix == ".npz" else args.out.with_name(args.out.name + ".npz")

    X = np.asarray(X)
    if X.dtype.kind == "f":
        X = X.astype(args.dtype)
    scale: Any = 1.0
    if args.normalise:  # MU is scale-free; divided by its mean, X meets eps at a scale of 1
        mean = X.mean(axis=(-2, -1), keepdims=True, dtype=np.float64)
        scale = np.where(mean > 0, mean, 1.0).astype(X.dtype if X.dtype.kind == "f" else np.float64)
    t0 = time.perf_counter()
    A, S = fastmu.mu(
        X / scale if args.normalise else X, n, n_iter=args.iters, tol=args.tol, init=args.init,
        random_state=args.seed, backend=args.backend, progress=not args.no_progress,
    )
    seconds = time.perf_counter() - t0
    A, S = np.asarray(A) * scale, np.asarray(S)
    X64 = X.astype(np.float64)  # float32 norms of a large X overflow
    rel = float(np.linalg.norm(X64 - A.astype(np.float64) @ S) / max(np.linalg.norm(X64), 1e-300))
    print(f"{args.iters} iterations in {seconds:.2f} s (includes kernel load/compile); relative residual {rel:.3e}")

    out: dict[str, Any] = {"A": A, "S": S, "residual": rel, "seconds": seconds}
    if truth is not None:
        A_t, S_t = truth
        S_t = S_t.reshape(S.shape)  # maps (n, h, w) to rows (n, h·w); _check_truth allowed only that
        sc = metrics.evaluate(A, S, A_t, S_t)
        A, S = metrics.apply_permutation(A, S, sc.perm)  # save in the true order
        out.update({"A": A.astype(X.dtype), "S": S.astype(X.dtype), "perm": sc.perm})
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
    if args.figure is not None:
        _figure(args.figure, out["A"], out["S"], grid if len(grid) == 2 else None, truth)
        print(f"saved {args.figure}")
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
    fig.savefig(path, dpi=90)
    plt.close(fig)
