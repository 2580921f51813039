"""Fused coordinate-descent NMF kernels for the CPU (Numba, parallel).

scikit-learn's ``solver="cd"`` update (cyclic; the HALS update), with its
L1/L2 regularisation (:mod:`fastmu.penalty`), with one pass over X per
iteration, built from the MU kernels' parts (:mod:`fastmu.kernels.cpu`).

The S half of a CD iteration is column-separable: pixel j's components are
updated in turn from ``Aᵀ X_j`` and ``AᵀA`` alone. So, per column block of
pixels, as in MU: ``R = AᵀX`` (the block's one read from memory), the S
update, then ``P += X S'ᵀ`` and ``G += S'S'ᵀ`` (the A half of the next
iteration needs them) while the block is still in cache. The A half, rows
independent, each from ``P = X Sᵀ`` and ``G = S Sᵀ``, is m·n² work per
problem. The two schedules of :func:`fastmu.kernels.cpu.mu_run` (problem-
major, block-parallel) carry over.

Each coordinate's step is scikit-learn's ``_update_cdnmf_fast``: with
``grad = -P[i, k] + Σ_r G[k, r] F[i, r]`` (r in order, earlier components of
the row already updated), the projected gradient ``pg`` (``min(grad, 0)`` at
a coordinate that is 0) is added to the iteration's violation, and, unless
``G[k, k] = 0``, ``F[i, k] ← max(F[i, k] − grad / G[k, k], 0)``.

Penalties are scikit-learn's (``_update_coordinate_descent``): a sweep runs
on ``G + l2 I`` and ``P − l1`` (A's with ``l1_A``, ``l2_A``; S's on
``H = AᵀA``, ``R = AᵀX`` with ``l1_S``, ``l2_S``), its violation included.
The shifts are applied where the sweep reads ``G`` and ``P``
(:func:`_s_cd_block`), never stored: ``P`` and ``G`` keep their meaning,
``X Sᵀ`` and ``S Sᵀ``, between calls (``pg_valid``), and a Gram matrix
summed from partials is shifted once.

Arrays are C-contiguous and share one float dtype: ``X (b, m, t)``,
``A (b, m, n)``, ``S (b, n, t)``, ``P (b, m, n)``, ``G (b, n, n)``; X's rows
may be longer than t, as in :mod:`fastmu.kernels.cpu`.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

from fastmu.kernels.cpu import (
    _FM,
    _S_UNIT,
    _chunk_rows,
    _copy,
    _block_parallel_finish,
    _block_parallel_pg,
    _block_parallel_state,
    _chunk_pixels,
    _gram_block,
    _hot,
    _p_block,
    _pg_range,
    _r_block,
    _reduce_problem,
    _rows_p,
    _rows_r,
    _rows_state,
    _s_unit,
    _sum_chunks,
    _sum_units,
    block_length,
    pixel_chunking,
    row_chunks,
    schedule,
)
from fastmu.kernels.fpenv import enter_ftz, leave_ftz


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _a_cd(Ap, Pp, Gp, Hp, Ft, Rt, ga, l1, l2, perm):
    """One CD sweep over the components of A (in place) from ``P − l1``, ``G + l2 I``;
    then ``H = AᵀA`` (unshifted: S's sweep adds its own weights).

    A's rows are independent, so the sweep is S's (:func:`_s_cd_block`) on
    the transposed problem: ``Aᵀ`` and ``Pᵀ`` are copied into the scratch
    ``Ft``, ``Rt`` (n × m) so that it runs vectorised over the rows (tall
    problems have many). ``ga`` (≥ m) is scratch. Returns the sweep's
    violation (float64).
    """
    m, n = Ap.shape
    for i in range(m):
        for k in range(n):
            Ft[k, i] = Ap[i, k]
            Rt[k, i] = Pp[i, k]
    v = _s_cd_block(Gp, Ft, 0, m, Rt, ga, l1, l2, perm)
    for i in range(m):
        for k in range(n):
            Ap[i, k] = Ft[k, i]
    Hp[:, :] = 0
    _gram_block(Ft, n, m, Hp)
    return v


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _s_cd_block(Hp, Sp, j0, L, R, gk, l1, l2, perm):
    """CD sweep over the components of S's pixels ``j0 … j0+L−1`` (in place), from
    ``R[:, :L] = (AᵀX)`` of the block and ``H = AᵀA``, penalised: the sweep of
    scikit-learn on ``R − l1`` and ``H + l2 I``; ``gk`` (≥ L) is scratch.

    The shifts are applied here, as the sweep reads R and H, so that neither
    is modified (the callers' P, G carry over between calls unshifted). They
    are rounded to the arrays' dtype first, as scikit-learn's in-place
    ``HHt.flat[::n+1] += l2`` and ``XHt -= l1`` round them, and so that the
    float32 loop stays float32. With zero weights every value is today's:
    ``r − 0`` is ``r`` and ``h + 0`` is ``h`` (a Gram diagonal is not −0).

    Vectorised over the pixels: component k's gradient for the whole block,
    then its step, the components in the order ``perm`` (``arange(n)``, or
    scikit-learn's ``shuffle=True`` permutation). Returns the block's
    violation (float64).
    """
    n = Sp.shape[0]
    z = Sp.dtype.type(0)
    l1c = Sp.dtype.type(l1)
    l2c = Sp.dtype.type(l2)
    v = 0.0
    g = gk[:L]
    for kk in range(n):
        k = perm[kk]
        hess = Hp[k, k] + l2c
        rk = R[k, :L]
        for jj in range(L):
            g[jj] = -(rk[jj] - l1c)
        for r in range(n):  # rows r < k already hold this sweep's values
            h = Hp[k, r]
            if r == k:
                h += l2c
            sr = Sp[r, j0 : j0 + L]
            for jj in range(L):
                g[jj] += h * sr[jj]
        sk = Sp[k, j0 : j0 + L]
        step = hess != 0
        for jj in range(L):
            gr = g[jj]
            s = sk[jj]
            v += abs(min(gr, z) if s == 0 else gr)  # the projected gradient before the step
            if step:
                sk[jj] = max(s - gr / hess, z)
    return v


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _cd_chunk(Xp, Ap, Hp, Sp, j0, L, Pc, Gc, R, gk, hot, l1, l2, perm):
    """S's CD sweep on one column block (on ``AᵀX − l1``, ``H + l2 I``: S's weights), then
    its ``X S'ᵀ``, ``S'S'ᵀ`` (unshifted) added to ``Pc``, ``Gc``.

    Returns the block's violation.
    """
    m = Xp.shape[0]
    n = Sp.shape[0]
    _r_block(Xp, Ap, m, n, j0, L, R, hot)
    v = _s_cd_block(Hp, Sp, j0, L, R, gk, l1, l2, perm)
    for k in range(n):  # the new S, contiguous, for the fused second use of the block
        for jj in range(L):
            R[k, jj] = Sp[k, j0 + jj]
    _p_block(Xp, R, m, n, j0, L, Pc)
    _gram_block(R, n, L, Gc)
    return v


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _cd_rows(X, A, S, P, G, n_iter, pg_valid, viol, nthreads, cpp, pen, order):
    """:func:`cd_run` with the rows shared out (``cpp`` chunks per problem; :func:`row_chunks`).

    Per iteration two parallel regions. Over the chunks: the chunk's rows of
    ``P`` from the current S (skipped where carried in), A's sweep on its rows,
    then its part of ``AᵀX`` and ``AᵀA``, its rows of X still in cache. Over
    blocks of pixels: the parts summed in chunk order, S's sweep, and the
    block's part of ``S'S'ᵀ``. After the last iteration one more pass over the
    chunks leaves ``P`` for the returned S. Violations: A's from the chunks,
    S's from the pixel blocks, each added in order. ``pen``: the weights
    ``(l1_A, l2_A, l1_S, l2_S)``; S's sweep reads the summed ``AᵀA``, so its
    ``l2_S`` goes on once, not on each chunk's part.
    """
    b, m = X.shape[0], X.shape[1]
    n = A.shape[2]
    dt = X.dtype
    l1a, l2a, l1s, l2s = pen
    rpc, tb, nsu, Rpart, Hpart, Gpart, Rsum, H, Rb = _rows_state(X, A, S, G, pg_valid, cpp, nthreads)
    vpart = np.zeros(b * cpp, np.float64)
    vs = np.zeros(b * nsu, np.float64)
    Ft = np.empty((nthreads, n, rpc), dt)
    Rt = np.empty((nthreads, n, rpc), dt)
    ga = np.empty((nthreads, max(rpc, _S_UNIT)), dt)
    for it in range(n_iter + 1):
        last = it == n_iter
        for c in prange(b * cpp):
            fp = enter_ftz()
            p, r0, r1 = _chunk_rows(c, cpp, rpc, m)
            tid = nb.get_thread_id()
            Xc = X[p, r0:r1]
            if it > 0 or not pg_valid:
                _rows_p(Xc, S[p], P[p, r0:r1], tb, Rb[tid])
            if not last:
                Ac = A[p, r0:r1]
                vpart[c] = _a_cd(Ac, P[p, r0:r1], G[p], Hpart[c], Ft[tid], Rt[tid], ga[tid], l1a, l2a,
                                 order[it, 0])
                _rows_r(Xc, Ac, Rpart[c], tb, Rb[tid])
            leave_ftz(fp)
        if last:
            break
        _sum_chunks(Rpart, Hpart, cpp, Rsum, H)
        for u in prange(b * nsu):
            fp = enter_ftz()
            tid = nb.get_thread_id()
            R = Rb[tid]
            p, j0, L = _s_unit(u, nsu, Rsum, R)
            vs[u] = _s_cd_block(H[p], S[p], j0, L, R, ga[tid], l1s, l2s, order[it, 1])
            for k in range(n):  # the new S, contiguous
                for jj in range(L):
                    R[k, jj] = S[p, k, j0 + jj]
            Gpart[u] = 0
            _gram_block(R, n, L, Gpart[u])
            leave_ftz(fp)
        _sum_units(Gpart, nsu, G)
        for p in range(b):  # A's violation (chunk order), S's (unit order)
            va = 0.0
            for c in range(p * cpp, (p + 1) * cpp):
                va += vpart[c]
            v = 0.0
            for u in range(p * nsu, (p + 1) * nsu):
                v += vs[u]
            viol[it, p, 0] = va
            viol[it, p, 1] = v


def natural_order(n_iter: int, n: int, sweeps: int = 2) -> np.ndarray:
    """The components in their natural order for every sweep: ``order`` of :func:`cd_run`
    (``sweeps=2``, shape ``(n_iter, 2, n)``) or, with ``sweeps=1``, of :func:`cd_sweeps`."""
    shape = (n_iter, sweeps, n) if sweeps > 1 else (n_iter, n)
    return np.broadcast_to(np.arange(n, dtype=np.int64), shape).copy()


def cd_run(X, A, S, P, G, n_iter, pg_valid, viol, nthreads, penalty=(0.0, 0.0, 0.0, 0.0), order=None) -> None:
    """Run ``n_iter`` fused CD iterations (A's sweep, then S's) in place on ``A`` and ``S``.

    Parameters
    ----------
    X, A, S
        See the module docstring. ``A`` and ``S`` are overwritten.
    P, G
        ``X Sᵀ`` and ``S Sᵀ`` of the current S: read when ``pg_valid`` (they
        carry over between calls), recomputed otherwise; on return they hold
        the values for the returned S. Never shifted by the penalty, so a
        run continued with ``pg_valid`` from a penalised call is the same run.
    n_iter
        Number of iterations.
    viol
        ``(≥ n_iter, b, 2)`` float64: ``viol[it, p, 0]`` receives problem
        p's violation of iteration ``it`` in A's sweep, ``viol[it, p, 1]`` in
        S's; scikit-learn's is their sum. (Apart, so that a run on ``Xᵀ``,
        whose sweeps are the other way round, can pair them:
        :mod:`fastmu.baselines.cd_transposed`.)
    nthreads
        ``numba.config.NUMBA_NUM_THREADS`` (sizes the per-thread scratch).
    penalty
        ``(l1_A, l2_A, l1_S, l2_S)``, finite and ``>= 0``
        (:class:`fastmu.penalty.Penalty`, or any sequence of four reals):
        the sweeps are scikit-learn's regularised ones (module docstring).
        Zeros (the default) give the unpenalised iterates bit for bit.
    order
        ``(≥ n_iter, 2, n)`` integers: iteration ``it`` sweeps A's components
        in the order ``order[it, 0]`` and S's in ``order[it, 1]``
        (scikit-learn's ``shuffle=True``: a permutation for each sweep); None
        (the default) for the natural order, every sweep.

    Notes
    -----
    Three schedules, chosen as :func:`fastmu.kernels.cpu.mu_run` chooses
    (:func:`fastmu.kernels.cpu.schedule`): problem-major, block-parallel, and,
    for a tall X with too few column blocks to go round the threads, rows
    shared out (:func:`row_chunks`); each a compiled function of its own, so
    that a first call compiles only the one it runs.
    """
    b, m = X.shape[0], X.shape[1]
    t = S.shape[2]
    # a plain tuple of floats: one compiled signature, whatever sequence (a Penalty is a
    # NamedTuple, which Numba would type, and compile for, separately)
    l1a, l2a, l1s, l2s = penalty
    pen = (float(l1a), float(l2a), float(l1s), float(l2s))
    if order is None:
        order = natural_order(n_iter, A.shape[2])
    which = schedule(b, m, t, X.itemsize, nthreads)  # MU's choice, for the same reasons
    if which == "rows":  # tall X, few pixels: share out the rows
        cpp = row_chunks(b, m, t, X.itemsize, nthreads)
        _cd_rows(X, A, S, P, G, n_iter, pg_valid, viol, nthreads, cpp, pen, order)
    elif which == "problem-major":
        _cd_problem_major(X, A, S, P, G, n_iter, pg_valid, viol, nthreads, pen, order)
    else:
        _cd_block_parallel(X, A, S, P, G, n_iter, pg_valid, viol, nthreads, pen, order)


@nb.njit(cache=True)
def _cd_scratch(X, n, nthreads):
    """Per-thread ``R``, ``gk`` (S sweep) and ``Ft``, ``Rt``, ``ga`` (A sweep) scratch."""
    m = X.shape[1]
    tb = block_length(m, X.itemsize)
    dt = X.dtype
    return (np.empty((nthreads, n, tb), dt), np.empty((nthreads, tb), dt), np.empty((nthreads, n, m), dt),
            np.empty((nthreads, n, m), dt), np.empty((nthreads, m), dt))


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _cd_problem_major(X, A, S, P, G, n_iter, pg_valid, viol, nthreads, pen, order):
    """Problem-major: each thread runs every iteration of its own problems (``pen``: the
    weights ``(l1_A, l2_A, l1_S, l2_S)``)."""
    l1a, l2a, l1s, l2s = pen
    b, m = X.shape[0], X.shape[1]
    t = S.shape[2]
    n = A.shape[2]
    tb = block_length(m, X.itemsize)
    nblk = (t + tb - 1) // tb
    H = np.empty((b, n, n), X.dtype)
    R, gk, Ft, Rt, ga = _cd_scratch(X, n, nthreads)  # Ft: A's sweep, transposed
    hot = _hot(b, m, t, X.itemsize, n_iter, True)
    for p in prange(b):
        fp = enter_ftz()
        tid = nb.get_thread_id()
        Pp = P[p]
        Gp = G[p]
        if not pg_valid:
            Pp[:, :] = 0
            Gp[:, :] = 0
            _pg_range(X[p], S[p], 0, t, tb, Pp, Gp, R[tid])
        for it in range(n_iter):
            viol[it, p, 0] = _a_cd(A[p], Pp, Gp, H[p], Ft[tid], Rt[tid], ga[tid], l1a, l2a, order[it, 0])
            Pp[:, :] = 0
            Gp[:, :] = 0
            v = 0.0
            for blk in range(nblk):
                j0 = blk * tb
                v += _cd_chunk(X[p], A[p], H[p], S[p], j0, min(tb, t - j0), Pp, Gp, R[tid], gk[tid], hot,
                               l1s, l2s, order[it, 1])
            viol[it, p, 1] = v
        leave_ftz(fp)


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _cd_block_parallel(X, A, S, P, G, n_iter, pg_valid, viol, nthreads, pen, order):
    """Block-parallel, as MU's (:func:`fastmu.kernels.cpu._mu_block_parallel`).

    Every chunk sums its problem's partial P, G and repeats the tiny A sweep
    itself (the same inputs give every chunk the same A); A and the partials
    are double-buffered. A's violation is counted by the problem's first
    chunk; the chunks' sums are added in chunk order. ``pen``: the weights
    ``(l1_A, l2_A, l1_S, l2_S)``, applied by the sweeps to the summed P, G and
    each chunk's own ``H``, never to the partials.
    """
    l1a, l2a, l1s, l2s = pen
    b, m = X.shape[0], X.shape[1]
    t = S.shape[2]
    n = A.shape[2]
    tb = block_length(m, X.itemsize)
    R, gk, Ft, Rt, ga = _cd_scratch(X, n, nthreads)
    cpp, pc = pixel_chunking(t, b, nthreads)
    hot = _hot(b, m, t, X.itemsize, n_iter, False)
    Ppart, Gpart, Abuf, (Al, Pl, Gl, Hl, _) = _block_parallel_state(A, P, G, cpp, nthreads, pg_valid)
    vpart = np.zeros(b * cpp, np.float64)
    vfirst = np.zeros(b, np.float64)
    if not pg_valid:
        _block_parallel_pg(X, S, Ppart[0], Gpart[0], cpp, pc, tb, R)

    for it in range(n_iter):
        src = it % 2
        dst = 1 - src
        for c in prange(b * cpp):
            fp = enter_ftz()
            p = c // cpp
            tid = nb.get_thread_id()
            _reduce_problem(Ppart[src], Gpart[src], p * cpp, cpp, Pl[tid], Gl[tid])
            _copy(Al[tid], Abuf[src, p])
            va = _a_cd(Al[tid], Pl[tid], Gl[tid], Hl[tid], Ft[tid], Rt[tid], ga[tid], l1a, l2a, order[it, 0])
            if c % cpp == 0:  # every chunk's A is the same: the first one's is kept, and its violation
                _copy(Abuf[dst, p], Al[tid])
                vfirst[p] = va
            Ppart[dst, c] = 0
            Gpart[dst, c] = 0
            v = 0.0
            c0, c1 = _chunk_pixels(c, cpp, pc, t)
            for j0 in range(c0, c1, tb):
                v += _cd_chunk(X[p], Al[tid], Hl[tid], S[p], j0, min(tb, c1 - j0), Ppart[dst, c], Gpart[dst, c],
                               R[tid], gk[tid], hot, l1s, l2s, order[it, 1])
            vpart[c] = v
            leave_ftz(fp)
        for p in range(b):
            acc = 0.0
            for c in range(p * cpp, (p + 1) * cpp):
                acc += vpart[c]
            viol[it, p, 0] = vfirst[p]
            viol[it, p, 1] = acc
    _block_parallel_finish(A, P, G, Abuf, Ppart, Gpart, cpp, n_iter, True)


#: pixels per parallel work item of :func:`cd_sweeps`
SWEEP_PIXELS = 2048


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def cd_sweeps(F, P, G, l1, l2, n_iter, tol, viol, first, converged, order):
    """Up to ``n_iter`` CD sweeps over the components of ``F (b, n, r)`` (in place) from a fixed
    linear term ``P (b, n, r)`` and Gram matrix ``G (b, n, n)``: scikit-learn's
    ``_fit_coordinate_descent`` with ``update_H=False`` (``transform``), F being Wᵀ.

    Each sweep is :func:`_s_cd_block`'s on ``P − l1`` and ``G + l2 I``, its
    columns shared out in runs of :data:`SWEEP_PIXELS` (they are independent),
    the runs' violations added in order into ``viol[it, p]`` (float64,
    ``(≥ n_iter, b)``). With ``tol ≥ 0`` the sweeps stop after the first one
    at which every problem has had a violation at most ``tol`` times its first
    (or a first of 0), scikit-learn's rule; ``tol < 0`` runs all ``n_iter``.
    ``first`` (float64, ``(b,)``, negative until the first sweep) and
    ``converged`` (bool, ``(b,)``) carry that rule's state from call to call.
    ``order (≥ n_iter, n)``: sweep ``it`` visits the components in the order
    ``order[it]`` (:func:`natural_order` with ``sweeps=1``, or permutations).
    Returns the number of sweeps run. Never reads X: ``P`` and ``G`` are formed once.
    """
    b, n, r = F.shape
    dt = F.dtype
    per = (r + SWEEP_PIXELS - 1) // SWEEP_PIXELS
    vpart = np.zeros(b * per, np.float64)
    for it in range(n_iter):
        for c in prange(b * per):
            fp = enter_ftz()
            p = c // per
            j0 = (c % per) * SWEEP_PIXELS
            L = min(r, j0 + SWEEP_PIXELS) - j0
            vpart[c] = _s_cd_block(G[p], F[p], j0, L, P[p, :, j0:j0 + L], np.empty(L, dt), l1, l2, order[it])
            leave_ftz(fp)
        every = True
        for p in range(b):
            v = 0.0
            for c in range(p * per, (p + 1) * per):
                v += vpart[c]
            viol[it, p] = v
            if first[p] < 0:
                first[p] = v
            if first[p] == 0 or v / first[p] <= tol:
                converged[p] = True
            every = every and converged[p]
        if tol >= 0 and every:
            return it + 1
    return n_iter
