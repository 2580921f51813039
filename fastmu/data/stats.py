"""Realism statistics of a set of mixing matrices.

Used to compare generated spectra with the real Chandra set: the spread of
each family (angle of each column to its family's mean), the overlap between
families (pairwise angles between columns of the same matrix), how well posed
each separation problem is (condition number of A), and where and how wide the
Fe lines are (channel of the peak, FWHM in channels).
"""
from __future__ import annotations

import numpy as np

from fastmu.data.io import validate_spectra
from fastmu.data.spectra import COMPONENTS

__all__ = ["angles_deg", "fwhm_channels", "stats", "format_stats"]


def angles_deg(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle in degrees between vectors along the last axis (broadcasting).

    Parameters
    ----------
    u, v : array_like, shapes broadcastable to (..., m)

    Returns
    -------
    ndarray, shape (...), float64
        NaN where either vector is zero (no angle is defined).
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # zero vectors: NaN, as documented
        cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def fwhm_channels(col: np.ndarray) -> np.ndarray:
    """Full width at half maximum, in channels, of peaked columns ``(n, m)``.

    Linear interpolation between the channels that straddle half the peak, so
    the width is fractional.
    """
    col = np.atleast_2d(np.asarray(col, dtype=np.float64))
    out = np.empty(col.shape[0])
    for i, c in enumerate(col):
        p = int(np.argmax(c))
        h = c[p] / 2.0
        lo = p
        while lo > 0 and c[lo - 1] >= h:
            lo -= 1
        hi = p
        while hi < len(c) - 1 and c[hi + 1] >= h:
            hi += 1
        left = lo - (c[lo] - h) / (c[lo] - c[lo - 1]) if lo > 0 else float(lo)
        right = hi + (c[hi] - h) / (c[hi] - c[hi + 1]) if hi < len(c) - 1 else float(hi)
        out[i] = right - left
    return out


def stats(A: np.ndarray) -> dict[str, float]:
    """Realism statistics of mixing matrices.

    Parameters
    ----------
    A : array_like, shape (n, m, 4) or (m, 4)
        Mixing matrices, columns in the order sync, therm, fe1, fe2: finite,
        non-negative, no all-zero column, n >= 1.  Columns are scaled to unit
        L2 norm first (fastmu's convention) so the family means and condition
        numbers do not depend on the arbitrary scale of each column.

    Returns
    -------
    dict
        ``angle_to_mean_<fam>`` median angle (deg) of a family's columns to the
        family mean; ``pair_<f1>_<f2>`` median angle (deg) between two columns
        of the same matrix; ``cond_median`` median condition number of A;
        ``<fe>_peak_lo`` / ``_peak_med`` / ``_peak_hi`` 1st, 50th and 99th
        percentile of the Fe line's peak channel, and ``<fe>_fwhm_lo`` /
        ``_fwhm_med`` / ``_fwhm_hi`` of its FWHM in channels.
    """
    A = validate_spectra(A, len(COMPONENTS))
    if A.shape[0] == 0:
        raise ValueError(f"A must hold at least one matrix, got shape {A.shape}")
    out: dict[str, float] = {"n": float(A.shape[0]), "m": float(A.shape[1])}
    for k, fam in enumerate(COMPONENTS):
        cols = A[:, :, k]
        out[f"angle_to_mean_{fam}"] = float(np.median(angles_deg(cols, cols.mean(0)[None, :])))
    for i in range(4):
        for j in range(i + 1, 4):
            out[f"pair_{COMPONENTS[i]}_{COMPONENTS[j]}"] = float(
                np.median(angles_deg(A[:, :, i], A[:, :, j]))
            )
    out["cond_median"] = float(np.median(np.linalg.cond(A)))
    for k, fam in ((2, "fe1"), (3, "fe2")):
        peaks = A[:, :, k].argmax(1)
        widths = fwhm_channels(A[:, :, k])
        lo, med, hi = np.percentile(peaks, [1, 50, 99])
        out[f"{fam}_peak_lo"], out[f"{fam}_peak_med"], out[f"{fam}_peak_hi"] = float(lo), float(med), float(hi)
        lo, med, hi = np.percentile(widths, [1, 50, 99])
        out[f"{fam}_fwhm_lo"], out[f"{fam}_fwhm_med"], out[f"{fam}_fwhm_hi"] = float(lo), float(med), float(hi)
    return out


def format_stats(columns: dict[str, dict[str, float]]) -> str:
    """Plain-text table: one row per statistic, one column per named set.

    Parameters
    ----------
    columns : dict of str to dict of str to float
        ``{set name: stats(A)}``; the first set's keys give the rows, and a
        statistic another set lacks prints as ``nan``.

    Returns
    -------
    str
    """
    names = list(columns)
    if not names or not columns[names[0]]:
        raise ValueError(f"columns must map at least one set name to a non-empty stats dict, got {columns!r}")
    keys = list(columns[names[0]])
    w0 = max(len(k) for k in keys)
    header = "statistic".ljust(w0) + "".join(f"  {n:>12}" for n in names)
    lines = [header, "-" * len(header)]
    for k in keys:
        row = k.ljust(w0)
        for n in names:
            v = columns[n].get(k, float("nan"))
            row += f"  {v:12.0f}" if k in ("n", "m") else f"  {v:12.2f}"
        lines.append(row)
    return "\n".join(lines)
