"""Loaders and validation for user-supplied spectra and source maps.

Files are ``.npz`` (a key is chosen, by default ``A`` for spectra and ``S``
for maps) or ``.npy``.  The real Cas A maps and Chandra spectra in the shared
reference folder are files of exactly this kind.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = [
    "shared_data_dir",
    "validate_spectra",
    "validate_maps",
    "load_spectra",
    "load_maps",
    "resample_maps",
    "normalise_maps",
]

#: environment variable naming the reference-data folder
SHARED_DATA_ENV = "FASTMU_SHARED_DATA"


def shared_data_dir() -> Path | None:
    """The reference-data folder, or None when it is absent.

    ``$FASTMU_SHARED_DATA`` if set, else ``../shared/data`` next to the
    repository root (a source checkout), else ``./../shared/data`` from the
    working directory.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    cands = [Path(env)] if env else []
    cands += [
        Path(__file__).resolve().parents[2].parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
    ]
    for c in cands:
        if c.is_dir():
            return c
    return None


#: the first bytes of a .npy file and of a .npz (a zip archive)
_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}


def read_array(path: Path, choose: Callable[[list[str]], str]) -> np.ndarray:
    """The array of a ``.npy`` file, or the member ``choose(names)`` of a ``.npz``.

    ``np.load(allow_pickle=False)`` reads a file that is not in NumPy's format
    as pickled data and says so ("This file contains pickled (object)
    data"), which misleads; here the header is checked first, and a damaged
    file or an object array is a ``ValueError`` that says what is wrong.

    Parameters
    ----------
    path : Path
        An existing ``.npy`` or ``.npz`` file.
    choose : callable
        Given a ``.npz``'s member names, the one to read (or raise).

    Returns
    -------
    ndarray
    """
    suffix = path.suffix.lower()
    if suffix not in _MAGIC:
        raise ValueError(f"{path.name}: unsupported file type {suffix!r}; use .npz or .npy")
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith(_MAGIC[suffix]):
        raise ValueError(f"{path} is not a NumPy {suffix} file (it does not start with NumPy's {suffix} header)")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        z = np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None
    with z:
        k = choose(list(z.files))
        try:
            return z[k]
        except _UNREADABLE as exc:
            raise _unreadable(path, exc) from None


#: what NumPy raises on a truncated or damaged file, or an object array
_UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _unreadable(path: Path, exc: Exception) -> ValueError:
    if "allow_pickle" in str(exc) or "pickled" in str(exc):  # fastmu reads arrays of numbers only
        return ValueError(f"{path} holds an object array; fastmu reads arrays of numbers")
    return ValueError(f"{path} could not be read ({type(exc).__name__}: {exc})")


def _load_array(path, key: str | None, default_key: str) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")

    def choose(names: list[str]) -> str:
        k = key or default_key
        if k not in names:
            if key is None and len(names) == 1:
                return names[0]
            raise ValueError(f"{path.name}: no array {k!r} (keys: {', '.join(names)}); pass key=")
        return k

    return read_array(path, choose)


def _check_values(x: np.ndarray, what: str) -> None:
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"{what} must be real numbers, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains non-finite values (NaN or inf)")
    if np.any(x < 0):
        raise ValueError(f"{what} contains negative values (min {x.min():.3g}); they must be non-negative")


def validate_spectra(A, n_components: int = 4) -> np.ndarray:
    """Check and return spectra as float64 ``(n, m, n_components)``.

    A single matrix ``(m, n_components)`` is promoted to ``(1, m, n_components)``.
    Columns are rescaled to unit L2 norm.

    Parameters
    ----------
    A : array_like, shape (n, m, n_components) or (m, n_components)
        Non-negative, finite, no all-zero column, at least ``n_components`` channels.
    n_components : int, default 4

    Returns
    -------
    ndarray, shape (n, m, n_components), float64

    Raises
    ------
    TypeError
        Non-numeric array.
    ValueError
        Wrong rank or number of components, non-finite or negative values, an
        all-zero column.
    """
    A = np.asarray(A)
    _check_values(A, "spectra")
    given = A.shape  # the messages name the shape the caller passed, before the promotion
    if A.ndim == 2:
        A = A[None]
    if A.ndim != 3:
        raise ValueError(f"spectra must have shape (n, m, {n_components}) or (m, {n_components}), got {given}")
    if A.shape[2] != n_components:
        raise ValueError(f"spectra must have {n_components} components (last axis), got shape {given}")
    if A.shape[1] < n_components:
        raise ValueError(f"spectra need at least {n_components} channels, got shape {given}")
    if A.shape[0] == 0:
        raise ValueError(f"spectra must hold at least one matrix, got shape {given}")
    A = A.astype(np.float64)
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("spectra contain an all-zero column")
    return A / norms


def validate_maps(S, n_components: int = 4) -> np.ndarray:
    """Check and return source maps as float64 ``(n_sets, n_components, h, w)``.

    One set ``(n_components, h, w)`` is promoted to ``(1, n_components, h, w)``.

    Parameters
    ----------
    S : array_like, shape (n_sets, n_components, h, w) or (n_components, h, w)
        Non-negative and finite, at least 2 × 2 pixels.
    n_components : int, default 4

    Returns
    -------
    ndarray, shape (n_sets, n_components, h, w), float64

    Raises
    ------
    TypeError
        Non-numeric array.
    ValueError
        Wrong rank or number of components, non-finite or negative values.
    """
    S = np.asarray(S)
    _check_values(S, "maps")
    if S.ndim == 3:
        S = S[None]
    if S.ndim != 4:
        raise ValueError(
            f"maps must have shape ({n_components}, h, w) or (n, {n_components}, h, w), got rank {S.ndim} {S.shape}"
        )
    if S.shape[1] != n_components:
        raise ValueError(f"maps must have {n_components} components (axis 1), got shape {S.shape}")
    if min(S.shape[2:]) < 2:
        raise ValueError(f"maps must be at least 2x2 pixels, got shape {S.shape}")
    return S.astype(np.float64)


def normalise_maps(S: np.ndarray, how: str = "max") -> np.ndarray:
    """Scale each map to ``max`` 1 (default) or unit ``sum``; all-zero maps stay zero.

    Parameters
    ----------
    S : array_like, shape (..., h, w)
    how : {"max", "sum"}, default "max"

    Returns
    -------
    ndarray, shape (..., h, w), float64
    """
    S = np.asarray(S, dtype=np.float64)
    if how == "max":
        d = S.max(axis=(-2, -1), keepdims=True)
    elif how == "sum":
        d = S.sum(axis=(-2, -1), keepdims=True)
    else:
        raise ValueError(f"how must be 'max' or 'sum', got {how!r}")
    return np.divide(S, d, out=np.zeros_like(S), where=d > 0)


def resample_maps(S: np.ndarray, size) -> np.ndarray:
    """Resize maps with anti-aliasing (scikit-image), clipped at 0.

    Parameters
    ----------
    S : array_like, shape (..., h, w)
    size : int or (int, int)
        The new ``(h, w)``; an int for a square.

    Returns
    -------
    ndarray, shape (..., size_h, size_w), float64
        A copy when the size is already right.
    """
    from fastmu.data.sources import _check_size

    h, w = _check_size(size)
    S = np.asarray(S, dtype=np.float64)
    if S.shape[-2:] == (h, w):
        return S.copy()
    try:
        from skimage.transform import resize
    except ImportError as exc:  # pragma: no cover
        raise ImportError("resampling maps needs scikit-image (pip install scikit-image, or fastmu's data extra)") from exc
    out = resize(S, S.shape[:-2] + (h, w), anti_aliasing=True, preserve_range=True)
    return np.clip(out, 0.0, None)  # interpolation may undershoot zero by rounding


def load_spectra(path, *, key: str | None = None, n_components: int = 4) -> np.ndarray:
    """Load and validate spectra ``(n, m, n_components)`` from a ``.npz``/``.npy`` file.

    Parameters
    ----------
    path : str or Path
        ``.npz`` (key ``A`` unless ``key`` is given) or ``.npy``.
    key : str, optional
        Array name inside a ``.npz``.
    n_components : int, default 4
        Components (last axis) the file must hold.

    Returns
    -------
    ndarray, float64, unit-norm columns.
    """
    return validate_spectra(_load_array(path, key, "A"), n_components)


def load_maps(path, *, key: str | None = None, size=None, normalise: str | None = "max",
              n_components: int = 4) -> np.ndarray:
    """Load, validate, resample and normalise source maps.

    Parameters
    ----------
    path : str or Path
        ``.npz`` (key ``S`` unless ``key`` is given) or ``.npy``; shape
        ``(n_components, h, w)`` or ``(n, n_components, h, w)``.
    key : str, optional
        Array name inside a ``.npz``.
    size : int or (int, int), optional
        Working size; maps are resized with anti-aliasing.
    normalise : {"max", "sum", None}
        Per-map scaling after resampling (fastmu's convention: max 1).
    n_components : int, default 4
        Components (axis 1, or 0 for one set) the file must hold.

    Returns
    -------
    ndarray, shape (n, n_components, h, w), float64.
    """
    S = validate_maps(_load_array(path, key, "S"), n_components)
    if size is not None:
        S = resample_maps(S, size)
    if normalise is not None:
        S = normalise_maps(S, normalise)
    return S
