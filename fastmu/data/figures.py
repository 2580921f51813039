"""Preview figures in the style of the paper's Fig. 1 (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastmu.data.spectra import COMPONENTS

__all__ = ["plot_spectra_fan", "plot_maps"]

_LABELS = {"sync": "synchrotron", "therm": "thermal", "fe1": "Fe line 1 (red)", "fe2": "Fe line 2 (blue)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra_fan(sets: dict[str, np.ndarray], path, *, max_lines: int = 150) -> Path:
    """One row per named set of spectra ``(n, m, 4)``, one panel per family: a fan of spectra.

    Returns the path written.
    """
    plt = _plt()
    fig, axes = plt.subplots(len(sets), 4, figsize=(14, 2.8 * len(sets)), squeeze=False, sharex=True)
    for r, (name, A) in enumerate(sets.items()):
        A = np.asarray(A)
        sel = A[: max_lines]
        for k, fam in enumerate(COMPONENTS):
            ax = axes[r, k]
            ax.plot(sel[:, :, k].T, color=f"C{k}", alpha=0.12, lw=0.8)
            ax.plot(A[:, :, k].mean(0), color="k", lw=1.5, label="mean")
            ax.set_title(f"{name}: {_LABELS[fam]}", fontsize=9)
            if r == len(sets) - 1:
                ax.set_xlabel("channel")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_maps(rows: dict[str, np.ndarray], path) -> Path:
    """One row per named stack of maps ``(k, h, w)``; each map shown with its own scale."""
    plt = _plt()
    ncol = max(np.asarray(v).shape[0] for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.2 * ncol, 2.3 * len(rows)), squeeze=False)
    for r, (name, maps) in enumerate(rows.items()):
        maps = np.asarray(maps)
        for c in range(ncol):
            ax = axes[r, c]
            ax.axis("off")
            if c < maps.shape[0]:
                ax.imshow(maps[c], cmap="inferno")
                ax.set_title(f"{name} {c}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
