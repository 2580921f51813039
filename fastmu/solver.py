"""The batched Lee-Seung MU solver, :func:`mu`."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fastmu import EPS
from fastmu.dispatch import BACKENDS, cuda_available, get_engine, new_engine
from fastmu.interop import ArrayKind, array_kind, is_device_array
from fastmu.penalty import Penalty, check_penalty
from fastmu.validation import (
    as_numpy_input,
    callback_says_stop,
    check_dtype,
    check_eps,
    check_positive_int,
    check_random_state,
    check_same_kind_and_device,
    check_shape,
    check_tol,
    check_values,
    raise_if_not_finite,
    warn_if_eps_dominates,
)

INITS = ("random", "constant", "nndsvd", "nndsvda", "nndsvdar")
#: the starts computed from X's leading singular vectors (the others need only X's mean)
SVD_INITS = ("nndsvd", "nndsvda", "nndsvdar")
#: NNDSVD entries below this become 0 before any fill, as in scikit-learn's ``_initialize_nmf``
NNDSVD_ZERO = 1e-6

Callback = Callable[[int, Any, Any], Any]


def mu(
    X: Any,
    n_components: int | None = None,
    *,
    A0: Any = None,
    S0: Any = None,
    n_iter: int = 200,
    tol: float | None = None,
    eps: float = EPS,
    init: str = "random",
    random_state: int | np.random.RandomState | None = None,
    backend: str = "auto",
    callback: Callback | None = None,
    callback_every: int = 1,
    check_every: int = 10,
    progress: bool = False,
    return_n_iter: bool = False,
    l1_A: float = 0.0,
    l2_A: float = 0.0,
    l1_S: float = 0.0,
    l2_S: float = 0.0,
) -> tuple[Any, Any] | tuple[Any, Any, int]:
    """Factorise ``X ≈ A S`` with Lee-Seung multiplicative updates (Frobenius loss).

    One iteration updates A first, then S with the new A::

        A ← A ⊙ (X Sᵀ) ⊘ (A S Sᵀ + ε)
        S ← S ⊙ (Aᵀ X) ⊘ (Aᵀ A S + ε)

    With L1/L2 penalties (``l1_A`` … ``l2_S``) the objective becomes
    ``½‖X − A S‖² + l1_A‖A‖₁ + ½ l2_A‖A‖² + l1_S‖S‖₁ + ½ l2_S‖S‖²`` and each
    penalty's gradient joins its factor's denominator (scikit-learn's
    regularised multiplicative updates)::

        A ← A ⊙ (X Sᵀ) ⊘ (A S Sᵀ + l2_A A + l1_A + ε)
        S ← S ⊙ (Aᵀ X) ⊘ (Aᵀ A S + l2_S S + l1_S + ε)

    Parameters
    ----------
    X : array of shape (m, t) or (b, m, t)
        Non-negative data: m channels × t pixels, optionally a batch of b
        independent problems. NumPy, torch (CPU or CUDA) or CuPy; float32 and
        float64 are kept, integers become float64.
    n_components : int, optional
        Rank n. May be omitted when ``A0``/``S0`` are given.
    A0, S0 : arrays of shape ([b,] m, n) and ([b,] n, t), optional
        Explicit start (both, or neither). Copied, never modified.
    n_iter : int, default 200
        Maximum number of iterations.
    tol : float, optional
        Stop early when, for every problem, the objective decreased by less
        than ``tol`` times its initial value since the previous check
        (checked every ``check_every`` iterations, as in scikit-learn).
        ``None`` runs exactly ``n_iter`` iterations.
    eps : float, default :data:`fastmu.EPS` (1e-12)
        Added to every denominator; the same on every backend.
    init : {"random", "constant", "nndsvd", "nndsvda", "nndsvdar"}
        Start when ``A0``/``S0`` are not given: ``"random"`` is scikit-learn's
        (``|N(0,1)|·sqrt(mean(X)/n)``, S drawn before A; identical to
        scikit-learn for one problem and an integer seed), ``"constant"``
        fills both with ``sqrt(mean(X)/n)`` (the learned models' start).
        The NNDSVD starts (Boutsidis & Gallopoulos, 2008; scikit-learn's,
        from an exact SVD where scikit-learn's is randomized) set entries
        below 1e-6 to 0; ``"nndsvd"`` keeps those zeros, which multiplicative
        updates never change (so it needs ``n_components <= min(m, t)``),
        ``"nndsvda"`` fills them with X's mean and ``"nndsvdar"`` with
        ``|N(0,1)|·mean(X)/100`` drawn from ``random_state``.
    random_state : int, RandomState, Generator or None
        Seed of the random start (an integer draws scikit-learn's start). The start is drawn on the host, so one
        seed gives the same start on every backend.
    backend : {"auto", "cpu", "cuda", "torch"}
        ``"auto"``: host arrays run on the fused CPU kernels, GPU arrays on
        the fused CUDA kernels (torch's reference update when Numba CUDA is
        missing). ``"torch"`` runs the pure-torch reference anywhere. On the
        CPU, one or a few problems run on as many of Numba's threads as
        measures fastest while they run (:mod:`fastmu.cpu_threads`: fewer on
        a machine busy with other work); the results are the same bit for bit.
        A tall X with few columns (pixels as rows) runs on its transpose, with
        the same iterates, checks and callbacks (:mod:`fastmu.transposed`;
        ``FASTMU_CPU_TRANSPOSE=0`` turns that off).
    callback : callable(iteration, A, S), optional
        Called after every ``callback_every`` iterations with the current
        factors in the caller's array type (views of the solver state: copy
        what you keep). Return ``True`` to stop. Without a callback the
        iterations run inside the kernels, returning to Python only between
        slices of about 0.25 s on the CPU (so that Ctrl-C works).
    callback_every : int, default 1
    check_every : int, default 10
        Iterations between objective checks when ``tol`` is set.
    progress : bool, default False
        Show a progress bar (tqdm).
    return_n_iter : bool, default False
        Also return the number of iterations run (fewer than ``n_iter``
        where ``tol`` or the callback stopped the run), as scikit-learn's
        ``non_negative_factorization`` does.
    l1_A, l2_A, l1_S, l2_S : float, default 0.0
        Weights (≥ 0) of the L1 and L2 penalties on A and on S; scikit-learn's
        ``l1_reg_W``, ``l2_reg_W``, ``l1_reg_H``, ``l2_reg_H`` for ``A = W``,
        ``S = H`` (:func:`fastmu.penalty.from_sklearn` converts its
        ``alpha_W``, ``alpha_H``, ``l1_ratio``). They cost nothing per pixel:
        the L2 weights go on the diagonals of the Gram matrices, the L1
        weights join ε. ``tol`` still measures the data term alone, as
        scikit-learn's does.

    Returns
    -------
    A : array ([b,] m, n)
    S : array ([b,] n, t)
        In the caller's array type, dtype and device; 2-D in, 2-D out.
    n_iter : int
        Only with ``return_n_iter=True``: the iterations run (every problem
        of a batch runs the same number).

    Examples
    --------
    >>> import numpy as np, fastmu
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((65, 4)) @ rng.random((4, 1000))
    >>> A, S = fastmu.mu(X, 4, n_iter=500, random_state=0)
    >>> A.shape, S.shape
    ((65, 4), (4, 1000))
    >>> bool(np.linalg.norm(X - A @ S) / np.linalg.norm(X) < 0.05)
    True
    """
    penalty = check_penalty(l1_A, l2_A, l1_S, l2_S)
    A, S, done = solve(X, n_components, A0=A0, S0=S0, n_iter=n_iter, tol=tol, eps=eps, init=init,
                       random_state=random_state, backend=backend, callback=callback,
                       callback_every=callback_every, check_every=check_every, progress=progress,
                       penalty=penalty)
    return (A, S, done) if return_n_iter else (A, S)


def solve(
    X: Any,
    n_components: int | None = None,
    *,
    A0: Any = None,
    S0: Any = None,
    n_iter: int = 200,
    tol: float | None = None,
    eps: float = EPS,
    init: str = "random",
    random_state: int | np.random.RandomState | None = None,
    backend: str = "auto",
    callback: Callback | None = None,
    callback_every: int = 1,
    check_every: int = 10,
    progress: bool = False,
    tol_on_norm: bool = False,
    tol_initial: float | None = None,
    penalty: Penalty | None = None,
    stop_info: dict[str, bool] | None = None,
) -> tuple[Any, Any, int]:
    """:func:`mu`, also returning the number of iterations run.

    ``tol_on_norm`` measures the decrease for ``tol`` on the residual's
    Frobenius norm ``‖X − A S‖`` instead of the objective ``½‖X − A S‖²``
    (scikit-learn's rule, which :class:`fastmu.NMF` follows).
    ``tol_initial`` (one problem) replaces the start's value as the scale of
    the decrease and the first "previous" value: the value at an earlier
    start that the caller advanced by half an iteration before calling.
    ``penalty`` (a validated :class:`~fastmu.penalty.Penalty`; None: none)
    carries :func:`mu`'s ``l1_A`` … ``l2_S``. ``stop_info`` (a dict) gets
    ``"tol": True`` when the tolerance stopped the run.
    """
    n_iter = check_positive_int(n_iter, "n_iter", minimum=0)
    callback_every = check_positive_int(callback_every, "callback_every")
    check_every = check_positive_int(check_every, "check_every")
    eps = check_eps(eps)
    tol = check_tol(tol)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")

    kind, Xc, dtype, squeeze = _check_X(X)
    check_eps(eps, dtype)
    b, m, t = Xc.shape
    engine_cls = get_engine(_resolve_backend(backend, X, kind))

    Xn = engine_cls.adopt(_cast(Xc, kind, dtype), None)
    means = _per_problem_means(Xc, kind)  # one pass over X, for the start and the scale check
    A, S = _initial_factors(
        X, Xc, kind, dtype, n_components, A0, S0, init, random_state, engine_cls, Xn, means
    )
    engine = new_engine(engine_cls, Xn, A, S, None, eps, penalty if penalty is not None and penalty.active else None)
    warn_if_eps_dominates(means, m, t, A.shape[2], eps)  # A: (b, m, n), maybe a device array

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_iter, desc=f"MU ({engine.name}): preparing kernels", unit="it")
        # The first call compiles or loads the kernels (seconds on a first run);
        # do it before the clock starts so the rate and ETA mean something. Costs
        # nothing: run(0) computes X Sᵀ and S Sᵀ, which the first iteration needs.
        engine.run(0)
        bar.set_description(f"MU ({engine.name})")
        bar.reset(total=n_iter)
    # The kernels run uninterrupted between events: callbacks, tolerance checks,
    # progress updates. Each run ends at the next event, so the checks fall on
    # the same iterations whatever else is on (a bar must not move a tol stop).
    bar_step = max(1, n_iter // 100)

    def next_event(done: int) -> int:
        stop = n_iter
        if callback is not None:
            stop = min(stop, (done // callback_every + 1) * callback_every)
        if tol is not None:
            stop = min(stop, (done // check_every + 1) * check_every)
        if bar is not None:
            stop = min(stop, done + bar_step)
        return stop

    def measure() -> np.ndarray:
        f = engine.objective()
        # the objective comes from X Sᵀ and S Sᵀ: rounding can leave it a hair below zero
        return np.sqrt(2.0 * np.maximum(f, 0.0)) if tol_on_norm else f

    f_init = f_prev = measure() if tol is not None else None
    if tol is not None and tol_initial is not None:
        f_init = f_prev = np.full_like(f_init, float(tol_initial))
    done = 0
    try:
        while done < n_iter:
            k = next_event(done) - done
            engine.run(k)
            done += k
            if bar is not None:
                bar.update(k)
            if callback is not None and done % callback_every == 0:
                A_v, S_v = (
                    engine_cls.release(a, kind, X) for a in engine.factors()
                )
                if squeeze:
                    A_v, S_v = A_v[0], S_v[0]
                if callback_says_stop(callback(done, A_v, S_v)):
                    break
            if tol is not None and done % check_every == 0:
                f = measure()
                scale = np.where(f_init > 0, f_init, 1.0)
                if np.all((f_prev - f) / scale < tol):
                    if stop_info is not None:
                        stop_info["tol"] = True
                    break
                f_prev = f
    finally:
        if bar is not None:
            bar.close()

    A_out, S_out = (engine_cls.release(a, kind, X) for a in engine.factors())
    raise_if_not_finite(Xc, A_out, S_out, kind, dtype, "MU", init=init if A0 is None else None)
    if squeeze:
        A_out, S_out = A_out[0], S_out[0]
    return A_out, S_out, done


def _resolve_backend(backend: str, X: Any, kind: ArrayKind) -> str:
    on_gpu = is_device_array(X)
    if backend == "auto":
        if not on_gpu:
            return "cpu"
        if cuda_available():
            return "cuda"
        if kind == "torch":
            return "torch"
        raise RuntimeError("X is a GPU array but Numba CUDA cannot run here; install fastmu[cuda12] or fastmu[cuda13]")
    if backend == "cuda" and not cuda_available():
        raise RuntimeError(
            "backend='cuda' was asked for but no CUDA GPU is visible to Numba "
            "(and NUMBA_ENABLE_CUDASIM is not set); use backend='cpu' or install the CUDA extra"
        )
    return backend


def _check_X(X: Any) -> tuple[ArrayKind, Any, str, bool]:
    """Validate X; return (kind, X as a 3-D array of the caller's kind, dtype name, was_2d)."""
    kind = array_kind(X)
    Xc = as_numpy_input(X, "X") if kind == "numpy" else X
    check_shape(tuple(Xc.shape), "X", (2, 3))
    dtype = check_dtype(Xc, "X", kind)
    check_values(Xc, "X", kind)
    squeeze = Xc.ndim == 2
    if squeeze:
        Xc = Xc[None]
    return kind, Xc, dtype, squeeze


def _cast(x: Any, kind: ArrayKind, dtype: str) -> Any:
    """``x`` in ``dtype``, a new array only when the dtype differs."""
    if kind == "torch":
        import torch

        return x.to(getattr(torch, dtype))
    return x.astype(dtype, copy=False)


def _initial_factors(
    X: Any,
    Xc: Any,
    kind: ArrayKind,
    dtype: str,
    n_components: int | None,
    A0: Any,
    S0: Any,
    init: str,
    random_state: Any,
    engine_cls: type,
    Xn: Any,
    means: np.ndarray | None = None,
) -> tuple[Any, Any]:
    """Validated start, as engine-native copies; ``means``: X's per-problem means if already known."""
    b, m, t = Xc.shape
    if (A0 is None) != (S0 is None):
        raise ValueError("give both A0 and S0, or neither")
    if A0 is not None:
        A = _check_factor(A0, "A0", X, kind, dtype, b, (m, None))
        S = _check_factor(S0, "S0", X, kind, dtype, b, (None, t))
        n = A.shape[-1]
        if S.shape[-2] != n:
            raise ValueError(f"A0 has {n} components but S0 has {S.shape[-2]}")
        if n_components is not None and check_positive_int(n_components, "n_components") != n:
            raise ValueError(f"n_components={n_components} but A0/S0 have {n} components")
        # Copies: the engine updates its factors in place.
        A = _copy_native(engine_cls.adopt(_cast(A, kind, dtype), Xn), engine_cls)
        S = _copy_native(engine_cls.adopt(_cast(S, kind, dtype), Xn), engine_cls)
        return A, S
    if n_components is None:
        raise ValueError("n_components is required when A0 and S0 are not given")
    n = check_positive_int(n_components, "n_components")
    if means is None:
        means = _per_problem_means(Xc, kind)
    A_h, S_h = initial_factors(means, m, t, n, init, random_state, X=_host(Xc, kind) if init in SVD_INITS else None)
    return engine_cls.adopt(A_h.astype(dtype), Xn), engine_cls.adopt(S_h.astype(dtype), Xn)


def _check_factor(F: Any, name: str, X: Any, kind: ArrayKind, dtype: str, b: int, dims: tuple) -> Any:
    fk = array_kind(F)
    if fk != kind:
        raise TypeError(f"{name} is a {fk} array but X is a {kind} array; pass the same kind")
    Fc = as_numpy_input(F, name) if kind == "numpy" else F
    if kind != "numpy":
        check_same_kind_and_device(X, Fc, "X", name)
    check_shape(tuple(Fc.shape), name, (2, 3))
    check_dtype(Fc, name, kind)
    given, x_shape = tuple(Fc.shape), tuple(X.shape)
    # the shape wanted, in the user's terms: a batch axis where X has one, "n" for the free rank
    want = ((b,) if len(x_shape) == 3 else ()) + tuple("n" if d is None else d for d in dims)
    want_txt = "(" + ", ".join(map(str, want)) + ")"
    if len(x_shape) == 2 and Fc.ndim == 3 and given[0] != 1:
        raise ValueError(f"{name} has shape {given}, a batch of {given[0]}, but X is one problem of shape "
                         f"{x_shape}: {name} must be {want_txt}")
    if len(x_shape) == 3 and Fc.ndim == 2 and b != 1:
        raise ValueError(f"{name} has shape {given}, with no batch axis, but X holds {b} problems "
                         f"(shape {x_shape}): {name} must be {want_txt}")
    if Fc.ndim == 2:
        Fc = Fc[None]
    if Fc.shape[0] != b:
        raise ValueError(f"{name} has shape {given} but X has shape {x_shape}: {name} must be {want_txt}")
    for axis, d in zip((1, 2), dims):
        if d is not None and Fc.shape[axis] != d:
            raise ValueError(f"{name} has shape {given} but X has shape {x_shape}: {name} must be {want_txt}")
    check_values(Fc, name, kind)
    if kind == "numpy" and Fc.dtype.kind != "f":
        Fc = Fc.astype(np.float64)
    return Fc


def _copy_native(x: Any, engine_cls: type) -> Any:
    copier = getattr(engine_cls, "copy", None)  # engines whose arrays lack .copy()/.clone()
    if copier is not None:
        return copier(x)
    # detached: the factors are the solver's, never part of the caller's autograd graph
    return x.detach().clone() if hasattr(x, "clone") else x.copy()


def _host(Xc: Any, kind: ArrayKind) -> np.ndarray:
    if kind == "torch":
        return Xc.detach().cpu().double().numpy()
    if kind == "cupy":
        return Xc.get().astype(np.float64)
    return np.asarray(Xc, dtype=np.float64)


def _per_problem_means(Xc: Any, kind: ArrayKind) -> np.ndarray:
    if kind == "numpy":
        return Xc.mean(axis=(1, 2), dtype=np.float64)
    if kind == "torch":
        import torch

        # accumulated in float64 without a float64 copy of X
        return Xc.detach().mean(dim=(1, 2), dtype=torch.float64).cpu().numpy()
    return Xc.mean(axis=(1, 2), dtype="float64").get()


def initial_factors(
    means: np.ndarray,
    m: int,
    t: int,
    n: int,
    init: str = "random",
    random_state: Any = None,
    X: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Host float64 starting factors ``A (b, m, n)``, ``S (b, n, t)`` for ``b = len(means)``.

    ``"random"`` draws, per problem in batch order, S then A from one
    ``RandomState`` exactly as scikit-learn's NMF does, so a single problem
    with an integer seed starts where scikit-learn starts.
    """
    b = len(means)
    avg = np.sqrt(np.maximum(means, 0.0) / n)
    if init == "constant":
        A = np.broadcast_to(avg[:, None, None], (b, m, n)).copy()
        S = np.broadcast_to(avg[:, None, None], (b, n, t)).copy()
        return A, S
    if init == "random":
        rng = check_random_state(random_state)
        A = np.empty((b, m, n))
        S = np.empty((b, n, t))
        for p in range(b):
            S[p] = np.abs(avg[p] * rng.standard_normal(size=(n, t)))
            A[p] = np.abs(avg[p] * rng.standard_normal(size=(m, n)))
        return A, S
    if init in SVD_INITS:
        assert X is not None
        if init == "nndsvd" and n > min(m, t):
            raise ValueError(f"init='nndsvd' needs n_components <= min(m, t) = {min(m, t)}, got {n}: the "
                             "components past X's rank would start, and under multiplicative updates stay, "
                             "all zero; use init='nndsvda' or 'nndsvdar'")
        rng = check_random_state(random_state) if init == "nndsvdar" else None
        A = np.empty((b, m, n))
        S = np.empty((b, n, t))
        for p in range(b):
            A[p], S[p] = _nndsvd(X[p], n)
            for F in (A[p], S[p]):  # A's zeros first, then S's: scikit-learn's order of draws
                zero = F < NNDSVD_ZERO
                if init == "nndsvda":
                    F[zero] = means[p]
                elif init == "nndsvdar":
                    F[zero] = np.abs(means[p] * rng.standard_normal(size=int(zero.sum())) / 100)
                else:
                    F[zero] = 0.0
        return A, S
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _nndsvd(X: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """NNDSVD (Boutsidis & Gallopoulos, 2008): the positive parts of the leading singular pairs."""
    U, sv, Vt = np.linalg.svd(X, full_matrices=False)
    m, t = X.shape
    A = np.zeros((m, n))
    S = np.zeros((n, t))
    A[:, 0] = np.sqrt(sv[0]) * np.abs(U[:, 0])
    S[0] = np.sqrt(sv[0]) * np.abs(Vt[0])
    for j in range(1, min(n, len(sv))):
        x, y = U[:, j], Vt[j]
        xp, xn = np.maximum(x, 0), np.maximum(-x, 0)
        yp, yn = np.maximum(y, 0), np.maximum(-y, 0)
        npos = np.linalg.norm(xp) * np.linalg.norm(yp)
        nneg = np.linalg.norm(xn) * np.linalg.norm(yn)
        if npos > nneg:  # a tie takes the negative parts, as scikit-learn does
            u, v, s = xp / (np.linalg.norm(xp) or 1), yp / (np.linalg.norm(yp) or 1), npos
        else:
            u, v, s = xn / (np.linalg.norm(xn) or 1), yn / (np.linalg.norm(yn) or 1), nneg
        A[:, j] = np.sqrt(sv[j] * s) * u
        S[j] = np.sqrt(sv[j] * s) * v
    return A, S
