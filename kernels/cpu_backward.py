"""Handwritten backward of one learned-MU layer on the CPU (Numba, parallel).

The layer, batched over ``b`` problems::

    P = X Sᵀ,  G = S Sᵀ,  E = A G + ε,  A' = A ⊙ W ⊙ P ⊘ E
    R = A'ᵀ X, H = A'ᵀ A', D = H S + ε, S' = S ⊙ R ⊘ D

Shapes: ``X (b, m, t)``, ``A (b, m, n)``, ``S (b, n, t)``, ``W (bw, m, n)``
with ``bw`` 1 (one W shared by the batch, NALMU) or ``b`` (one per problem,
ALMU), ``P (b, m, n)``, ``G (b, n, n)``. All arrays C-contiguous, one float
dtype (float32 or float64).

The forward
-----------
The layer's forward is the solver's fused iteration,
:func:`fastmu.kernels.cpu.mu_run` with one iteration: it hands ``P``, ``G`` of
the new S to the next layer, so a deep model reads X once per layer forward.
The products' register tiles are shared with it (``_r_8x4``, ``_p_4x4``, and with
256-bit vectors :func:`fastmu.kernels.cpu_products.p_block` for ``X gRᵀ``;
``A'ᵀX``-like products read X from memory here, where the auto-vectorised
tile is the faster: see :func:`fastmu.kernels.cpu._r_block`).

Backward
--------
Given the layer inputs ``X, A, S, W`` and ``P, G`` (``X Sᵀ`` and ``S Sᵀ``,
saved by the forward: O(m·n) per problem, and saving them spares a third pass
over X), and the upstream gradients ``gA'``, ``gS'``:

1. per problem (tiny): ``E, A', H`` recomputed from ``A, W, P, G``;
2. pass 1 over X, column-block parallel: recompute ``R`` and ``D`` for the
   block, form ``gR = gS' ⊙ S ⊘ D``, ``gU = −gS' ⊙ S' ⊘ D``, write the
   column-local part of ``gS`` (``gS' ⊙ R ⊘ D + H gU``) and accumulate the
   block's partial ``X gRᵀ`` and ``gU Sᵀ``;
3. per problem (tiny): the partials summed in block order, then
   ``gA'``, ``gA``, ``gW``, ``gP``, ``gQ``, ``gG`` (the §4 equations);
4. pass 2 over X, column-block parallel: ``gS += gPᵀ X + (gG + gGᵀ) S`` and,
   only when asked, ``gX = gP S + A' gR`` (``gR`` recomputed: no X needed).

Determinism: every reduction over pixels is split into fixed column blocks
whose partials are summed in a fixed order; the thread schedule only decides
who computes a block, never the order of a sum. ``gW`` of a shared W is
summed over the batch in problem order.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

from fastmu.kernels.cpu import _add, _copy, _p_4x4, _r_8x4  # the register tiles are shared
from fastmu.kernels.cpu_products import EXPLICIT, p_block
from fastmu.kernels.fpenv import enter_ftz, leave_ftz

#: pixels per column block: 65 rows × 1024 × 4 B = 266 kB of X stays in L2
#: between the sweeps of a block; 1024 measured 12% faster than 256 (longer
#: pixel loops amortise the per-tile setup), 2048 the same.
TB = 1024

# Reassociation lets LLVM vectorise the pixel reductions; no 'arcp'/'nnan':
# divisions stay IEEE divisions and NaN propagates (same flags as kernels/cpu.py).
_FM = {"reassoc", "contract", "nsz"}


# ---------------------------------------------------------------------------
# Micro-kernels. Each is inlined into a (non-inlined) per-block function: a
# prange body that inlines them directly measured 10× slower (Numba outlines
# the parfor body and loses the contiguity of the slices).
# ---------------------------------------------------------------------------


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _bc1(Xp, i, j0, L, C, k, R):
    """``R[k, :L] += C[i, k] X[i, j0:j0+L]`` (remainder rows / components)."""
    a = C[i, k]
    x = Xp[i, j0 : j0 + L]
    r = R[k, :L]
    for jj in range(L):
        r[jj] += a * x[jj]


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _bc1x4_init(Xp, i, j0, L, C, k0, R):
    """``R[k0:k0+4, :L] = C[i, k0:k0+4]ᵀ X[i, j0:j0+L]`` (assign: replaces zero-filling)."""
    x = Xp[i, j0 : j0 + L]
    a0 = C[i, k0]
    a1 = C[i, k0 + 1]
    a2 = C[i, k0 + 2]
    a3 = C[i, k0 + 3]
    r0 = R[k0, :L]
    r1 = R[k0 + 1, :L]
    r2 = R[k0 + 2, :L]
    r3 = R[k0 + 3, :L]
    for jj in range(L):
        v = x[jj]
        r0[jj] = a0 * v
        r1[jj] = a1 * v
        r2[jj] = a2 * v
        r3[jj] = a3 * v


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _bcast(Xp, j0, L, C, R):
    """``R[:, :L] = Cᵀ X[:, j0:j0+L]`` for ``C (m, n)``, ``R (n, ≥L)`` scratch."""
    m = Xp.shape[0]
    n = C.shape[1]
    n4 = n - n % 4
    m8 = m - m % 8
    for k0 in range(0, n4, 4):
        # The leftover rows (m = 65: one) go first and *assign* R: one sweep
        # instead of a zero-fill sweep plus four read-modify-write sweeps.
        if m8 < m:
            _bc1x4_init(Xp, m8, j0, L, C, k0, R)
            for i in range(m8 + 1, m):
                for c in range(4):
                    _bc1(Xp, i, j0, L, C, k0 + c, R)
        else:
            for c in range(4):
                for jj in range(L):
                    R[k0 + c, jj] = 0
        for i0 in range(0, m8, 8):
            _r_8x4(Xp, C, R, i0, k0, j0, L)
    for k in range(n4, n):
        for jj in range(L):
            R[k, jj] = 0
        for i in range(m):
            _bc1(Xp, i, j0, L, C, k, R)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _rd1(Xp, i, j0, L, Sr, so, k, P):
    """``P[i, k] += X[i, j0:j0+L] · Sr[k, so:so+L]`` (remainder rows / components)."""
    x = Xp[i, j0 : j0 + L]
    s = Sr[k, so : so + L]
    acc = P.dtype.type(0)
    for jj in range(L):
        acc += x[jj] * s[jj]
    P[i, k] += acc


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _reduce(Xp, j0, L, Sr, so, P):
    """``P += X[:, j0:j0+L] Sr[:, so:so+L]ᵀ`` for ``P (m, n)``."""
    m = Xp.shape[0]
    n = P.shape[1]
    if EXPLICIT:  # the solver's explicit tiles; the block was just read by _bcast
        p_block(Xp, Sr, m, n, j0, L, P, so)
        return
    n4 = n - n % 4
    m4 = m - m % 4
    for k0 in range(0, n4, 4):
        for i0 in range(0, m4, 4):
            _p_4x4(Xp, Sr, P, i0, k0, j0, L, so)
        for i in range(m4, m):
            for c in range(4):
                _rd1(Xp, i, j0, L, Sr, so, k0 + c, P)
    for k in range(n4, n):
        for i in range(m):
            _rd1(Xp, i, j0, L, Sr, so, k, P)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _cross(U, uo, V, vo, L, out):
    """``out[k, l] += Σ_j U[k, uo+j] V[l, vo+j]`` (n × n, not assumed symmetric)."""
    n = out.shape[0]
    for k in range(n):
        u = U[k, uo : uo + L]
        for l in range(n):
            v = V[l, vo : vo + L]
            acc = out.dtype.type(0)
            for jj in range(L):
                acc += u[jj] * v[jj]
            out[k, l] += acc


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _denominator(Hp, Sp, j0, L, eps, D):
    """``D[:, :L] = H S[:, j0:j0+L] + ε``."""
    n = Hp.shape[0]
    for k in range(n):
        d = D[k, :L]
        for jj in range(L):
            d[jj] = eps
        for l in range(n):
            h = Hp[k, l]
            s = Sp[l, j0 : j0 + L]
            for jj in range(L):
                d[jj] += h * s[jj]


# ---------------------------------------------------------------------------
# Per-problem tiny algebra (m·n² work).
# ---------------------------------------------------------------------------


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _a_prime(Ap, Wp, Pp, Gp, eps, Ep, Aq, Hp):
    """``E = A G + ε``, ``A' = A ⊙ W ⊙ P ⊘ E`` (into ``Aq``), ``H = A'ᵀA'``."""
    m, n = Ap.shape
    for i in range(m):
        for k in range(n):
            acc = eps
            for l in range(n):
                acc += Ap[i, l] * Gp[l, k]
            Ep[i, k] = acc
        for k in range(n):
            Aq[i, k] = Ap[i, k] * Wp[i, k] * Pp[i, k] / Ep[i, k]
    for k in range(n):
        for l in range(k, n):
            acc = Hp.dtype.type(0)
            for i in range(m):
                acc += Aq[i, k] * Aq[i, l]
            Hp[k, l] = acc
            Hp[l, k] = acc


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _sum_blocks(part, c0, nblk, out):
    """``out = Σ_c part[c0 + c]`` in block order (deterministic)."""
    _copy(out, part[c0])
    for c in range(c0 + 1, c0 + nblk):
        _add(out, part[c])


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _bwd_pass1_block(Xp, Aq, Hp, Sp, gSo, j0, L, eps, need_gS, gS, XgRc, gHc, R, D, gR, gU):
    """Pass 1 on one column block: column-local ``gS``, partial ``X gRᵀ`` and ``gU Sᵀ``."""
    n = Sp.shape[0]
    _bcast(Xp, j0, L, Aq, R)
    _denominator(Hp, Sp, j0, L, eps, D)
    for k in range(n):
        s = Sp[k, j0 : j0 + L]
        g = gSo[k, j0 : j0 + L]
        r = R[k, :L]
        d = D[k, :L]
        gr = gR[k, :L]
        gu = gU[k, :L]
        for jj in range(L):
            q = g[jj] / d[jj]
            so = s[jj] * r[jj] / d[jj]  # S', rounded as in the forward
            gr[jj] = q * s[jj]
            gu[jj] = -q * so
            r[jj] = q * r[jj]  # R now holds gS' ⊙ R ⊘ D
    if need_gS:
        # gS = gS' ⊙ R ⊘ D + H gU  (H symmetric)
        for k in range(n):
            o = gS[k, j0 : j0 + L]
            r = R[k, :L]
            for jj in range(L):
                o[jj] = r[jj]
            for l in range(n):
                h = Hp[k, l]
                gu = gU[l, :L]
                for jj in range(L):
                    o[jj] += h * gu[jj]
    XgRc[:, :] = 0
    gHc[:, :] = 0
    _reduce(Xp, j0, L, gR, 0, XgRc)
    _cross(gU, 0, Sp, j0, L, gHc)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _bwd_tiny(Ap, Wp, Pp, Gp, Ep, Aq, gAo, has_gSo, XgR, gH, need_gA, need_gW, gA, gWp, gP, Gs):
    """Through A' (per problem): ``gA'`` total, then ``gA``, ``gW``, ``gP`` and ``gG + gGᵀ``.

    On return ``gP`` holds ``gP`` and ``Gs`` holds ``gG + gGᵀ``; ``XgR`` is
    reused as scratch for the total ``gA'`` and then for ``gQ``.
    """
    m, n = Ap.shape
    # gA' += X gRᵀ + A' (gH + gHᵀ)
    for i in range(m):
        for k in range(n):
            acc = gAo[i, k]
            if has_gSo:
                acc += XgR[i, k]
                for l in range(n):
                    acc += Aq[i, l] * (gH[l, k] + gH[k, l])
            XgR[i, k] = acc
    gAt = XgR
    for i in range(m):
        for k in range(n):
            g = gAt[i, k] / Ep[i, k]
            if need_gA:
                gA[i, k] = g * Wp[i, k] * Pp[i, k]
            if need_gW:
                gWp[i, k] = g * Ap[i, k] * Pp[i, k]
            gP[i, k] = g * Ap[i, k] * Wp[i, k]
            gAt[i, k] = -g * Aq[i, k]  # gQ = −gA' ⊙ A' ⊘ E
    gQ = gAt
    if need_gA:
        # gA += gQ G   (G symmetric)
        for i in range(m):
            for k in range(n):
                acc = gA.dtype.type(0)
                for l in range(n):
                    acc += gQ[i, l] * Gp[l, k]
                gA[i, k] += acc
    # gG = Aᵀ gQ ;  Gs = gG + gGᵀ
    for k in range(n):
        for l in range(n):
            acc = Gs.dtype.type(0)
            for i in range(m):
                acc += Ap[i, k] * gQ[i, l]
            Gs[k, l] = acc
    for k in range(n):
        for l in range(k, n):
            v = Gs[k, l] + Gs[l, k]
            Gs[k, l] = v
            Gs[l, k] = v


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _bwd_pass2_block(
    Xp, Aq, Hp, Sp, gSo, gPp, Gsp, j0, L, eps, has_gSo, need_gS, need_gX, gS, gX, R, D, gR
):
    """Pass 2 on one column block: ``gS += gPᵀX + Gs S``; ``gX = gP S + A' gR`` if asked."""
    m = Xp.shape[0]
    n = Sp.shape[0]
    if need_gS:
        _bcast(Xp, j0, L, gPp, R)
        for k in range(n):
            o = gS[k, j0 : j0 + L]
            r = R[k, :L]
            if has_gSo:
                for jj in range(L):
                    o[jj] += r[jj]
            else:  # pass 1 did not run: nothing to add to
                for jj in range(L):
                    o[jj] = r[jj]
            for l in range(n):
                c = Gsp[k, l]
                s = Sp[l, j0 : j0 + L]
                for jj in range(L):
                    o[jj] += c * s[jj]
    if need_gX:
        if has_gSo:
            _denominator(Hp, Sp, j0, L, eps, D)
            for k in range(n):
                s = Sp[k, j0 : j0 + L]
                g = gSo[k, j0 : j0 + L]
                d = D[k, :L]
                gr = gR[k, :L]
                for jj in range(L):
                    gr[jj] = g[jj] / d[jj] * s[jj]
        for i in range(m):
            o = gX[i, j0 : j0 + L]
            for jj in range(L):
                o[jj] = 0
            for k in range(n):
                c = gPp[i, k]
                s = Sp[k, j0 : j0 + L]
                for jj in range(L):
                    o[jj] += c * s[jj]
                if has_gSo:
                    a = Aq[i, k]
                    gr = gR[k, :L]
                    for jj in range(L):
                        o[jj] += a * gr[jj]


def layer_backward(
    X, A, S, W, P, G, gAo, gSo, eps, has_gSo,
    need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX, nthreads,
) -> None:
    """Gradients of one learned-MU layer (the equations in the module docstring).

    Parameters
    ----------
    X, A, S, W, P, G
        The layer's inputs and ``P = X Sᵀ``, ``G = S Sᵀ`` (from the forward).
    gAo, gSo
        Upstream gradients w.r.t. ``A'`` (b, m, n) and ``S'`` (b, n, t).
        ``gSo`` is ignored when ``has_gSo`` is False (zero upstream for S':
        pass 1 is skipped); pass a ``(1, n, 1)`` dummy then.
    eps
        ε of the forward.
    need_gA, need_gS, need_gW, need_gX
        Which gradients to compute; the others' output arrays are never written
        (pass 3-D dummies with a leading dimension of 1). Pass 2 runs only for
        ``gS`` or ``gX``.
    gA, gS, gW, gX
        Outputs: ``(b, m, n)``, ``(b, n, t)``, ``(bw, m, n)`` (summed over the
        batch when ``bw == 1``), ``(b, m, t)``.
    nthreads
        ``numba.config.NUMBA_NUM_THREADS``.

    Notes
    -----
    Problem-major where the problems go round the threads (a multiple of
    them, or at least four per thread), block-parallel otherwise: two
    compiled functions, chosen here, so that a first call compiles only the
    one it runs (as :func:`fastmu.kernels.cpu.mu_run`).
    """
    b = X.shape[0]
    run = _backward_problem_major if b % nthreads == 0 or b >= 4 * nthreads else _backward_block_parallel
    run(X, A, S, W, P, G, gAo, gSo, eps, has_gSo, need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX,
        nthreads)


@nb.njit(cache=True)
def _backward_scratch(X, n, bw, need_gW, nthreads):
    """Per-problem ``E, A', H, X gRᵀ, gH, gP, Gs, gW`` parts and per-thread ``R, D, gR, gU`` blocks."""
    b, m = X.shape[0], X.shape[1]
    dt = X.dtype
    return (np.empty((b, m, n), dt), np.empty((b, m, n), dt), np.empty((b, n, n), dt), np.zeros((b, m, n), dt),
            np.zeros((b, n, n), dt), np.empty((b, m, n), dt), np.empty((b, n, n), dt),
            np.empty((b if (need_gW and bw == 1) else 0, m, n), dt), np.empty((nthreads, n, TB), dt),
            np.empty((nthreads, n, TB), dt), np.zeros((nthreads, n, TB), dt), np.empty((nthreads, n, TB), dt))


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _backward_problem_major(
    X, A, S, W, P, G, gAo, gSo, eps, has_gSo,
    need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX, nthreads,
):
    """:func:`layer_backward`, problem-major: each thread runs both passes of its own problems, so a
    problem's X is still in L2 for pass 2 and the threads meet only once; sums keep the same
    block order."""
    b, m, t = X.shape
    n = A.shape[2]
    dt = X.dtype
    epsd = dt.type(eps)
    nblk = (t + TB - 1) // TB
    bw = W.shape[0]
    wstep = 0 if bw == 1 else 1
    E, Aq, H, XgR, gH, gP, Gs, gWb, R, D, gR, gU = _backward_scratch(X, n, bw, need_gW, nthreads)
    XgRt = np.empty((nthreads, m, n), dt)
    gHt = np.empty((nthreads, n, n), dt)
    gstep = 1 if has_gSo else 0  # gSo is a (1, n, 1) dummy without upstream for S'

    for p in prange(b):
        fp = enter_ftz()
        tid = nb.get_thread_id()
        _a_prime(A[p], W[p * wstep], P[p], G[p], epsd, E[p], Aq[p], H[p])
        if has_gSo:
            for blk in range(nblk):
                j0 = blk * TB
                _bwd_pass1_block(
                    X[p], Aq[p], H[p], S[p], gSo[p], j0, min(TB, t - j0), epsd, need_gS,
                    gS[p] if need_gS else gS[0], XgRt[tid], gHt[tid], R[tid], D[tid], gR[tid], gU[tid],
                )
                _add(XgR[p], XgRt[tid])
                _add(gH[p], gHt[tid])
        gWp = gW[p] if bw != 1 else (gWb[p] if need_gW else gW[0])
        _bwd_tiny(
            A[p], W[p * wstep], P[p], G[p], E[p], Aq[p], gAo[p], has_gSo, XgR[p], gH[p],
            need_gA, need_gW, gA[p] if need_gA else gA[0], gWp, gP[p], Gs[p],
        )
        if need_gS or need_gX:
            for blk in range(nblk):
                j0 = blk * TB
                _bwd_pass2_block(
                    X[p], Aq[p], H[p], S[p], gSo[p * gstep], gP[p], Gs[p], j0, min(TB, t - j0),
                    epsd, has_gSo, need_gS, need_gX,
                    gS[p] if need_gS else gS[0], gX[p] if need_gX else gX[0],
                    R[tid], D[tid], gR[tid],
                )
        leave_ftz(fp)
    if need_gW and bw == 1:
        _sum_blocks(gWb, 0, b, gW[0])


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _backward_block_parallel(
    X, A, S, W, P, G, gAo, gSo, eps, has_gSo,
    need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX, nthreads,
):
    """:func:`layer_backward`, block-parallel (few problems): the column blocks are shared out over
    the threads."""
    b, m, t = X.shape
    n = A.shape[2]
    dt = X.dtype
    epsd = dt.type(eps)
    nblk = (t + TB - 1) // TB
    bw = W.shape[0]
    wstep = 0 if bw == 1 else 1
    E, Aq, H, XgR, gH, gP, Gs, gWb, R, D, gR, gU = _backward_scratch(X, n, bw, need_gW, nthreads)
    nchunks = b * nblk
    # Block-parallel (few problems): the per-problem steps (m·n² work each) run
    # serially; a parallel region apiece cost more to compile (~5 s each, cold)
    # than they could save.
    for p in range(b):
        _a_prime(A[p], W[p * wstep], P[p], G[p], epsd, E[p], Aq[p], H[p])

    if has_gSo:
        XgRpart = np.empty((nchunks, m, n), dt)
        gHpart = np.empty((nchunks, n, n), dt)
        for c in prange(nchunks):
            fp = enter_ftz()  # as the problem-major schedule: the same results, and no slow subnormals
            p = c // nblk
            j0 = (c % nblk) * TB
            tid = nb.get_thread_id()
            _bwd_pass1_block(
                X[p], Aq[p], H[p], S[p], gSo[p], j0, min(TB, t - j0), epsd, need_gS,
                gS[p] if need_gS else gS[0], XgRpart[c], gHpart[c], R[tid], D[tid], gR[tid], gU[tid],
            )
            leave_ftz(fp)
        for p in prange(b):
            fp = enter_ftz()
            _sum_blocks(XgRpart, p * nblk, nblk, XgR[p])
            _sum_blocks(gHpart, p * nblk, nblk, gH[p])
            leave_ftz(fp)

    for p in range(b):
        gWp = gW[p] if bw != 1 else (gWb[p] if need_gW else gW[0])
        _bwd_tiny(
            A[p], W[p * wstep], P[p], G[p], E[p], Aq[p], gAo[p], has_gSo, XgR[p], gH[p],
            need_gA, need_gW, gA[p] if need_gA else gA[0], gWp, gP[p], Gs[p],
        )
    if need_gW and bw == 1:
        _sum_blocks(gWb, 0, b, gW[0])

    if need_gS or need_gX:
        for c in prange(nchunks):
            fp = enter_ftz()
            p = c // nblk
            j0 = (c % nblk) * TB
            tid = nb.get_thread_id()
            _bwd_pass2_block(
                X[p], Aq[p], H[p], S[p], gSo[p if has_gSo else 0], gP[p], Gs[p], j0, min(TB, t - j0), epsd,
                has_gSo, need_gS, need_gX,
                gS[p] if need_gS else gS[0], gX[p] if need_gX else gX[0],
                R[tid], D[tid], gR[tid],
            )
            leave_ftz(fp)
