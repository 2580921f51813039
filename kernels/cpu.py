"""Fused multiplicative-update kernels for the CPU (Numba, parallel).

One pass over X per iteration (DESIGN §3). The S update of iteration l is
fused with the reductions ``P = X S'ᵀ`` and ``G = S' S'ᵀ`` that the A update
of iteration l+1 needs, so each column block of X is read once per iteration
while it sits in L1/L2.

Work is split into *chunks*: one column block of ``_TB`` pixels of one
problem. Chunks run in parallel (``prange``); each writes its partial P and G
to its own slot, and the slots are summed per problem in a fixed order, so
results do not depend on the thread schedule. The tiny A update (m·n²) runs
per problem.

Speed comes from the loop order: the pixel index is innermost and contiguous
(it vectorises), four rows of X are combined per pass over the block so that
each loaded accumulator row feeds four FMAs, and all scratch is allocated
once per call, outside the parallel loops.

All arrays are C-contiguous and share one float dtype; ``X (b, m, t)``,
``A (b, m, n)``, ``S (b, n, t)``, ``W (bw, m, n)`` with ``bw`` 1 (shared) or
``b`` (per problem).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

#: pixels per column block: 65 rows × 256 float32 = 66 kB of X, resident in L2
#: between the S update and the P accumulation; measured best of 128/256/512.
_TB = 256

# Reassociation lets LLVM vectorise the reductions over pixels; no 'arcp' or
# 'nnan': divisions stay exact IEEE divisions and NaN propagation is kept.
_FM = {"reassoc", "contract", "nsz"}


@nb.njit(cache=True, fastmath=_FM, inline="always")
def _x_s_block(Xp, Srow_blk, m, j0, L, Pc, k):
    """``Pc[:, k] += X[:, j0:j0+L] @ s`` with ``s`` a block row of S (4 rows of X at a time)."""
    i = 0
    while i + 4 <= m:
        x0 = Xp[i, j0 : j0 + L]
        x1 = Xp[i + 1, j0 : j0 + L]
        x2 = Xp[i + 2, j0 : j0 + L]
        x3 = Xp[i + 3, j0 : j0 + L]
        a0 = Pc.dtype.type(0)
        a1 = Pc.dtype.type(0)
        a2 = Pc.dtype.type(0)
        a3 = Pc.dtype.type(0)
        for jj in range(L):
            s = Srow_blk[jj]
            a0 += x0[jj] * s
            a1 += x1[jj] * s
            a2 += x2[jj] * s
            a3 += x3[jj] * s
        Pc[i, k] += a0
        Pc[i + 1, k] += a1
        Pc[i + 2, k] += a2
        Pc[i + 3, k] += a3
        i += 4
    while i < m:
        x0 = Xp[i, j0 : j0 + L]
        a0 = Pc.dtype.type(0)
        for jj in range(L):
            a0 += x0[jj] * Srow_blk[jj]
        Pc[i, k] += a0
        i += 1


@nb.njit(cache=True, fastmath=_FM, inline="always")
def _gram_block(Sb, n, L, Gc):
    """``Gc += Sb[:, :L] @ Sb[:, :L]ᵀ`` (upper triangle computed, mirrored)."""
    for k in range(n):
        for l in range(k, n):
            acc = Gc.dtype.type(0)
            for jj in range(L):
                acc += Sb[k, jj] * Sb[l, jj]
            Gc[k, l] += acc
            if l != k:
                Gc[l, k] += acc


@nb.njit(cache=True, fastmath=_FM)
def _pg_chunk(Xp, Sp, j0, L, Pc, Gc, Sb):
    """Partial ``P = X Sᵀ`` and ``G = S Sᵀ`` over one column block (no S update)."""
    m = Xp.shape[0]
    n = Sp.shape[0]
    Pc[:, :] = 0
    Gc[:, :] = 0
    for k in range(n):
        for jj in range(L):
            Sb[k, jj] = Sp[k, j0 + jj]
    for k in range(n):
        _x_s_block(Xp, Sb[k], m, j0, L, Pc, k)
    _gram_block(Sb, n, L, Gc)


@nb.njit(cache=True, fastmath=_FM)
def _s_chunk(Xp, Ap, Hp, Sp, j0, L, eps, accumulate, Pc, Gc, R, Dk):
    """S update on one column block, then (optionally) its partial P and G.

    ``S'_j = S_j ⊙ (A'ᵀ X_j) ⊘ (H S_j + ε)`` for the block's pixels j, with
    ``H = A'ᵀ A'`` precomputed; ``R`` (n × _TB) and ``Dk`` (_TB) are scratch.
    """
    m = Xp.shape[0]
    n = Sp.shape[0]
    # R = A'ᵀ X_blk, four rows of X per sweep over the block.
    for k in range(n):
        for jj in range(L):
            R[k, jj] = 0
    i = 0
    while i + 4 <= m:
        x0 = Xp[i, j0 : j0 + L]
        x1 = Xp[i + 1, j0 : j0 + L]
        x2 = Xp[i + 2, j0 : j0 + L]
        x3 = Xp[i + 3, j0 : j0 + L]
        for k in range(n):
            c0 = Ap[i, k]
            c1 = Ap[i + 1, k]
            c2 = Ap[i + 2, k]
            c3 = Ap[i + 3, k]
            r = R[k]
            for jj in range(L):
                r[jj] += c0 * x0[jj] + c1 * x1[jj] + c2 * x2[jj] + c3 * x3[jj]
        i += 4
    while i < m:
        x0 = Xp[i, j0 : j0 + L]
        for k in range(n):
            c0 = Ap[i, k]
            r = R[k]
            for jj in range(L):
                r[jj] += c0 * x0[jj]
        i += 1
    # R ← S ⊙ R ⊘ (H S + ε), row by row (old S is read for every k, so the
    # result stays in R until all rows are done).
    for k in range(n):
        for jj in range(L):
            Dk[jj] = eps
        for l in range(n):
            h = Hp[k, l]
            for jj in range(L):
                Dk[jj] += h * Sp[l, j0 + jj]
        r = R[k]
        for jj in range(L):
            r[jj] = Sp[k, j0 + jj] * r[jj] / Dk[jj]
    for k in range(n):
        for jj in range(L):
            Sp[k, j0 + jj] = R[k, jj]
    if accumulate:
        Pc[:, :] = 0
        Gc[:, :] = 0
        for k in range(n):
            _x_s_block(Xp, R[k], m, j0, L, Pc, k)
        _gram_block(R, n, L, Gc)


@nb.njit(cache=True, fastmath=_FM)
def _reduce_problem(Ppart, Gpart, c0, nblk, Pp, Gp):
    """Sum the partials of one problem's blocks, in block order."""
    Pp[:, :] = Ppart[c0]
    Gp[:, :] = Gpart[c0]
    for c in range(c0 + 1, c0 + nblk):
        Pp += Ppart[c]
        Gp += Gpart[c]


@nb.njit(cache=True, fastmath=_FM)
def _a_update(Ap, Wp, Pp, Gp, eps, Hp, Erow):
    """``A ← A ⊙ W ⊙ P ⊘ (A G + ε)`` in place (row-wise independent), then ``H = AᵀA``."""
    m, n = Ap.shape
    for i in range(m):
        for k in range(n):
            acc = eps
            for l in range(n):
                acc += Ap[i, l] * Gp[l, k]
            Erow[k] = acc
        for k in range(n):
            Ap[i, k] = Ap[i, k] * Wp[i, k] * Pp[i, k] / Erow[k]
    for k in range(n):
        for l in range(k, n):
            acc = Hp.dtype.type(0)
            for i in range(m):
                acc += Ap[i, k] * Ap[i, l]
            Hp[k, l] = acc
            Hp[l, k] = acc


@nb.njit(cache=True, parallel=True, fastmath=_FM)
def mu_run(X, A, S, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads):
    """Run ``n_iter`` fused (learned) MU iterations in place on ``A`` and ``S``.

    Parameters
    ----------
    X, A, S, W
        See the module docstring. ``A`` and ``S`` are overwritten.
    P, G
        ``(b, m, n)`` and ``(b, n, n)``: ``X Sᵀ`` and ``S Sᵀ`` of the current S.
        Read when ``pg_valid`` (they carry over between calls, so running in
        slices costs no extra pass), recomputed otherwise; on return they hold
        the values for the returned S when ``accumulate_last`` or when
        ``n_iter`` is 0.
    n_iter
        Number of iterations (A update then S update).
    eps
        ε added to every denominator.
    nthreads
        ``numba.config.NUMBA_NUM_THREADS`` (sizes the per-thread scratch; a
        run-time argument so that cached machine code stays valid).
    """
    b, m, t = X.shape
    n = A.shape[2]
    nblk = (t + _TB - 1) // _TB
    nchunks = b * nblk
    dt = X.dtype
    epsd = dt.type(eps)
    Ppart = np.empty((nchunks, m, n), dt)
    Gpart = np.empty((nchunks, n, n), dt)
    H = np.empty((b, n, n), dt)
    Erow = np.empty((b, n), dt)
    R = np.empty((nthreads, n, _TB), dt)
    Dk = np.empty((nthreads, _TB), dt)
    wstep = 0 if W.shape[0] == 1 else 1  # W shared by the batch, or one per problem

    if not pg_valid:
        for c in prange(nchunks):
            p = c // nblk
            j0 = (c % nblk) * _TB
            L = min(_TB, t - j0)
            tid = nb.get_thread_id()
            _pg_chunk(X[p], S[p], j0, L, Ppart[c], Gpart[c], R[tid])
        for p in prange(b):
            _reduce_problem(Ppart, Gpart, p * nblk, nblk, P[p], G[p])

    for it in range(n_iter):
        acc = accumulate_last or it < n_iter - 1
        for p in prange(b):
            if it > 0:
                _reduce_problem(Ppart, Gpart, p * nblk, nblk, P[p], G[p])
            _a_update(A[p], W[p * wstep], P[p], G[p], epsd, H[p], Erow[p])
        for c in prange(nchunks):
            p = c // nblk
            j0 = (c % nblk) * _TB
            L = min(_TB, t - j0)
            tid = nb.get_thread_id()
            _s_chunk(X[p], A[p], H[p], S[p], j0, L, epsd, acc, Ppart[c], Gpart[c], R[tid], Dk[tid])
    if n_iter > 0 and accumulate_last:
        for p in prange(b):
            _reduce_problem(Ppart, Gpart, p * nblk, nblk, P[p], G[p])


@nb.njit(cache=True, parallel=True, fastmath=_FM)
def objective_from_pg(X2, A, P, G, out):
    """``0.5‖X − A S‖²`` per problem from ``‖X‖²``, ``P = X Sᵀ``, ``G = S Sᵀ`` (float64).

    ``‖X − AS‖² = ‖X‖² − 2⟨A, P⟩ + ⟨AᵀA, G⟩``: no pass over X. Cancellation
    limits its accuracy to about ``eps(dtype)·‖X‖²``: fine for stopping
    tests, not for judging convergence to rounding.
    """
    b, m, n = A.shape
    for p in prange(b):
        cross = 0.0
        for i in range(m):
            for k in range(n):
                cross += float(A[p, i, k]) * float(P[p, i, k])
        quad = 0.0
        for k in range(n):
            for l in range(n):
                h = 0.0
                for i in range(m):
                    h += float(A[p, i, k]) * float(A[p, i, l])
                quad += h * float(G[p, k, l])
        out[p] = 0.5 * max(X2[p] - 2.0 * cross + quad, 0.0)
