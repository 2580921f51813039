"""Input validation shared by the solver, the estimator and the learned layers.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError``
(right kind, wrong content) with a message that names the argument. Nothing
is modified in place: conversions return new arrays, and the caller's arrays
are only ever read.
"""
from __future__ import annotations

import numbers
import operator
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
    if kind == "torch" and str(getattr(x, "layout", "torch.strided")) != "torch.strided":
        # sparse layouts have no min, isfinite or strides: refuse before any of them is asked for
        raise TypeError(f"{name} is a sparse torch tensor ({x.layout}); fastmu works on dense arrays: "
                        f"pass {name}.to_dense()")
    if kind == "torch" and getattr(x, "is_meta", False):  # shapes only: nothing to factorise
        raise TypeError(f"{name} is a meta tensor, which holds no values; pass a tensor with data")
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
    if type(x).__module__.startswith("scipy.sparse"):
        raise TypeError(f"{name} is a sparse {type(x).__name__}; fastmu works on dense arrays: pass {name}.toarray()")
    if isinstance(x, np.ma.MaskedArray) and np.ma.getmask(x) is not np.ma.nomask and np.ma.getmask(x).any():
        # np.asarray would drop the mask and factorise the hidden values as data
        raise TypeError(f"{name} is a masked array with masked entries; MU has no notion of missing values: "
                        f"fill them ({name}.filled(value)) or pass {name}.data to use the values under the mask")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{name} could not be read as a numeric array: {exc}") from exc
    if arr.dtype.kind not in "fiub":
        raise TypeError(
            f"{name} has dtype {arr.dtype}; fastmu computes in float32 or float64 "
            "(complex, string and object arrays are refused)"
        )
    if not arr.dtype.isnative:  # big-endian data (FITS, astropy): the kernels read native floats only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def check_shape(shape: tuple[int, ...], name: str, ndims: tuple[int, ...]) -> None:
    if len(shape) not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(shape)}")
    if any(int(s) == 0 for s in shape):
        raise ValueError(f"{name} has a zero-size dimension: shape {tuple(shape)}")


def check_torch_usable(tensors: Any) -> None:
    """Refuse tensors that fastmu's torch operations cannot take, before any of them runs.

    - CPU tensors in a process forked after fastmu's CPU kernels ran: torch's
      CPU operations would wait forever there (:mod:`fastmu.fork_safety`), so
      the RuntimeError comes first;
    - tensors of a ``torch.func`` transform (``vmap``, ``grad``, ...): fastmu's
      kernels read their storage, which such tensors do not have.
    """
    import torch

    if any(t.device.type == "cpu" for t in tensors):
        from fastmu import fork_safety

        fork_safety.check_cpu_kernels_usable()
    if torch.compiler.is_compiling():
        return  # TorchDynamo's tensors are never wrapped, and it cannot trace the test
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and any(wrapped(t) for t in tensors):
        raise TypeError(
            "fastmu does not support torch.func transforms (vmap, grad, jacrev, ...): its kernels read "
            "the tensors' memory. Batch problems along the first axis instead, and take gradients with "
            "loss.backward() (or use the learned models with fused=False)")


def check_values(x: Any, name: str, kind: ArrayKind) -> None:
    """Finite and non-negative, or a ValueError that says which and where."""
    if kind == "numpy":
        finite = bool(np.isfinite(x).all())
        nonneg = bool((x >= 0).all()) if finite else True
        mn = float(x.min()) if not nonneg else 0.0
    else:
        if _dtype_name(x).startswith("uint"):
            if kind == "torch":  # the solver's torch operations come next
                check_torch_usable([x])
            return  # always finite and >= 0; torch has no comparisons for uint16/32/64
        if kind == "torch":
            check_tensors_nonnegative_finite({name: x})  # checks check_torch_usable first
            return
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


def check_tensors_nonnegative_finite(tensors: dict[str, Any], hint: str = "") -> None:
    """Refuse NaN, infinite and negative entries in torch tensors, with one read on the host.

    One ``aminmax`` pass per tensor (it propagates NaN) and one device-to-host
    copy for all of them: on a GPU a single synchronisation. Empty and meta
    tensors are skipped, and so is everything while the current CUDA stream is
    being captured into a graph, where reading a value back is not allowed.

    Parameters
    ----------
    tensors : dict of str to Tensor
        The tensors, by the names the messages give them.
    hint : str, optional
        Appended to the message about a negative value.

    Raises
    ------
    ValueError
        A tensor holds a NaN, an infinity or a negative value.
    """
    import torch

    check_torch_usable(list(tensors.values()))
    given = [(k, v) for k, v in tensors.items() if v.numel() and not v.is_meta]
    if not given or any(v.is_cuda for _, v in given) and torch.cuda.is_current_stream_capturing():
        return
    with torch.no_grad():
        vals = torch.stack([m.to(torch.float64) for _, v in given for m in torch.aminmax(v.detach())]).tolist()
    for (name, _), lo, hi in zip(given, vals[::2], vals[1::2]):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or infinite values")
        if lo < 0:
            raise ValueError(f"{name} must be non-negative; its minimum is {lo:g}{hint}")


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def positive_count(value: Any, name: str) -> int:
    """A count argument (layers, epochs, a batch size): any integer (NumPy's, a 0-d integer
    tensor), not a bool or a float; ValueError otherwise or below 1."""
    try:
        if isinstance(value, bool):
            raise TypeError
        k = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if k < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return k


def check_tol(tol: Any) -> float | None:
    """``tol`` as a float (None stays None: no early stop)."""
    if tol is None:
        return None
    try:
        if isinstance(tol, (str, bytes, bool)):
            raise TypeError
        t = float(tol)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tol must be a real number or None, got {tol!r}") from exc
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return t


def default_rng(seed: Any, name: str = "seed") -> np.random.Generator:
    """``np.random.default_rng(seed)`` with an error that names the argument (None, a
    non-negative integer or a sequence of them, a SeedSequence or a Generator)."""
    if isinstance(seed, (bool, float, str, bytes)):  # NumPy would take True; floats and text are typos
        raise TypeError(f"{name} must be None or a non-negative integer, got {seed!r}")
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name} must be None or a non-negative integer, got {seed!r}") from None


def check_random_state(seed: Any) -> np.random.RandomState | np.random.Generator:
    """The generator the random start draws from: a new RandomState for an integer seed (so the
    draws are scikit-learn's) or None (fresh entropy), NumPy's global one for ``np.random``, a
    RandomState or Generator as given."""
    if isinstance(seed, (np.random.RandomState, np.random.Generator)):
        return seed
    if seed is np.random:
        return np.random.mtrand._rand
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        try:
            return np.random.RandomState(seed)
        except ValueError as exc:
            raise ValueError(f"random_state must be a seed between 0 and 2**32 - 1, got {seed!r}") from exc
    raise TypeError(
        f"random_state must be None, an integer seed, a numpy RandomState or a numpy Generator, got {seed!r}"
    )


def check_eps(eps: Any, dtype: Any = None) -> float:
    """``eps`` as a float: finite, > 0 and, given the working ``dtype``, at least its smallest
    normal number (the CPU kernels read subnormals as 0, :mod:`fastmu.kernels.fpenv`, and an eps
    that is 0 in the working precision gives 0/0 at zero entries)."""
    try:
        if isinstance(eps, (str, bytes, bool)):  # as check_tol: a number, not text that parses as one
            raise TypeError
        e = float(eps)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"eps must be a real number, got {eps!r}") from exc
    if not np.isfinite(e) or e <= 0:
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if type(dtype).__module__ == "torch":  # torch.finfo knows bfloat16, which NumPy does not
            import torch

            tiny = float(torch.finfo(dtype).tiny)
        else:
            tiny = float(np.finfo(name).tiny)
        if e < tiny:
            raise ValueError(f"eps={eps!r} is below the smallest normal {name} number ({tiny:.4g}), which the "
                             f"computation reads as 0 (a zero entry of X then gives 0/0); pass eps >= {tiny:.4g}")
    return e


#: eps may be this fraction of the MU denominators before :func:`warn_if_eps_dominates` warns
#: (measured on a rank-3 20 × 3000 problem: at 0.4 % the residual after 1000 iterations was 6 %
#: above its value at scale 1, at 13 % five times it, at ~100 % the factors went to 0)
EPS_SHARE_WARN = 1e-3


def callback_says_stop(result: Any) -> bool:
    """Whether a callback's return value asks the run to stop.

    ``True`` does, and so do NumPy's ``True`` and a one-element boolean array
    or tensor holding True: comparisons on arrays (``err < 1e-3``) return
    those, not Python's ``True``. Anything else (None, numbers, strings) does
    not, so a callback that returns what it computed does not stop the run.
    """
    if result is True:
        return True
    if isinstance(result, np.bool_):
        return bool(result)
    dtype = getattr(result, "dtype", None)
    if dtype is not None and str(dtype) in ("bool", "torch.bool") and getattr(result, "size", None) is not None:
        size = result.size if isinstance(result.size, int) else result.numel()
        return size == 1 and bool(result)
    return False


class ScaleWarning(RuntimeWarning):
    """X's values are so small that ``eps`` pulls the MU factors towards 0 (:func:`warn_if_eps_dominates`)."""


def warn_if_eps_dominates(means: np.ndarray, m: int, t: int, n: int, eps: float) -> None:
    """Warn where X's scale (``means``: each ``(m, t)`` problem's mean) is so small that ``eps``
    is a sizeable share of the MU denominators of rank ``n``.

    At a balanced start (every entry of A and S near ``sqrt(mean(X)/n)``),
    ``A'SS'ᵀ`` and ``A'ᵀA'S`` are about ``min(m, t)·mean(X)^1.5/√n``; where
    ``eps`` is more than :data:`EPS_SHARE_WARN` of that, it biases the
    factors towards 0, and where it is about as large (a mean 100 times
    smaller) drives them to 0. MU itself is scale-free, so dividing X by a
    constant cures it.
    """
    b = means.shape[0]
    with np.errstate(divide="ignore", over="ignore"):  # X too large overflows to share 0: no warning, rightly
        share = eps / (min(m, t) * means**1.5 / np.sqrt(n))
    bad = np.flatnonzero((means > 0) & (share > EPS_SHARE_WARN))
    if bad.size:
        import warnings

        i = int(bad[np.argmax(share[bad])])
        which = "X" if b == 1 else f"Problem {i} of X's {b} ({bad.size} {'is' if bad.size == 1 else 'are'} affected)"
        warnings.warn(
            f"{which} has mean {means[i]:.3g}: at that scale eps={eps:g} is about {share[i]:.2g} times the "
            "multiplicative updates' denominators, which pulls the factors towards 0 (near 1 times and "
            "above, they vanish). MU is scale-free: divide X by its mean and multiply A·S back, or pass "
            "a smaller eps.",
            ScaleWarning,
            stacklevel=caller_stacklevel(),
        )


def caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from its caller, of the first frame outside fastmu (and
    scikit-learn, whose wrappers call the estimator's methods): the user's call."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("fastmu", "sklearn"):
        frame, level = frame.f_back, level + 1
    return level


def finite_problems(x: Any, kind: ArrayKind) -> np.ndarray:
    """Per problem of a ``(b, …)`` array: whether every entry is finite (a bool array on the host)."""
    mod = _module(kind)
    ok = mod.isfinite(x).reshape(x.shape[0], -1).all(**({"dim": 1} if kind == "torch" else {"axis": 1}))
    if kind == "torch":
        return ok.cpu().numpy()
    if kind == "cupy":
        return ok.get()
    return np.asarray(ok)


#: X's largest value, as a share of the square root of its dtype's largest value, from which
#: :func:`raise_if_not_finite` blames X's scale (MU overflowed from 2.5e18 in float32 on
#: 5 × 40 to 65 × 16384 problems, 0.14 of that root: its products grow as X's square)
X_SCALE_BLAME = 1e-4


def raise_if_not_finite(X: Any, A: Any, S: Any, kind: ArrayKind, dtype: str, method: str,
                        init: str | None = None) -> None:
    """A ``FloatingPointError`` naming the problems whose factors overflowed, and what to do.

    X and any given start are checked finite and non-negative on entry, so
    what overflows is the scale: X's products with the factors pass the
    dtype's largest value. Where X is far too small for that, the start
    (a huge one passed in) or a callback that wrote NaN or inf into the
    factors did it, and the message says so rather than blame X. ``init``:
    the start's scheme where fastmu drew it (None: given, or not known);
    NNDSVDa's start overflows sooner (its products grow as X's cube) and is
    named.
    """
    ok = finite_problems(A, kind) & finite_problems(S, kind)
    if ok.all():
        return
    bad = np.flatnonzero(~ok)
    if _dtype_name(X).startswith("uint") and hasattr(X, "double"):
        X = X.double()  # torch has no max for uint16/32/64
    xmax = float(X.max())
    which = "" if X.shape[0] == 1 else f" for {bad.size} of the {X.shape[0]} problems (first: {int(bad[0])})"
    # NNDSVDa's first A S Sᵀ is of order mean³ · pixels: named only where that can reach the limit
    # (a callback that wrote NaN into a small problem's factors gets the message below)
    pixels = max(X.shape[-1], X.shape[-2])
    with np.errstate(over="ignore"):  # (a float64 X near 1e150 cubes past float64's range: inf, a yes)
        cube = np.float64(xmax) ** 3 * pixels
    nndsvda_overflow = init in ("nndsvda", "nndsvdar") and cube > 1e-3 * float(np.finfo(dtype).max)
    if xmax < X_SCALE_BLAME * np.sqrt(np.finfo(dtype).max) and nndsvda_overflow:
        # scikit-learn's fill: NNDSVD's zeros become X's mean (nndsvdar: ~1 % of it), so the first
        # A S Sᵀ is of order mean³ · t, which passes float32's limit from a mean of ~1e11
        raise FloatingPointError(
            f"{method}'s factors became NaN or infinite ({dtype}){which}: the init={init!r} start fills "
            f"NNDSVD's zeros with X's mean, and with X this large (largest value {xmax:.3g}) its first "
            f"products overflow {dtype}. Use init='nndsvd' or 'random', divide X by its maximum (and "
            "multiply A·S back)" + (", or pass float64." if dtype == "float32" else ".")
        )
    if xmax < X_SCALE_BLAME * np.sqrt(np.finfo(dtype).max):
        raise FloatingPointError(
            f"{method}'s factors became NaN or infinite ({dtype}){which}, although X's largest value, "
            f"{xmax:.3g}, is far from {dtype}'s limit: a given start too large for {dtype}, or a callback "
            "that wrote NaN or inf into the factors it was passed, does this. Pass a start on X's scale, "
            "and let a callback change copies of the factors, not the factors."
        )
    raise FloatingPointError(
        f"{method} overflowed {dtype}{which}: X's largest value, {xmax:.3g}, is too large for its products "
        "with the factors. The factorisation is scale-free: divide X by its maximum (and multiply A·S back)"
        + (", or pass float64." if dtype == "float32" else ".")
    )
