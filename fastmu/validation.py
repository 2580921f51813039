"""Input validation shared by the solver, the estimator and the learned layers.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError``
(right kind, wrong content) with a message that names the argument. Nothing
is modified in place: conversions return new arrays, and the caller's arrays
are only ever read.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fastmu.interop import ArrayKind, array_kind, device_of

_FLOAT_NAMES = ("float32", "float64")


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


def check_dtype(x: Any, name: str, kind: ArrayKind) -> str:
    """Return the float dtype name the computation will use for ``x``.

    float32 and float64 are kept; integer and boolean input (photon counts,
    masks) becomes float64 as in scikit-learn; anything else is a TypeError.
    """
    dt = _dtype_name(x)
    if dt in _FLOAT_NAMES:
        return dt
    if kind == "numpy":
        npdt = np.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype)
        if npdt.kind in "iub":
            return "float64"
    else:
        if dt.startswith(("int", "uint", "bool")):
            return "float64"
    raise TypeError(
        f"{name} has dtype {dt}; fastmu computes in float32 or float64 "
        "(integer input is converted to float64; complex, string, object and "
        "half-precision input is refused)"
    )


def as_numpy_input(x: Any, name: str) -> np.ndarray:
    """``np.asarray`` with clear errors for things that are not numeric arrays."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{name} could not be read as a numeric array: {exc}") from exc
    if arr.dtype.kind not in "fiub":
        raise TypeError(
            f"{name} has dtype {arr.dtype}; fastmu computes in float32 or float64 "
            "(complex, string and object arrays are refused)"
        )
    return arr


def check_shape(shape: tuple[int, ...], name: str, ndims: tuple[int, ...]) -> None:
    if len(shape) not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(shape)}")
    if any(int(s) == 0 for s in shape):
        raise ValueError(f"{name} has a zero-size dimension: shape {tuple(shape)}")


def check_values(x: Any, name: str, kind: ArrayKind) -> None:
    """Finite and non-negative, or a ValueError that says which and where."""
    if kind == "numpy":
        finite = bool(np.isfinite(x).all())
        nonneg = bool((x >= 0).all()) if finite else True
        mn = float(x.min()) if not nonneg else 0.0
    else:
        mod = _module(kind)
        finite = bool(mod.isfinite(x).all())
        nonneg = bool((x >= 0).all()) if finite else True
        mn = float(x.min()) if not nonneg else 0.0
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    if not nonneg:
        raise ValueError(f"{name} must be non-negative; its minimum is {mn:g}")


def _module(kind: ArrayKind) -> Any:
    if kind == "torch":
        import torch

        return torch
    if kind == "cupy":
        import cupy

        return cupy
    return np


def check_same_kind_and_device(ref: Any, other: Any, ref_name: str, name: str) -> None:
    k_ref, k_other = array_kind(ref), array_kind(other)
    if k_other != k_ref and not (k_ref == "numpy" and k_other == "numpy"):
        raise TypeError(f"{name} is a {k_other} array but {ref_name} is a {k_ref} array; pass the same kind")
    d_ref, d_other = device_of(ref), device_of(other)
    if d_ref != d_other:
        raise ValueError(f"{name} is on {d_other} but {ref_name} is on {d_ref}; put them on the same device")


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_eps(eps: Any) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"eps must be a real number, got {eps!r}") from exc
    if not np.isfinite(e) or e <= 0:
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    return e
