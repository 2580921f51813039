"""Batched coordinate-descent NMF: scikit-learn's ``solver="cd"`` update (with its L1/L2
regularisation, :mod:`fastmu.penalty`), in a fused Numba kernel on CPU arrays
(:mod:`fastmu.kernels.cpu_cd`) and in torch operations on any device."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fastmu.dispatch import TorchEngine
from fastmu.penalty import NONE, Penalty, check_penalty
from fastmu.solver import INITS, _cast, _check_X, _initial_factors
from fastmu.validation import callback_says_stop, check_positive_int, check_tol, raise_if_not_finite

Callback = Callable[[int, Any, Any], Any]


def cd(
    X: Any,
    n_components: int | None = None,
    *,
    A0: Any = None,
    S0: Any = None,
    n_iter: int = 200,
    tol: float | None = None,
    init: str = "random",
    random_state: int | np.random.RandomState | None = None,
    callback: Callback | None = None,
    callback_every: int = 1,
    progress: bool = False,
    return_n_iter: bool = False,
    l1_A: float = 0.0,
    l2_A: float = 0.0,
    l1_S: float = 0.0,
    l2_S: float = 0.0,
) -> tuple[Any, Any] | tuple[Any, Any, int]:
    """Factorise ``X ≈ A S`` by cyclic coordinate descent (Frobenius loss, optionally
    with L1/L2 penalties on the factors).

    The update of scikit-learn's ``NMF(solver="cd", shuffle=False)`` (the
    HALS / FastHALS update of Cichocki & Phan), with its regularisation,
    batched over problems: in a fused Numba kernel for CPU arrays (one pass
    over X per iteration), in torch operations on other devices. It
    minimises::

        ½‖X − A S‖²_F + l1_A ‖A‖₁ + ½ l2_A ‖A‖²_F + l1_S ‖S‖₁ + ½ l2_S ‖S‖²_F

    (all weights 0 by default: plain CD). One iteration updates A, then S
    with the new A. For A, with ``G = S Sᵀ + l2_A I`` and
    ``P = X Sᵀ − l1_A``, components ``k = 0 … n−1`` in turn::

        A[:, k] ← max(A[:, k] − ((A G)[:, k] − P[:, k]) / G[k, k], 0)

    where ``A G`` uses the columns already updated in this sweep, and a
    component with ``G[k, k] = 0`` is left as it is. S is updated the same
    way on the transposed problem (``G = Aᵀ A + l2_S I``,
    ``P = Aᵀ X − l1_S``, rows of S). Each step minimises the objective
    exactly over one column, so the objective never increases. From the
    same start the iterates are scikit-learn's to rounding.

    Parameters
    ----------
    X : array of shape (m, t) or (b, m, t)
        Non-negative data: m channels × t pixels, optionally a batch of b
        independent problems. NumPy or torch (any device; CuPy through
        DLPack); float32 and float64 are kept, integers become float64.
    n_components : int, optional
        Rank n. May be omitted when ``A0``/``S0`` are given.
    A0, S0 : arrays of shape ([b,] m, n) and ([b,] n, t), optional
        Explicit start (both, or neither), of the same kind and device as X.
        Copied, never modified.
    n_iter : int, default 200
        Maximum number of iterations.
    tol : float, optional
        scikit-learn's CD stopping rule. Each iteration sums ``|pg|`` over
        every coordinate it updates (A's and S's), where ``pg`` is the
        gradient just before that coordinate's step, or ``min(grad, 0)`` if
        the coordinate is 0. A problem has converged once this sum, divided
        by the first iteration's, is ``<= tol`` (or the first iteration's is
        0). The run stops after the first iteration at which every problem
        of the batch has converged at some iteration (so a batch runs as long
        as its slowest problem would alone). ``None`` runs exactly
        ``n_iter`` iterations.
    init : {"random", "constant", "nndsvd", "nndsvda", "nndsvdar"}
        Start when ``A0``/``S0`` are not given; the starts of
        :func:`fastmu.mu` (coordinate descent does update ``"nndsvd"``'s
        zeros). ``"random"`` is scikit-learn's: identical to
        ``NMF(init="random", random_state=seed)`` for one problem and an
        integer seed.
    random_state : int, RandomState, Generator or None
        Seed of the random start (drawn on the host).
    callback : callable(iteration, A, S), optional
        Called after every ``callback_every`` iterations with the current
        factors in the caller's array type (views of the solver state: copy
        what you keep). Return ``True`` to stop.
    callback_every : int, default 1
    progress : bool, default False
        Show a progress bar (tqdm).
    return_n_iter : bool, default False
        Also return the number of iterations run (fewer than ``n_iter``
        where ``tol`` or the callback stopped the run), as scikit-learn's
        ``non_negative_factorization`` does.
    l1_A, l2_A, l1_S, l2_S : float, default 0.0
        Penalty weights (finite, ``>= 0``): L1 and L2 on A, L1 and L2 on S,
        as in the objective above. They are scikit-learn's ``l1_reg_W``,
        ``l2_reg_W``, ``l1_reg_H``, ``l2_reg_H`` with ``A = W``, ``S = H``
        (its private ``_fit_coordinate_descent``; the ``NMF`` estimator
        derives them from ``alpha_W``, ``alpha_H`` and ``l1_ratio``, see
        :func:`fastmu.penalty.from_sklearn`). The violation of the ``tol``
        rule is then the penalised objective's, as scikit-learn's.

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
    >>> import numpy as np
    >>> from fastmu.baselines.coordinate_descent import cd
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((65, 4)) @ rng.random((4, 1000))
    >>> A, S = cd(X, 4, n_iter=300, random_state=0)
    >>> A.shape, S.shape
    ((65, 4), (4, 1000))
    >>> bool(np.linalg.norm(X - A @ S) / np.linalg.norm(X) < 0.05)
    True
    """
    penalty = check_penalty(l1_A, l2_A, l1_S, l2_S)
    A, S, done = _solve(X, n_components, A0=A0, S0=S0, n_iter=n_iter, tol=tol, init=init,
                        random_state=random_state, callback=callback,
                        callback_every=callback_every, progress=progress, penalty=penalty)
    return (A, S, done) if return_n_iter else (A, S)


def _solve(
    X: Any,
    n_components: int | None = None,
    *,
    A0: Any = None,
    S0: Any = None,
    n_iter: int = 200,
    tol: float | None = None,
    init: str = "random",
    random_state: Any = None,
    callback: Callback | None = None,
    callback_every: int = 1,
    progress: bool = False,
    order: np.random.RandomState | None = None,
    penalty: Penalty | None = None,
) -> tuple[Any, Any, int]:
    """:func:`cd`, also returning the number of iterations run.

    ``order``: visit the components of each sweep in the order of a fresh
    ``order.permutation(n)`` (A's drawn before S's), as scikit-learn's
    ``shuffle=True``; drawn after the start, so a RandomState shared with
    ``random_state`` is used in scikit-learn's order. ``penalty``: the
    weights ``(l1_A, l2_A, l1_S, l2_S)`` (a :class:`fastmu.penalty.Penalty`
    or four reals, validated here too); None for none.
    """
    import torch

    penalty = _check_penalty_arg(penalty)
    n_iter = check_positive_int(n_iter, "n_iter", minimum=0)
    callback_every = check_positive_int(callback_every, "callback_every")
    tol = check_tol(tol)
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")

    kind, Xc, dtype, squeeze = _check_X(X)
    with torch.no_grad():
        Xt = TorchEngine.adopt(_cast(Xc, kind, dtype), None)
        A, S = _initial_factors(X, Xc, kind, dtype, n_components, A0, S0, init, random_state,
                                TorchEngine, Xt)
        # A is kept transposed, (b, n, m), so that both updates act on
        # contiguous rows of a (b, n, ·) factor and share one sweep.
        At = A.mT.contiguous()
        S = S.contiguous()

        def release(F: Any, transpose: bool) -> Any:
            out = TorchEngine.release(F.mT if transpose else F, kind, X)
            return out[0] if squeeze else out

        def on_iter(done: int) -> bool:
            return callback_says_stop(callback(done, release(At, True), release(S, False)))

        done = _iterate(Xt, At, S, n_iter, tol, order=order, on_iter=on_iter if callback is not None else None,
                        every=callback_every, progress=progress, penalty=penalty)

        raise_if_not_finite(Xt, At, S, "torch", dtype, "Coordinate descent")
        A_out = release(At.mT.contiguous(), False)
        S_out = release(S, False)
    return A_out, S_out, done


def _check_penalty_arg(penalty: Any) -> Penalty:
    """``penalty`` of :func:`_solve` / :func:`_iterate` as a validated :class:`Penalty` (None: none)."""
    if penalty is None:
        return NONE
    try:
        weights = tuple(penalty)
    except TypeError:
        raise TypeError(f"penalty must be a Penalty or 4 weights, got {type(penalty).__name__}") from None
    if len(weights) != 4:
        raise ValueError(f"penalty must have 4 weights (l1_A, l2_A, l1_S, l2_S), got {len(weights)}")
    return check_penalty(*weights)


def _iterate(Xt: Any, At: Any, S: Any, n_iter: int, tol: float | None, *, update_S: bool = True,
             order: np.random.RandomState | None = None, on_iter: Callable[[int], bool] | None = None,
             every: int = 1, progress: bool = False, penalty: Penalty | None = None) -> int:
    """scikit-learn's CD iterations on ``Xt (b, m, t)``, ``At = Aᵀ (b, n, m)``, ``S (b, n, t)``, in place.

    One iteration sweeps A's components, then S's with the new A (S stays
    fixed with ``update_S=False``: its products with X are then formed once).
    ``tol=None`` runs ``n_iter`` iterations; otherwise a problem has
    converged once its violation over the first iteration's is ``<= tol``
    (or the first one's is 0), and the run stops after the first iteration
    at which all have. ``on_iter(done)``, called after every ``every``
    iterations, returning True stops too. Returns the number of iterations run.

    ``penalty`` (:class:`fastmu.penalty.Penalty`, None for none): A's sweeps
    run on ``S Sᵀ + l2_A I`` and ``S Xᵀ − l1_A``, S's on ``AᵀA + l2_S I``
    and ``AᵀX − l1_S``, as scikit-learn's; with ``update_S=False`` only A's
    weights are used.

    On CPU tensors with S updated (:func:`cd`, ``NMF(solver="cd")``'s fit),
    the iterations run in the fused Numba kernel (:mod:`fastmu.kernels.cpu_cd`,
    one pass over X per iteration); with S fixed (``transform``), without
    callback or progress bar, in its sweep kernel
    (:func:`fastmu.kernels.cpu_cd.cd_sweeps`); otherwise as torch operations,
    on any device. ``order``'s permutations are drawn as the torch path draws
    them, one per sweep, A's before S's, and only for sweeps that run.
    """
    import torch

    from fastmu import fork_safety

    penalty = _check_penalty_arg(penalty)
    if Xt.device.type == "cpu":  # the kernel, or torch's OpenMP, in a forked child
        fork_safety.check_cpu_kernels_usable()
    fusable = (Xt.device.type == "cpu" and Xt.dtype in (torch.float32, torch.float64)
               and At.dtype == S.dtype == Xt.dtype)
    if fusable and update_S and S.is_contiguous():
        return _iterate_fused(Xt, At, S, n_iter, tol, on_iter, every, progress, penalty, order)
    if fusable and not update_S and At.is_contiguous() and on_iter is None and not progress:
        return _iterate_a_fused(Xt, At, S, n_iter, tol, penalty, order)
    l1_A, l2_A, l1_S, l2_S = penalty
    want_violation = tol is not None
    if not update_S:
        G_a, P_a = torch.bmm(S, S.mT), torch.bmm(S, Xt.mT)
    stop = _Stopping(tol)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_iter, desc="CD", unit="it")
    done = 0
    try:
        while done < n_iter:
            if update_S:  # A: G = S Sᵀ, P = (X Sᵀ)ᵀ = S Xᵀ
                G_a, P_a = torch.bmm(S, S.mT), torch.bmm(S, Xt.mT)
            violation = _ordered_sweep(At, G_a, P_a, want_violation, order, l1_A, l2_A)
            if update_S:  # S with the new A: G = Aᵀ A, P = Aᵀ X
                v_s = _ordered_sweep(S, torch.bmm(At, At.mT), torch.bmm(At, Xt), want_violation, order,
                                     l1_S, l2_S)
                violation = violation + v_s if want_violation else None
            done += 1
            if bar is not None:
                bar.update(1)
            if on_iter is not None and done % every == 0 and on_iter(done):
                break
            if want_violation and stop(violation.cpu().numpy()):
                break
    finally:
        if bar is not None:
            bar.close()
    return done


class _Stopping:
    """scikit-learn's CD stopping rule over a batch: called with each iteration's violations
    (one per problem), True once every problem has had one at most ``tol`` times its
    first (or a first of 0)."""

    def __init__(self, tol: float | None) -> None:
        self.tol = tol
        self.first: np.ndarray | None = None
        self.converged: np.ndarray | None = None

    def __call__(self, violation: np.ndarray) -> bool:
        if self.first is None:
            self.first = violation
            self.converged = np.zeros(violation.shape, dtype=bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.converged |= (self.first == 0) | (violation / self.first <= self.tol)
        return bool(self.converged.all())


def _iterate_fused(Xt: Any, At: Any, S: Any, n_iter: int, tol: float | None,
                   on_iter: Callable[[int], bool] | None, every: int, progress: bool,
                   penalty: Penalty = NONE, order: np.random.RandomState | None = None) -> int:
    """:func:`_iterate` on the CPU kernel: calls of :func:`fastmu.kernels.cpu_cd.cd_run` of as
    many iterations as the stopping rule, the callback and the progress bar allow (one at a
    time under ``tol``, since a batch stops at the first iteration where all have converged),
    with ``P``, ``G`` carried from call to call, so slicing adds no pass over X (the kernel
    applies the penalty as it reads them, so they carry over unshifted). A tall X runs on
    its transpose (:mod:`fastmu.baselines.cd_transposed`)."""
    import numba
    import torch

    from fastmu import cpu_threads, fork_safety
    from fastmu.baselines.cd_transposed import new_cd_run

    if n_iter == 0:
        return 0
    X = np.ascontiguousarray(Xt.detach().numpy())
    A = np.ascontiguousarray(At.detach().mT.numpy())  # the kernel's layout, (b, m, n)
    Sn = S.detach().numpy()  # contiguous (the callers make it so): updated in place
    b, n = X.shape[0], A.shape[2]
    step = 1 if tol is not None else (every if on_iter is not None else n_iter)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_iter, desc="CD", unit="it")
        step = min(step, max(1, n_iter // 100))
    stop = _Stopping(tol)
    nthreads = numba.config.NUMBA_NUM_THREADS
    kernel_run = new_cd_run(X, A, Sn, tuple(float(w) for w in penalty), nthreads)
    last = np.zeros(b)  # the violations of the last iteration run

    def advance(kk: int) -> None:  # the next kk iterations (a slice: never all of a huge n_iter at once)
        viol = np.zeros((kk, b))
        kernel_run.run(kk, viol, None if order is None else _permutations(order, kk, 2, n))
        last[...] = viol[-1]

    def publish() -> None:  # the current factors into At and S
        kernel_run.sync()
        At.copy_(torch.from_numpy(A).mT)

    # Like MU's engine: schedules with a parallel region per iteration run on as many
    # threads as measures fastest (fastmu.cpu_threads); the bits do not change.
    governor = cpu_threads.governor_for(kernel_run.schedule)
    slice_k = 1  # iterations per call of an ungoverned run (cpu_threads.run_in_slices)
    done = 0
    try:
        while done < n_iter:
            k = max(1, min(step, n_iter - done))
            if on_iter is not None:  # end the call at the next callback
                k = min(k, every - done % every)
            with fork_safety.cpu_kernels():  # outside the governor: it must not time a wait for the lock
                if governor is None:  # slices keep Ctrl-C working in a long run
                    slice_k = cpu_threads.run_in_slices(advance, k, slice_k)
                else:
                    governor.run(advance, k)
            done += k
            if bar is not None:
                bar.update(k)
            if on_iter is not None and done % every == 0:
                publish()
                if on_iter(done):
                    break
            if tol is not None and stop(last.copy()):  # k is 1 under tol; the rule keeps the first
                break
    finally:
        if bar is not None:
            bar.close()
        publish()
    return done


def _permutations(order: np.random.RandomState, k: int, sweeps: int, n: int) -> np.ndarray:
    """``k`` iterations' permutations of the ``n`` components, ``sweeps`` per iteration, drawn
    from ``order`` in the torch path's order: ``(k, sweeps, n)``, or ``(k, n)`` for one sweep."""
    out = np.empty((k, sweeps, n), np.int64)
    for i in range(k):
        for s in range(sweeps):
            out[i, s] = order.permutation(n)
    return out if sweeps > 1 else out[:, 0]


def _iterate_a_fused(Xt: Any, At: Any, S: Any, n_iter: int, tol: float | None, penalty: Penalty = NONE,
                     order: np.random.RandomState | None = None) -> int:
    """:func:`_iterate` with S fixed on the CPU: ``P = S Xᵀ`` and ``G = S Sᵀ`` formed once, then
    :func:`fastmu.kernels.cpu_cd.cd_sweeps` over ``At (b, n, m)`` in place, in slices of about
    :data:`fastmu.cpu_threads.SLICE_S` (Ctrl-C), the stopping rule's state carried between them.
    With ``order`` and ``tol`` one sweep per call, so that no permutation is drawn for a sweep
    that the rule stops before."""
    import torch

    from fastmu import cpu_threads, fork_safety
    from fastmu.kernels import cpu_cd

    if n_iter == 0:
        return 0
    F = At.detach().numpy()  # contiguous (checked by the caller): updated in place
    P = torch.bmm(S, Xt.mT).contiguous().numpy()
    G = torch.bmm(S, S.mT).contiguous().numpy()
    b = F.shape[0]
    first, converged = np.full(b, -1.0), np.zeros(b, np.bool_)
    rule = -1.0 if tol is None else float(tol)
    done = 0

    n = F.shape[1]

    def sweeps(k: int) -> bool:
        nonlocal done
        viol = np.zeros((k, b))  # the slice's own: max_iter may be far more than will run
        perms = cpu_cd.natural_order(k, n, sweeps=1) if order is None else _permutations(order, k, 1, n)
        ran = cpu_cd.cd_sweeps(F, P, G, float(penalty.l1_A), float(penalty.l2_A), k, rule, viol, first,
                               converged, perms)
        done += ran
        return rule >= 0 and bool(converged.all())

    with fork_safety.cpu_kernels():
        if order is not None and tol is not None:
            while done < n_iter and not sweeps(1):
                pass
        else:
            cpu_threads.run_in_slices(sweeps, n_iter)
    return done


def _ordered_sweep(F: Any, G: Any, P: Any, want_violation: bool, order: np.random.RandomState | None,
                   l1: float = 0.0, l2: float = 0.0) -> Any:
    """:func:`_sweep` (penalised by ``l1``, ``l2``) in natural order, or in the order of
    ``order.permutation(n)``."""
    if order is None:
        return _sweep(F, G, P, want_violation, l1, l2)
    import torch

    # a sweep in the order p is the natural-order sweep of the permuted problem (whose
    # penalty is the same: l2 I permutes to itself, l1 is the same for every entry)
    p = torch.as_tensor(np.asarray(order.permutation(F.shape[1]), dtype=np.int64), device=F.device)
    Fp = F[:, p].contiguous()
    v = _sweep(Fp, G[:, p][:, :, p].contiguous(), P[:, p].contiguous(), want_violation, l1, l2)
    F[:, p] = Fp
    return v


def _sweep(F: Any, G: Any, P: Any, want_violation: bool, l1: float = 0.0, l2: float = 0.0) -> Any:
    """One cyclic CD pass over the rows of ``F (b, n, r)`` in place, for ``min ½‖·‖²``
    with Gram matrix ``G (b, n, n)`` and linear term ``P (b, n, r)``, penalised by
    ``l1 ‖F‖₁ + ½ l2 ‖F‖²``: scikit-learn's sweep on ``G + l2 I`` and ``P − l1``.

    ``G`` and ``P`` are not modified (the shifts go on copies), so a caller may
    reuse them. Returns the per-problem sum of |projected gradient| (float64,
    shape (b,)) when ``want_violation``, else None.
    """
    import torch

    # in the tensors' dtype, as scikit-learn's in-place shifts of HHt and XHt;
    # skipped at 0, so that an unpenalised sweep is today's, bit for bit
    if l2 != 0.0:
        G = G.clone()
        G.diagonal(dim1=-2, dim2=-1).add_(l2)
    if l1 != 0.0:
        P = P - l1
    b, n, _ = F.shape
    violation = torch.zeros(b, dtype=torch.float64, device=F.device) if want_violation else None
    for k in range(n):
        # row k of G, as scikit-learn indexes it (HHt[t, r]): G is symmetric
        # only up to rounding here
        grad = torch.bmm(G[:, k : k + 1, :], F).squeeze(1) - P[:, k, :]
        f = F[:, k, :]
        if want_violation:
            pg = torch.where(f == 0, grad.clamp(max=0), grad)
            violation += pg.abs().sum(dim=-1, dtype=torch.float64)
        hess = G[:, k, k].unsqueeze(-1)
        step = torch.clamp(f - grad / torch.where(hess != 0, hess, 1), min=0)
        F[:, k, :] = torch.where(hess != 0, step, f)
    return violation
