"""Separation metrics: the paper's cosine score, spectral angles, errors, matching.

The paper (eqs. 2-3) calls its score "SAD" although it is the *mean cosine
similarity* between matched components (1 is perfect). To leave no doubt,
fastmu names it :func:`mean_cosine` and reports the hyperspectral-convention
spectral angle in degrees (:func:`spectral_angle_deg`, 0 is perfect) beside it.

Components are columns of A (``(…, m, n)``) and rows of S (``(…, n, t)``).
Every function takes NumPy or torch arrays, batched or not, and returns NumPy
float64 values (one per problem when batched).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "get") and not isinstance(x, np.ndarray):
        x = x.get()
    return np.asarray(x, dtype=np.float64)


def cosine_matrix(X: Any, Y: Any, axis: int) -> np.ndarray:
    """Cosines between every component of X and every component of Y.

    ``axis`` is the axis that runs *along* a component (-2 for columns of A,
    -1 for rows of S). Returns ``(…, n_x, n_y)``. Zero components have cosine 0.
    """
    X, Y = _np(X), _np(Y)
    if axis in (-2, X.ndim - 2):
        X, Y = np.swapaxes(X, -1, -2), np.swapaxes(Y, -1, -2)
    nx = np.linalg.norm(X, axis=-1, keepdims=True)
    ny = np.linalg.norm(Y, axis=-1, keepdims=True)
    Xn = np.divide(X, nx, out=np.zeros_like(X), where=nx > 0)
    Yn = np.divide(Y, ny, out=np.zeros_like(Y), where=ny > 0)
    return Xn @ np.swapaxes(Yn, -1, -2)


def match_components(
    A_est: Any, A_true: Any, S_est: Any | None = None, S_true: Any | None = None
) -> np.ndarray:
    """Hungarian matching of estimated to true components.

    Maximises the sum of cosines of the columns of A (plus those of the rows
    of S when both S are given). Returns ``perm`` with shape ``(…, n)`` such
    that estimated component ``perm[k]`` is matched to true component ``k``:
    ``A_est[..., :, perm]`` is in the true order.
    """
    C = cosine_matrix(A_true, A_est, axis=-2)
    if S_est is not None and S_true is not None:
        C = C + cosine_matrix(S_true, S_est, axis=-1)
    batch = C.shape[:-2]
    flat = C.reshape(-1, *C.shape[-2:])
    perms = np.empty(flat.shape[:2], dtype=np.intp)
    for i, c in enumerate(flat):
        rows, cols = linear_sum_assignment(c, maximize=True)
        perms[i, rows] = cols
    return perms.reshape(*batch, C.shape[-2])


def apply_permutation(A: Any, S: Any, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder the components of ``A`` (columns) and ``S`` (rows) by ``perm``."""
    A, S = _np(A), _np(S)
    Ap = np.take_along_axis(A, np.broadcast_to(perm[..., None, :], A.shape[:-1] + perm.shape[-1:]), axis=-1)
    Sp = np.take_along_axis(S, np.broadcast_to(perm[..., :, None], perm.shape + S.shape[-1:]), axis=-2)
    return Ap, Sp


def component_cosines(est: Any, true: Any, axis: int) -> np.ndarray:
    """Cosine of each estimated component with the true one in the same position: ``(…, n)``."""
    C = cosine_matrix(est, true, axis=axis)
    return np.diagonal(C, axis1=-2, axis2=-1)


def mean_cosine(est: Any, true: Any, axis: int = -2) -> np.ndarray:
    """The paper's "SAD" score: mean cosine similarity of same-position components (1 is perfect).

    ``axis=-2`` for mixing matrices (columns), ``axis=-1`` for sources (rows).
    Match first (:func:`match_components`) when the order is not known.
    """
    return component_cosines(est, true, axis).mean(axis=-1)


def spectral_angle_deg(est: Any, true: Any, axis: int = -2) -> np.ndarray:
    """Mean spectral angle in degrees between same-position components (0 is perfect)."""
    c = np.clip(component_cosines(est, true, axis), -1.0, 1.0)
    return np.degrees(np.arccos(c)).mean(axis=-1)


def rmse(est: Any, true: Any) -> np.ndarray:
    """Root-mean-square error over the last two axes."""
    d = _np(est) - _np(true)
    return np.sqrt(np.mean(d * d, axis=(-2, -1)))


def nmse(est: Any, true: Any) -> np.ndarray:
    """Normalised squared error ``‖est − true‖² / ‖true‖²`` over the last two axes."""
    e, t = _np(est), _np(true)
    num = np.sum((e - t) ** 2, axis=(-2, -1))
    den = np.sum(t * t, axis=(-2, -1))
    return np.divide(num, den, out=np.full_like(num, np.inf), where=den > 0)


def nmse_db(est: Any, true: Any) -> np.ndarray:
    """:func:`nmse` in decibels (lower is better)."""
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(nmse(est, true))


@dataclass
class Scores:
    """Per-problem separation scores after matching (arrays of shape (b,), or scalars)."""

    cos_A: np.ndarray
    cos_S: np.ndarray
    angle_A_deg: np.ndarray
    angle_S_deg: np.ndarray
    rmse_A: np.ndarray
    rmse_S: np.ndarray
    nmse_A_db: np.ndarray
    nmse_S_db: np.ndarray
    perm: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float]:
        """Means over the batch (plain floats, JSON-ready)."""
        return {k: float(np.mean(v)) for k, v in self.__dict__.items() if k != "perm"}


def evaluate(A_est: Any, S_est: Any, A_true: Any, S_true: Any, match: bool = True) -> Scores:
    """Score estimated factors against the truth.

    With ``match`` the components are first put in the true order by
    :func:`match_components` (for solvers whose output order is arbitrary);
    without it the order is taken as given (the learned models output the
    components in training order). Sources are compared after scaling each
    estimated row by the norm ratio of its matched column of A, so that the
    scale ambiguity ``A D, D⁻¹ S`` does not count as error in RMSE/NMSE.
    """
    A_est, S_est, A_true, S_true = _np(A_est), _np(S_est), _np(A_true), _np(S_true)
    if A_est.shape != A_true.shape or S_est.shape != S_true.shape:
        raise ValueError(
            f"estimated shapes {A_est.shape}, {S_est.shape} differ from true {A_true.shape}, {S_true.shape}"
        )
    n = A_est.shape[-1]
    perm = match_components(A_est, A_true, S_est, S_true) if match else np.broadcast_to(
        np.arange(n), A_est.shape[:-2] + (n,)
    ).copy()
    A_m, S_m = apply_permutation(A_est, S_est, perm)
    # Fix the scale ambiguity column by column: A_k ← A_k·c_k, S_k ← S_k/c_k,
    # with c_k making the column norms equal to the truth's.
    na = np.linalg.norm(A_m, axis=-2)
    nt = np.linalg.norm(A_true, axis=-2)
    c = np.divide(nt, na, out=np.ones_like(na), where=na > 0)
    A_s = A_m * c[..., None, :]
    S_s = S_m / c[..., :, None]
    return Scores(
        cos_A=mean_cosine(A_m, A_true, axis=-2),
        cos_S=mean_cosine(S_m, S_true, axis=-1),
        angle_A_deg=spectral_angle_deg(A_m, A_true, axis=-2),
        angle_S_deg=spectral_angle_deg(S_m, S_true, axis=-1),
        rmse_A=rmse(A_s, A_true),
        rmse_S=rmse(S_s, S_true),
        nmse_A_db=nmse_db(A_s, A_true),
        nmse_S_db=nmse_db(S_s, S_true),
        perm=perm,
    )
