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

__all__ = [
    "Scores",
    "apply_permutation",
    "component_cosines",
    "cosine_matrix",
    "evaluate",
    "match_components",
    "mean_cosine",
    "nmse",
    "nmse_db",
    "rmse",
    "spectral_angle_deg",
]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_complex():
            raise TypeError(f"the scores compare real factors, got a {x.dtype} tensor")
        x = x.double().numpy()  # via torch: NumPy has no bfloat16
    elif hasattr(x, "get") and not isinstance(x, np.ndarray):
        x = x.get()
    x = np.asarray(x)
    if x.dtype.kind == "c":  # NumPy would drop the imaginary parts with a warning
        raise TypeError(f"the scores compare real factors, got dtype {x.dtype}")
    return x.astype(np.float64, copy=False)


def _norm(x: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """Euclidean norm over ``axis`` without overflow or underflow: each slice is divided by its
    largest magnitude first (float64 squares overflow from ~1e154 and vanish below ~1e-162)."""
    s = np.max(np.abs(x), axis=axis, keepdims=True, initial=0.0)
    xs = np.divide(x, s, out=np.zeros_like(x), where=s > 0)
    return np.sqrt(np.sum(xs * xs, axis=axis)) * np.squeeze(s, axis=axis)


def _finite(**arrays: np.ndarray) -> None:
    """NaN or inf would give NaN scores, or a cosine of 0 that looks like a real one."""
    for name, x in arrays.items():
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def _component_axis(axis: int, ndim: int) -> int:
    """``axis`` as -2 (columns of A) or -1 (rows of S); anything else is refused."""
    if ndim < 2:
        raise ValueError(f"factors must have at least 2 dimensions, got {ndim}")
    if axis in (-2, ndim - 2):
        return -2
    if axis in (-1, ndim - 1):
        return -1
    raise ValueError(f"axis must be -2 (columns of A) or -1 (rows of S), got {axis}")


def _same_shape(est: np.ndarray, true: np.ndarray) -> None:
    """The factors' own axes must agree; batch axes may broadcast (a batch against one truth)."""
    try:
        np.broadcast_shapes(est.shape[:-2], true.shape[:-2])
    except ValueError:
        raise ValueError(f"estimate has shape {est.shape} but the truth has shape {true.shape}") from None
    if est.shape[-2:] != true.shape[-2:]:
        raise ValueError(f"estimate has shape {est.shape} but the truth has shape {true.shape}")


def cosine_matrix(X: Any, Y: Any, axis: int) -> np.ndarray:
    """Cosines between every component of X and every component of Y.

    Parameters
    ----------
    X, Y : array_like, shape (…, m, n_x) and (…, m, n_y) for ``axis=-2``, or (…, n_x, t) and (…, n_y, t) for ``axis=-1``
        NumPy, torch or CuPy arrays; batch axes broadcast.
    axis : {-2, -1}
        The axis that runs *along* a component: -2 for columns of A, -1 for
        rows of S.

    Returns
    -------
    ndarray, shape (…, n_x, n_y), float64
        Zero components have cosine 0.
    """
    X, Y = _np(X), _np(Y)
    if _component_axis(axis, X.ndim) == -2:
        X, Y = np.swapaxes(X, -1, -2), np.swapaxes(Y, -1, -2)
    if X.shape[-1] != Y.shape[-1]:
        raise ValueError(f"components of X have length {X.shape[-1]} but those of Y have length {Y.shape[-1]}")
    _finite(X=X, Y=Y)

    def unit(Z: np.ndarray) -> np.ndarray:
        nz = _norm(Z, -1)[..., None]  # scaled: no square under- or overflows
        return np.divide(Z, nz, out=np.zeros_like(Z), where=nz > 0)

    return unit(X) @ np.swapaxes(unit(Y), -1, -2)


def match_components(
    A_est: Any, A_true: Any, S_est: Any | None = None, S_true: Any | None = None
) -> np.ndarray:
    """Hungarian matching of estimated to true components.

    Maximises the sum of cosines of the columns of A (plus those of the rows
    of S when both S are given).

    Parameters
    ----------
    A_est, A_true : array_like, shape (…, m, n_est) and (…, m, n)
        ``n_est >= n``: extra estimated components are left unmatched.
    S_est, S_true : array_like, shape (…, n_est, t) and (…, n, t), optional
        Used only when both are given.

    Returns
    -------
    perm : ndarray of intp, shape (…, n)
        Estimated component ``perm[k]`` is matched to true component ``k``:
        ``A_est[..., :, perm]`` is in the true order.
    """
    A_est, A_true = _np(A_est), _np(A_true)
    _finite(A_est=A_est, A_true=A_true)
    if A_est.ndim >= 2 and A_true.ndim >= 2 and A_est.shape[-1] < A_true.shape[-1]:
        raise ValueError(f"A_est has {A_est.shape[-1]} components, fewer than the truth's "
                         f"{A_true.shape[-1]}: every true component needs an estimated one")
    C = cosine_matrix(A_true, A_est, axis=-2)
    if S_est is not None and S_true is not None:
        S_est, S_true = _np(S_est), _np(S_true)
        _finite(S_est=S_est, S_true=S_true)
        C = C + cosine_matrix(S_true, S_est, axis=-1)
    batch = C.shape[:-2]
    flat = C.reshape(-1, *C.shape[-2:])
    perms = np.empty(flat.shape[:2], dtype=np.intp)
    for i, c in enumerate(flat):
        rows, cols = linear_sum_assignment(c, maximize=True)
        perms[i, rows] = cols
    return perms.reshape(*batch, C.shape[-2])


def apply_permutation(A: Any, S: Any, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder the components of ``A`` (columns) and ``S`` (rows) by ``perm``.

    Parameters
    ----------
    A : array_like, shape (…, m, n)
    S : array_like, shape (…, n, t)
    perm : ndarray of int, shape (…, k), k <= n
        As returned by :func:`match_components`: distinct component indices.

    Returns
    -------
    A_perm, S_perm : ndarray, float64
        ``A[..., :, perm]`` and ``S[..., perm, :]``, per problem.
    """
    A, S = _np(A), _np(S)
    perm = np.asarray(perm)
    n = A.shape[-1]
    ok = perm.dtype.kind in "iu" and perm.ndim >= 1 and 0 < perm.shape[-1] <= n
    if ok:
        srt = np.sort(perm, axis=-1)
        ok = bool((srt >= 0).all() and (srt < n).all() and (np.diff(srt, axis=-1) > 0).all())
    if not ok:  # match_components may leave extra estimated components out: distinct, not all
        raise ValueError(f"perm must pick distinct components of 0..{n - 1} per problem, got "
                         f"{np.array2string(perm, threshold=8)}")
    Ap = np.take_along_axis(A, np.broadcast_to(perm[..., None, :], A.shape[:-1] + perm.shape[-1:]), axis=-1)
    Sp = np.take_along_axis(S, np.broadcast_to(perm[..., :, None], perm.shape + S.shape[-1:]), axis=-2)
    return Ap, Sp


def component_cosines(est: Any, true: Any, axis: int) -> np.ndarray:
    """Cosine of each estimated component with the true one in the same position.

    Parameters
    ----------
    est, true : array_like, same shape
        Mixing matrices ``(…, m, n)`` with ``axis=-2``, sources ``(…, n, t)``
        with ``axis=-1``.
    axis : {-2, -1}
        The axis that runs along a component.

    Returns
    -------
    ndarray, shape (…, n), float64
    """
    est, true = _np(est), _np(true)
    _same_shape(est, true)
    _finite(est=est, true=true)  # a NaN component would score a plausible-looking cosine of 0
    C = cosine_matrix(est, true, axis=axis)
    return np.diagonal(C, axis1=-2, axis2=-1)


def mean_cosine(est: Any, true: Any, axis: int = -2) -> np.ndarray:
    """The paper's "SAD" score: mean cosine similarity of same-position components (1 is perfect).

    Match first (:func:`match_components`) when the order is not known.

    Parameters
    ----------
    est, true : array_like, same shape
        Mixing matrices ``(…, m, n)`` or sources ``(…, n, t)``.
    axis : {-2, -1}, default -2
        -2 for mixing matrices (components are columns), -1 for sources (rows).

    Returns
    -------
    ndarray, shape (…), float64
        One score per problem (a 0-d array for one problem).

    Examples
    --------
    >>> import numpy as np
    >>> from fastmu.metrics import mean_cosine
    >>> A = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> float(mean_cosine(A, np.array([[1.0, 0.0], [0.0, 2.0]])))
    1.0
    >>> float(mean_cosine(A, np.array([[1.0, 1.0], [0.0, 1.0]])).round(4))
    0.8536
    """
    return component_cosines(est, true, axis).mean(axis=-1)


def spectral_angle_deg(est: Any, true: Any, axis: int = -2) -> np.ndarray:
    """Mean spectral angle in degrees between same-position components (0 is perfect).

    Parameters
    ----------
    est, true : array_like, same shape
    axis : {-2, -1}, default -2
        As in :func:`mean_cosine`.

    Returns
    -------
    ndarray, shape (…), float64
    """
    return _mean_angle_deg(component_cosines(est, true, axis))


def _mean_angle_deg(cosines: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).mean(axis=-1)


def rmse(est: Any, true: Any) -> np.ndarray:
    """Root-mean-square error over the last two axes.

    Parameters
    ----------
    est, true : array_like, same shape (…, p, q)

    Returns
    -------
    ndarray, shape (…), float64
    """
    est, true = _np(est), _np(true)
    _same_shape(est, true)
    _finite(est=est, true=true)
    d = est - true
    return _norm(d, (-2, -1)) / np.sqrt(max(d.shape[-2] * d.shape[-1], 1))


def nmse(est: Any, true: Any) -> np.ndarray:
    """Normalised squared error ``‖est − true‖² / ‖true‖²`` over the last two axes.

    Parameters
    ----------
    est, true : array_like, same shape (…, p, q)

    Returns
    -------
    ndarray, shape (…), float64
        ``inf`` where ``true`` is all zeros.
    """
    e, t = _np(est), _np(true)
    _same_shape(e, t)
    _finite(est=e, true=t)
    num, den = _norm(e - t, (-2, -1)), _norm(t, (-2, -1))
    with np.errstate(over="ignore"):  # a ratio past 1e154 squares to inf, which it is
        return np.divide(num, den, out=np.full_like(num, np.inf), where=den > 0) ** 2


def nmse_db(est: Any, true: Any) -> np.ndarray:
    """:func:`nmse` in decibels (lower is better).

    Parameters
    ----------
    est, true : array_like, same shape (…, p, q)

    Returns
    -------
    ndarray, shape (…), float64
        ``-inf`` for an exact estimate.
    """
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(nmse(est, true))


@dataclass
class Scores:
    """Per-problem separation scores after matching, as returned by :func:`evaluate`.

    Each score is an array of shape ``(b,)`` for a batch, 0-d for one problem.

    Attributes
    ----------
    cos_A, cos_S : ndarray
        Mean cosine of matched components (the paper's "SAD"; 1 is perfect).
    angle_A_deg, angle_S_deg : ndarray
        Mean spectral angle in degrees (0 is perfect).
    rmse_A, rmse_S : ndarray
        Root-mean-square error after the scale of each component is fixed.
    nmse_A_db, nmse_S_db : ndarray
        Normalised squared error in dB, after the same scaling.
    perm : ndarray of intp, shape (…, n)
        The matching used: estimated component ``perm[k]`` is true component ``k``.
    """

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

    Sources are compared after scaling each estimated row by the norm ratio
    of its matched column of A, so that the scale ambiguity ``A D, D⁻¹ S``
    does not count as error in RMSE/NMSE.

    Parameters
    ----------
    A_est, A_true : array_like, shape (m, n) or (b, m, n)
    S_est, S_true : array_like, shape (n, t) or (b, n, t)
        NumPy, torch or CuPy arrays; scores are computed in float64.
    match : bool, default True
        Put the components in the true order first (:func:`match_components`),
        for solvers whose output order is arbitrary. ``False`` takes the order
        as given (the learned models output the components in training order).

    Returns
    -------
    Scores

    Examples
    --------
    >>> import numpy as np
    >>> from fastmu.metrics import evaluate
    >>> rng = np.random.default_rng(0)
    >>> A, S = rng.random((20, 3)), rng.random((3, 50))
    >>> s = evaluate(2 * A[:, ::-1], S[::-1] / 2, A, S)   # permuted and rescaled: still perfect
    >>> round(float(s.cos_A), 6), round(float(s.cos_S), 6), s.perm.tolist()
    (1.0, 1.0, [2, 1, 0])
    >>> float(s.rmse_S) < 1e-12
    True
    """
    A_est, S_est, A_true, S_true = _np(A_est), _np(S_est), _np(A_true), _np(S_true)
    _finite(A_est=A_est, S_est=S_est, A_true=A_true, S_true=S_true)
    if A_est.shape != A_true.shape or S_est.shape != S_true.shape:
        raise ValueError(
            f"estimated shapes {A_est.shape}, {S_est.shape} differ from true {A_true.shape}, {S_true.shape}"
        )
    n = A_est.shape[-1]
    if A_est.ndim < 2 or S_est.ndim < 2 or 0 in A_est.shape[-2:] or S_est.shape[-1] == 0:
        raise ValueError(f"A must be (…, m, n) and S (…, n, t) with m, n, t ≥ 1, got shapes {A_est.shape} "
                         f"and {S_est.shape}")
    if S_est.shape[-2] != n or A_est.shape[:-2] != S_est.shape[:-2]:
        raise ValueError(f"A (…, m, n) and S (…, n, t) must share the batch and n, got shapes {A_est.shape} "
                         f"and {S_est.shape}")
    perm = match_components(A_est, A_true, S_est, S_true) if match else np.broadcast_to(
        np.arange(n), A_est.shape[:-2] + (n,)
    ).copy()
    A_m, S_m = apply_permutation(A_est, S_est, perm)
    # Fix the scale ambiguity column by column: A_k ← A_k·c_k, S_k ← S_k/c_k,
    # with c_k making the column norms equal to the truth's; where either
    # column is zero there is no scale to fix (and 1/0 would give inf).
    na = _norm(A_m, -2)
    nt = _norm(A_true, -2)
    c = np.divide(nt, na, out=np.ones_like(na), where=(na > 0) & (nt > 0))
    A_s = A_m * c[..., None, :]
    S_s = S_m / c[..., :, None]
    # each factor's cosines once, for both its mean cosine and its mean angle
    cA = component_cosines(A_m, A_true, axis=-2)
    cS = component_cosines(S_m, S_true, axis=-1)
    return Scores(
        cos_A=cA.mean(axis=-1),
        cos_S=cS.mean(axis=-1),
        angle_A_deg=_mean_angle_deg(cA),
        angle_S_deg=_mean_angle_deg(cS),
        rmse_A=rmse(A_s, A_true),
        rmse_S=rmse(S_s, S_true),
        nmse_A_db=nmse_db(A_s, A_true),
        nmse_S_db=nmse_db(S_s, S_true),
        perm=perm,
    )
