"""Fused multiplicative-update kernels for the CPU (Numba, parallel).

The update, with the optional L1/L2 penalties of :mod:`fastmu.penalty`
(all four weights zero: plain MU; ``W`` all ones: not learned)::

    A' = A ⊙ W ⊙ (X Sᵀ) ⊘ (A (S Sᵀ + l2_A I) + ε + l1_A)
    S' = S ⊙ (A'ᵀ X) ⊘ ((A'ᵀ A' + l2_S I) S + ε + l1_S)

The penalties cost nothing per pixel: each L1 weight joins its factor's ε
(``ε_A = ε + l1_A``, ``ε_S = ε + l1_S``, one scalar each) and each L2 weight
the diagonal of the Gram matrix its update reads, ``S Sᵀ`` where the A
update loads it (``P``, ``G`` keep their meaning, unshifted, for
:func:`objective_from_pg` and the next call) and ``H = A'ᵀA'`` once it is
complete (a scratch matrix only the S update reads).

One pass over X per iteration. The S update of iteration l is
fused with the reductions ``P = X S'ᵀ`` and ``G = S' S'ᵀ`` that the A update
of iteration l+1 needs, so each column block of X is read once per iteration
while it sits in L1/L2.

Work is split into *chunks*: one column block of ``tb`` pixels of one
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
``b`` (per problem). X's rows may be longer than t (``X (b, m, t')``,
``t' ≥ t``, the pixels past t ignored): the engine's copy of X gets a row
stride that keeps its rows out of each other's L1 sets
(:func:`fastmu.kernels.cpu_products.row_stride`); t is S's.
"""
from __future__ import annotations

from collections.abc import Sequence

import numba as nb
import numpy as np
from numba import prange

from fastmu.kernels.cpu_products import EXPLICIT, FASTMATH, p_block, r_block
from fastmu.kernels.fpenv import enter_ftz, leave_ftz

#: pixels per column block at most: 65 rows × 1024 float32 = 266 kB of X,
#: resident in L2 between the S update and the P accumulation; measured best
#: of 128 to 2048 for that shape (longer pixel loops amortise the per-tile
#: setup: 256 was 25% slower).
_TB = 1024
#: bytes of X a block may hold: half of the dev machine's 2 MB L2, so that
#: the block's second use still finds it there. Tall float64 X gets shorter
#: blocks: 500-row float64 X at rank 4 ran 2.01 against 2.47 ms per iteration
#: (one 500 × 16384 problem) and 17.9 against 22.9 (150 × 500 × 1024) with
#: 256- instead of 1024-pixel blocks; 200-row float32 X keeps 1024 (a
#: 266 kB budget, giving 256, was 1.4-1.7x slower there).
_BLOCK_BYTES = 1 << 20

# Reassociation lets LLVM vectorise the reductions over pixels; no 'arcp' or
# 'nnan': divisions stay exact IEEE divisions and NaN propagation is kept.
# error_model="numpy" drops Python's ZeroDivisionError check, whose branch
# kept every division loop scalar (ε keeps denominators positive anyway).
_FM = FASTMATH


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _p_4x4(Xp, Sb, Pc, i, k, j0, L, so=0):
    """``Pc[i:i+4, k:k+4] += X[i:i+4, j0:j0+L] @ Sb[k:k+4, so:so+L]ᵀ``: 16 register accumulators.

    Each pixel vector of the 4 X rows and 4 S rows feeds 16 FMAs, so the loop
    is bound by arithmetic rather than by loads.
    """
    x0 = Xp[i, j0 : j0 + L]
    x1 = Xp[i + 1, j0 : j0 + L]
    x2 = Xp[i + 2, j0 : j0 + L]
    x3 = Xp[i + 3, j0 : j0 + L]
    s0 = Sb[k, so : so + L]
    s1 = Sb[k + 1, so : so + L]
    s2 = Sb[k + 2, so : so + L]
    s3 = Sb[k + 3, so : so + L]
    z = Pc.dtype.type(0)
    p00 = p01 = p02 = p03 = z
    p10 = p11 = p12 = p13 = z
    p20 = p21 = p22 = p23 = z
    p30 = p31 = p32 = p33 = z
    for jj in range(L):
        v0 = x0[jj]
        v1 = x1[jj]
        v2 = x2[jj]
        v3 = x3[jj]
        w0 = s0[jj]
        w1 = s1[jj]
        w2 = s2[jj]
        w3 = s3[jj]
        p00 += v0 * w0
        p01 += v0 * w1
        p02 += v0 * w2
        p03 += v0 * w3
        p10 += v1 * w0
        p11 += v1 * w1
        p12 += v1 * w2
        p13 += v1 * w3
        p20 += v2 * w0
        p21 += v2 * w1
        p22 += v2 * w2
        p23 += v2 * w3
        p30 += v3 * w0
        p31 += v3 * w1
        p32 += v3 * w2
        p33 += v3 * w3
    Pc[i, k] += p00
    Pc[i, k + 1] += p01
    Pc[i, k + 2] += p02
    Pc[i, k + 3] += p03
    Pc[i + 1, k] += p10
    Pc[i + 1, k + 1] += p11
    Pc[i + 1, k + 2] += p12
    Pc[i + 1, k + 3] += p13
    Pc[i + 2, k] += p20
    Pc[i + 2, k + 1] += p21
    Pc[i + 2, k + 2] += p22
    Pc[i + 2, k + 3] += p23
    Pc[i + 3, k] += p30
    Pc[i + 3, k + 1] += p31
    Pc[i + 3, k + 2] += p32
    Pc[i + 3, k + 3] += p33


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _p_block(Xp, Sb, m, n, j0, L, Pc):
    """``Pc += X[:, j0:j0+L] @ Sb[:, :L]ᵀ``: explicit 256-bit tiles or auto-vectorised ones
    (:data:`fastmu.kernels.cpu_products.EXPLICIT`)."""
    if EXPLICIT:
        p_block(Xp, Sb, m, n, j0, L, Pc)
    else:
        _p_block_autovec(Xp, Sb, m, n, j0, L, Pc)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _p_block_autovec(Xp, Sb, m, n, j0, L, Pc):
    """``Pc += X[:, j0:j0+L] @ Sb[:, :L]ᵀ`` (4×4 register blocks, then the remainders)."""
    n4 = n - n % 4
    m4 = m - m % 4
    for k in range(0, n4, 4):
        for i in range(0, m4, 4):
            _p_4x4(Xp, Sb, Pc, i, k, j0, L)
    # Remainders: rows past m4 for every k, and components past n4 for rows < m4.
    for i in range(m4, m):
        x0 = Xp[i, j0 : j0 + L]
        for k in range(0, n4, 4):  # one X row against four S rows: x loaded once
            s0 = Sb[k]
            s1 = Sb[k + 1]
            s2 = Sb[k + 2]
            s3 = Sb[k + 3]
            z = Pc.dtype.type(0)
            c0 = c1 = c2 = c3 = z
            for jj in range(L):
                v = x0[jj]
                c0 += v * s0[jj]
                c1 += v * s1[jj]
                c2 += v * s2[jj]
                c3 += v * s3[jj]
            Pc[i, k] += c0
            Pc[i, k + 1] += c1
            Pc[i, k + 2] += c2
            Pc[i, k + 3] += c3
        for k in range(n4, n):
            s = Sb[k]
            acc = Pc.dtype.type(0)
            for jj in range(L):
                acc += x0[jj] * s[jj]
            Pc[i, k] += acc
    for k in range(n4, n):
        s = Sb[k]
        for i in range(m4):
            x0 = Xp[i, j0 : j0 + L]
            acc = Pc.dtype.type(0)
            for jj in range(L):
                acc += x0[jj] * s[jj]
            Pc[i, k] += acc


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _r_4x4(Xp, Ap, R, i, k, j0, L):
    """``R[k:k+4, :L] += A[i:i+4, k:k+4]ᵀ X[i:i+4, blk]``: 16 coefficients held in registers."""
    x0 = Xp[i, j0 : j0 + L]
    x1 = Xp[i + 1, j0 : j0 + L]
    x2 = Xp[i + 2, j0 : j0 + L]
    x3 = Xp[i + 3, j0 : j0 + L]
    r0 = R[k]
    r1 = R[k + 1]
    r2 = R[k + 2]
    r3 = R[k + 3]
    a00 = Ap[i, k]
    a01 = Ap[i, k + 1]
    a02 = Ap[i, k + 2]
    a03 = Ap[i, k + 3]
    a10 = Ap[i + 1, k]
    a11 = Ap[i + 1, k + 1]
    a12 = Ap[i + 1, k + 2]
    a13 = Ap[i + 1, k + 3]
    a20 = Ap[i + 2, k]
    a21 = Ap[i + 2, k + 1]
    a22 = Ap[i + 2, k + 2]
    a23 = Ap[i + 2, k + 3]
    a30 = Ap[i + 3, k]
    a31 = Ap[i + 3, k + 1]
    a32 = Ap[i + 3, k + 2]
    a33 = Ap[i + 3, k + 3]
    for jj in range(L):
        v0 = x0[jj]
        v1 = x1[jj]
        v2 = x2[jj]
        v3 = x3[jj]
        r0[jj] += a00 * v0 + a10 * v1 + a20 * v2 + a30 * v3
        r1[jj] += a01 * v0 + a11 * v1 + a21 * v2 + a31 * v3
        r2[jj] += a02 * v0 + a12 * v1 + a22 * v2 + a32 * v3
        r3[jj] += a03 * v0 + a13 * v1 + a23 * v2 + a33 * v3


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _r_8x4(Xp, Ap, R, i, k, j0, L):
    """``R[k:k+4, :L] += A[i:i+8, k:k+4]ᵀ X[i:i+8, blk]``: each accumulator row is
    loaded and stored once per 32 FMAs (4 rows measured 15% slower)."""
    x0 = Xp[i, j0 : j0 + L]
    x1 = Xp[i + 1, j0 : j0 + L]
    x2 = Xp[i + 2, j0 : j0 + L]
    x3 = Xp[i + 3, j0 : j0 + L]
    x4 = Xp[i + 4, j0 : j0 + L]
    x5 = Xp[i + 5, j0 : j0 + L]
    x6 = Xp[i + 6, j0 : j0 + L]
    x7 = Xp[i + 7, j0 : j0 + L]
    r0 = R[k]
    r1 = R[k + 1]
    r2 = R[k + 2]
    r3 = R[k + 3]
    a00, a01, a02, a03 = Ap[i, k], Ap[i, k + 1], Ap[i, k + 2], Ap[i, k + 3]
    a10, a11, a12, a13 = Ap[i + 1, k], Ap[i + 1, k + 1], Ap[i + 1, k + 2], Ap[i + 1, k + 3]
    a20, a21, a22, a23 = Ap[i + 2, k], Ap[i + 2, k + 1], Ap[i + 2, k + 2], Ap[i + 2, k + 3]
    a30, a31, a32, a33 = Ap[i + 3, k], Ap[i + 3, k + 1], Ap[i + 3, k + 2], Ap[i + 3, k + 3]
    a40, a41, a42, a43 = Ap[i + 4, k], Ap[i + 4, k + 1], Ap[i + 4, k + 2], Ap[i + 4, k + 3]
    a50, a51, a52, a53 = Ap[i + 5, k], Ap[i + 5, k + 1], Ap[i + 5, k + 2], Ap[i + 5, k + 3]
    a60, a61, a62, a63 = Ap[i + 6, k], Ap[i + 6, k + 1], Ap[i + 6, k + 2], Ap[i + 6, k + 3]
    a70, a71, a72, a73 = Ap[i + 7, k], Ap[i + 7, k + 1], Ap[i + 7, k + 2], Ap[i + 7, k + 3]
    for jj in range(L):
        v0 = x0[jj]
        v1 = x1[jj]
        v2 = x2[jj]
        v3 = x3[jj]
        v4 = x4[jj]
        v5 = x5[jj]
        v6 = x6[jj]
        v7 = x7[jj]
        r0[jj] += a00 * v0 + a10 * v1 + a20 * v2 + a30 * v3 + a40 * v4 + a50 * v5 + a60 * v6 + a70 * v7
        r1[jj] += a01 * v0 + a11 * v1 + a21 * v2 + a31 * v3 + a41 * v4 + a51 * v5 + a61 * v6 + a71 * v7
        r2[jj] += a02 * v0 + a12 * v1 + a22 * v2 + a32 * v3 + a42 * v4 + a52 * v5 + a62 * v6 + a72 * v7
        r3[jj] += a03 * v0 + a13 * v1 + a23 * v2 + a33 * v3 + a43 * v4 + a53 * v5 + a63 * v6 + a73 * v7


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _r_block(Xp, Ap, m, n, j0, L, R, hot):
    """``R[:, :L] = A'ᵀ X[:, j0:j0+L]``: explicit 256-bit tiles
    (:data:`fastmu.kernels.cpu_products.EXPLICIT`) where the block is ``hot``
    (in a core's caches), else the auto-vectorised ones.

    The explicit tile reads down the block's rows, a pattern the hardware
    prefetchers do not follow: on blocks fresh from memory it measured
    1.5–2.5x slower than the auto-vectorised product, which reads along them
    (65 × 1024 float32, one core, 2-core AMD EPYC); software prefetches of
    the next block did not close the gap. See :func:`_hot`.
    """
    if EXPLICIT and hot:
        r_block(Xp, Ap, m, n, j0, L, R)
    else:
        _r_block_autovec(Xp, Ap, m, n, j0, L, R)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _r_block_autovec(Xp, Ap, m, n, j0, L, R):
    """``R[:, :L] = A'ᵀ X[:, j0:j0+L]`` (4×4 register blocks, then the remainders)."""
    for k in range(n):
        for jj in range(L):
            R[k, jj] = 0
    n4 = n - n % 4
    m8 = m - m % 8
    m4 = m - m % 4
    for k in range(0, n4, 4):
        for i in range(0, m8, 8):
            _r_8x4(Xp, Ap, R, i, k, j0, L)
        for i in range(m8, m4, 4):
            _r_4x4(Xp, Ap, R, i, k, j0, L)
    for i in range(m4, m):
        x0 = Xp[i, j0 : j0 + L]
        for k in range(0, n4, 4):  # one X row into four R rows: x loaded once
            c0 = Ap[i, k]
            c1 = Ap[i, k + 1]
            c2 = Ap[i, k + 2]
            c3 = Ap[i, k + 3]
            r0 = R[k]
            r1 = R[k + 1]
            r2 = R[k + 2]
            r3 = R[k + 3]
            for jj in range(L):
                v = x0[jj]
                r0[jj] += c0 * v
                r1[jj] += c1 * v
                r2[jj] += c2 * v
                r3[jj] += c3 * v
        for k in range(n4, n):
            c = Ap[i, k]
            r = R[k]
            for jj in range(L):
                r[jj] += c * x0[jj]
    for k in range(n4, n):
        r = R[k]
        for i in range(m4):
            c = Ap[i, k]
            x0 = Xp[i, j0 : j0 + L]
            for jj in range(L):
                r[jj] += c * x0[jj]


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _gram_block(Sb, n, L, Gc):
    """``Gc += Sb[:, :L] @ Sb[:, :L]ᵀ`` for a symmetric ``Gc``, which stays exactly symmetric.

    The upper triangle, mirrored. Above rank 4 with the explicit tiles
    (:data:`fastmu.kernels.cpu_products.EXPLICIT`), the whole product in
    their 2 × 4 tiles, then mirrored: twice the arithmetic, yet 1.4x faster
    at rank 20 and as fast at ranks 5–16 (1024 pixels, float32, one core).
    """
    if EXPLICIT and n > 4:
        p_block(Sb, Sb, n, n, 0, L, Gc)
        for k in range(n):
            for l in range(k + 1, n):
                Gc[l, k] = Gc[k, l]
        return
    for k in range(n):
        sk = Sb[k, :L]  # 1-D row views: LLVM vectorises these, not 2-D indexing
        for l in range(k, n):
            sl = Sb[l, :L]
            acc = Gc.dtype.type(0)
            for jj in range(L):
                acc += sk[jj] * sl[jj]
            Gc[k, l] += acc
            if l != k:
                Gc[l, k] += acc


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _pg_chunk(Xp, Sp, j0, L, Pc, Gc, Sb):
    """Add one column block's ``X Sᵀ`` and ``S Sᵀ`` to ``Pc``, ``Gc`` (no S update)."""
    m = Xp.shape[0]
    n = Sp.shape[0]
    for k in range(n):
        for jj in range(L):
            Sb[k, jj] = Sp[k, j0 + jj]
    _p_block(Xp, Sb, m, n, j0, L, Pc)
    _gram_block(Sb, n, L, Gc)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _pg_range(Xp, Sp, j0, j1, tb, Pc, Gc, Sb):
    """Add ``X Sᵀ`` and ``S Sᵀ`` of the pixels ``j0 … j1−1`` (blocks of ``tb``, the last one
    cut at j1) to ``Pc``, ``Gc``: the pass that starts a run without carried P, G."""
    for j in range(j0, j1, tb):
        _pg_chunk(Xp, Sp, j, min(tb, j1 - j), Pc, Gc, Sb)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _s_chunk(Xp, Ap, Hp, Sp, j0, L, eps, accumulate, Pc, Gc, R, Dk, hot):
    """S update on one column block, then (optionally) add its ``X S'ᵀ``, ``S' S'ᵀ`` to Pc, Gc.

    ``S'_j = S_j ⊙ (A'ᵀ X_j) ⊘ (H S_j + ε)`` for the block's pixels j, with
    ``H = A'ᵀ A' + l2_S I`` precomputed and ``eps`` the S update's ``ε + l1_S``
    (:func:`_penalty_scalars`); ``R`` (n × tb) and ``Dk`` (tb) are scratch.
    """
    m = Xp.shape[0]
    n = Sp.shape[0]
    _r_block(Xp, Ap, m, n, j0, L, R, hot)
    if n == 4:
        _s_update4(Hp, Sp, j0, L, eps, R)
    else:
        _s_update(Hp, Sp, j0, L, eps, R, Dk)
    if accumulate:
        # The block of X is still in L1/L2: this is the fused second use.
        _p_block(Xp, R, m, n, j0, L, Pc)
        if n == 4:
            _gram4(R, L, Gc)
        else:
            _gram_block(R, n, L, Gc)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _s_update4(Hp, Sp, j0, L, eps, R):
    """Rank-4 S update of one block in a single sweep: all four old values sit in registers.

    ``S'_k = S_k R_k / (Σ_l H_kl S_l + ε)``; new values go to S and to R (the
    contiguous copy that the P accumulation reads next). The penalties are in
    ``H`` (its diagonal) and ``eps`` already (see :func:`_s_chunk`), so this
    loop is the same with and without them.
    """
    s0 = Sp[0, j0 : j0 + L]
    s1 = Sp[1, j0 : j0 + L]
    s2 = Sp[2, j0 : j0 + L]
    s3 = Sp[3, j0 : j0 + L]
    r0 = R[0]
    r1 = R[1]
    r2 = R[2]
    r3 = R[3]
    h00 = Hp[0, 0]
    h01 = Hp[0, 1]
    h02 = Hp[0, 2]
    h03 = Hp[0, 3]
    h11 = Hp[1, 1]
    h12 = Hp[1, 2]
    h13 = Hp[1, 3]
    h22 = Hp[2, 2]
    h23 = Hp[2, 3]
    h33 = Hp[3, 3]
    for jj in range(L):
        a0 = s0[jj]
        a1 = s1[jj]
        a2 = s2[jj]
        a3 = s3[jj]
        # H is symmetric: h_lk = h_kl.
        n0 = a0 * r0[jj] / (eps + h00 * a0 + h01 * a1 + h02 * a2 + h03 * a3)
        n1 = a1 * r1[jj] / (eps + h01 * a0 + h11 * a1 + h12 * a2 + h13 * a3)
        n2 = a2 * r2[jj] / (eps + h02 * a0 + h12 * a1 + h22 * a2 + h23 * a3)
        n3 = a3 * r3[jj] / (eps + h03 * a0 + h13 * a1 + h23 * a2 + h33 * a3)
        s0[jj] = n0
        s1[jj] = n1
        s2[jj] = n2
        s3[jj] = n3
        r0[jj] = n0
        r1[jj] = n1
        r2[jj] = n2
        r3[jj] = n3


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _gram4(Sb, L, Gc):
    """Rank-4 ``Gc += Sb Sbᵀ`` in one sweep (10 accumulators)."""
    s0 = Sb[0]
    s1 = Sb[1]
    s2 = Sb[2]
    s3 = Sb[3]
    z = Gc.dtype.type(0)
    g00 = g01 = g02 = g03 = g11 = g12 = g13 = g22 = g23 = g33 = z
    for jj in range(L):
        a0 = s0[jj]
        a1 = s1[jj]
        a2 = s2[jj]
        a3 = s3[jj]
        g00 += a0 * a0
        g01 += a0 * a1
        g02 += a0 * a2
        g03 += a0 * a3
        g11 += a1 * a1
        g12 += a1 * a2
        g13 += a1 * a3
        g22 += a2 * a2
        g23 += a2 * a3
        g33 += a3 * a3
    Gc[0, 0] += g00
    Gc[1, 1] += g11
    Gc[2, 2] += g22
    Gc[3, 3] += g33
    Gc[0, 1] += g01
    Gc[1, 0] += g01
    Gc[0, 2] += g02
    Gc[2, 0] += g02
    Gc[0, 3] += g03
    Gc[3, 0] += g03
    Gc[1, 2] += g12
    Gc[2, 1] += g12
    Gc[1, 3] += g13
    Gc[3, 1] += g13
    Gc[2, 3] += g23
    Gc[3, 2] += g23


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _s_update(Hp, Sp, j0, L, eps, R, Dk):
    """Any-rank S update of one block: ``R ← S ⊙ R ⊘ (H S + ε)``, then S ← R.

    The old S is read for every k, so new values stay in R until all rows are done.
    ``H`` and ``eps`` carry the penalties, as in :func:`_s_update4`.
    """
    n = Sp.shape[0]
    for k in range(n):
        d = Dk[:L]
        for jj in range(L):
            d[jj] = eps
        for l in range(n):
            h = Hp[k, l]
            sl = Sp[l, j0 : j0 + L]
            for jj in range(L):
                d[jj] += h * sl[jj]
        r = R[k, :L]
        sk = Sp[k, j0 : j0 + L]
        for jj in range(L):
            r[jj] = sk[jj] * r[jj] / d[jj]
    for k in range(n):
        r = R[k, :L]
        sk = Sp[k, j0 : j0 + L]
        for jj in range(L):
            sk[jj] = r[jj]


@nb.njit(cache=True, inline="always")
def _copy(dst, src):
    """``dst[:, :] = src`` for 2-D arrays of one shape, element by element: a sliced
    array assignment compiles its shape-mismatch error path (string formatting),
    which made up ~6 s of the MU kernel's ~50 s cold compilation. (``np.ndindex``
    loops instead ran the 65 × 16384 iteration 1.3–2× slower.)"""
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] = src[i, j]


@nb.njit(cache=True, inline="always")
def _add(dst, src):
    """``dst += src`` for 2-D arrays of one shape (see :func:`_copy`)."""
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] += src[i, j]


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _reduce_problem(Ppart, Gpart, c0, nblk, Pp, Gp):
    """Sum the partials of one problem's blocks, in block order."""
    _copy(Pp, Ppart[c0])
    _copy(Gp, Gpart[c0])
    for c in range(c0 + 1, c0 + nblk):
        _add(Pp, Ppart[c])
        _add(Gp, Gpart[c])


@nb.njit(cache=True, inline="always")
def _add_diag(Hp, v):
    """``Hp += v I``: the L2 weight on the diagonal of a Gram matrix (n adds)."""
    for k in range(Hp.shape[0]):
        Hp[k, k] += v


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _a_update4(Ap, Wp, Pp, Gp, eps, l2a, Hp):
    """Rank-4 A update and Gram with G and the running H in scalars (no inner loops over n).

    ``l2a`` joins G's diagonal as it is loaded (``A (G + l2_A I) = A G + l2_A A``):
    G itself stays ``S Sᵀ``, which the objective and the next call read.
    """
    m = Ap.shape[0]
    g00, g01, g02, g03 = Gp[0, 0] + l2a, Gp[0, 1], Gp[0, 2], Gp[0, 3]
    g10, g11, g12, g13 = Gp[1, 0], Gp[1, 1] + l2a, Gp[1, 2], Gp[1, 3]
    g20, g21, g22, g23 = Gp[2, 0], Gp[2, 1], Gp[2, 2] + l2a, Gp[2, 3]
    g30, g31, g32, g33 = Gp[3, 0], Gp[3, 1], Gp[3, 2], Gp[3, 3] + l2a
    z = Hp.dtype.type(0)
    h00 = h01 = h02 = h03 = h11 = h12 = h13 = h22 = h23 = h33 = z
    for i in range(m):
        a0, a1, a2, a3 = Ap[i, 0], Ap[i, 1], Ap[i, 2], Ap[i, 3]
        b0 = a0 * Wp[i, 0] * Pp[i, 0] / (eps + a0 * g00 + a1 * g10 + a2 * g20 + a3 * g30)
        b1 = a1 * Wp[i, 1] * Pp[i, 1] / (eps + a0 * g01 + a1 * g11 + a2 * g21 + a3 * g31)
        b2 = a2 * Wp[i, 2] * Pp[i, 2] / (eps + a0 * g02 + a1 * g12 + a2 * g22 + a3 * g32)
        b3 = a3 * Wp[i, 3] * Pp[i, 3] / (eps + a0 * g03 + a1 * g13 + a2 * g23 + a3 * g33)
        Ap[i, 0] = b0
        Ap[i, 1] = b1
        Ap[i, 2] = b2
        Ap[i, 3] = b3
        h00 += b0 * b0
        h01 += b0 * b1
        h02 += b0 * b2
        h03 += b0 * b3
        h11 += b1 * b1
        h12 += b1 * b2
        h13 += b1 * b3
        h22 += b2 * b2
        h23 += b2 * b3
        h33 += b3 * b3
    Hp[0, 0], Hp[0, 1], Hp[0, 2], Hp[0, 3] = h00, h01, h02, h03
    Hp[1, 0], Hp[1, 1], Hp[1, 2], Hp[1, 3] = h01, h11, h12, h13
    Hp[2, 0], Hp[2, 1], Hp[2, 2], Hp[2, 3] = h02, h12, h22, h23
    Hp[3, 0], Hp[3, 1], Hp[3, 2], Hp[3, 3] = h03, h13, h23, h33


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _a_update(Ap, Wp, Pp, Gp, eps, l2a, Hp, Erow):
    """``A ← A ⊙ W ⊙ P ⊘ (A (G + l2a I) + ε)`` in place (row-wise independent), then ``H = AᵀA``.

    ``eps`` is the A update's ``ε + l1_A`` and ``l2a`` its L2 weight, both of
    A's dtype (:func:`_penalty_scalars`). ``H`` is the plain Gram of the new
    A (or of these rows of it): the caller adds ``l2_S`` to its diagonal once
    H is complete (:func:`_add_diag`).

    Above rank 4 the update reads ``G + l2a I`` from ``Hp``, free until H is
    formed: G itself stays ``S Sᵀ`` for the objective and the next call. A
    shifted copy rather than a ``+ l2a·A_ik`` term in the denominator: that
    term changed how LLVM reassociated the sum over l, so unpenalised results
    moved (by rounding) from those of the kernel before penalties existed;
    with the copy the loop is unchanged and ``G + 0`` is G, bit for bit.
    """
    m, n = Ap.shape
    if n == 4:
        _a_update4(Ap, Wp, Pp, Gp, eps, l2a, Hp)
        return
    Gs = Hp
    _copy(Gs, Gp)
    _add_diag(Gs, l2a)
    for i in range(m):
        for k in range(n):
            acc = eps
            for l in range(n):
                acc += Ap[i, l] * Gs[l, k]
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


@nb.njit(cache=True, inline="always")
def _penalty_scalars(X, eps, penalty):
    """``(ε + l1_A, l2_A, ε + l1_S, l2_S)`` in X's dtype from ``penalty = (l1_A, l2_A, l1_S, l2_S)``.

    The sums are formed in float64 and rounded once. Converting matters: a
    float64 scalar would promote float32 arithmetic in the updates to float64.
    With zero weights ``ε + 0`` is ``ε``, so the unpenalised run is the same
    bit for bit.
    """
    dt = X.dtype
    l1a, l2a, l1s, l2s = penalty
    return dt.type(eps + l1a), dt.type(l2a), dt.type(eps + l1s), dt.type(l2s)


@nb.njit(cache=True)
def block_length(m, itemsize):
    """Pixels per column block for ``m`` rows: ``_TB``, halved while the block exceeds ``_BLOCK_BYTES`` (≥ 64)."""
    tb = _TB
    while tb > 64 and m * tb * itemsize > _BLOCK_BYTES:
        tb //= 2
    return tb


#: bytes of X that stay in cache from one iteration to the next (:func:`_hot`): a
#: problem's X in its core's L2 (problem-major; 1 MB per core on the dev machine),
#: every problem's X in the shared L3 (block-parallel; half the dev machine's 32 MB)
_HOT_PROBLEM_BYTES = 1 << 20
_HOT_BATCH_BYTES = 16 << 20


@nb.njit(cache=True)
def _hot(b, m, t, itemsize, n_iter, problem_major):
    """Whether ``A'ᵀX`` will find X's blocks in cache (:func:`_r_block`).

    Where the whole batch's X fits in the shared L3, it stays there between
    iterations and between calls (one iteration per call, as under a
    callback or scikit-learn's ``tol``, included). Otherwise, in problem-major
    schedules, from a call's second iteration on, where one problem's X fits
    in its core's L2. A 50-layer NALMU forward (one iteration per call over
    25 × 65 × 4096, 27 MB) and a batch too large to keep read X from memory.
    Measured on the 2-core AMD EPYC (float32, rank 4): explicit tiles on
    one 65 × 16384 problem (4.2 MB, block-parallel) 1.7x faster; on 40 such
    problems (170 MB) 1.17x slower; the NALMU forward 1.3–1.5x slower.
    """
    if b * m * t * itemsize <= _HOT_BATCH_BYTES:
        return True
    return problem_major and n_iter >= 2 and m * t * itemsize <= _HOT_PROBLEM_BYTES


@nb.njit(cache=True)
def _problem_major(b, nunits, nthreads, min_units_per_thread):
    """Whether to give each thread whole problems (see :func:`mu_run`'s Notes).

    Also for tiny work (fewer than ``min_units_per_thread`` column units per
    thread), where one parallel region per iteration would cost more than
    the iteration.
    """
    return b % nthreads == 0 or b >= 4 * nthreads or b * nunits < min_units_per_thread * nthreads


@nb.njit(cache=True)
def _chunking(nunits, b, nthreads):
    """``(chunks per problem, units per chunk)``: about two chunks per thread in all."""
    cpp = min(nunits, max(1, (2 * nthreads + b - 1) // b))
    upc = (nunits + cpp - 1) // cpp
    return (nunits + upc - 1) // upc, upc


#: shortest chunk of pixels (:func:`pixel_chunking`), and what chunk lengths are multiples of
#: (a cache line of float32)
CHUNK_MIN = 256
_CHUNK_ALIGN = 16


@nb.njit(cache=True)
def pixel_chunking(t, b, nthreads):
    """``(chunks per problem, pixels per chunk)`` for the blocked kernels' block-parallel schedule.

    About two chunks per thread in all, as :func:`_chunking`, but of equal
    lengths in pixels (multiples of 16, at least :data:`CHUNK_MIN`) rather
    than whole blocks: 9025 pixels in 1024-pixel blocks make 9 blocks, which
    two threads share as 6 against 3, or 5 against 4 at best; four chunks of
    2272 pixels share evenly. Each chunk runs in blocks of at most the block
    length.
    """
    cpp = min(max(1, (2 * nthreads + b - 1) // b), max(1, t // CHUNK_MIN))
    pc = (t + cpp - 1) // cpp
    pc = (pc + _CHUNK_ALIGN - 1) // _CHUNK_ALIGN * _CHUNK_ALIGN
    return (t + pc - 1) // pc, pc


@nb.njit(cache=True)
def _block_parallel_state(A, P, G, cpp, nthreads, pg_valid):
    """Double-buffered A and partial P, G per chunk, plus per-thread scratch for the A update.

    Slot 0 holds the start: A, and P, G in each problem's first chunk when
    ``pg_valid`` (the other partials are zero).
    """
    b, m, n = A.shape
    dt = A.dtype
    nchunks = b * cpp
    Ppart = np.zeros((2, nchunks, m, n), dt)
    Gpart = np.zeros((2, nchunks, n, n), dt)
    Abuf = np.empty((2, b, m, n), dt)
    for p in range(b):
        _copy(Abuf[0, p], A[p])
    if pg_valid:
        for p in range(b):
            _copy(Ppart[0, p * cpp], P[p])
            _copy(Gpart[0, p * cpp], G[p])
    scratch = (np.empty((nthreads, m, n), dt), np.empty((nthreads, m, n), dt), np.empty((nthreads, n, n), dt),
               np.empty((nthreads, n, n), dt), np.empty((nthreads, n), dt))
    return Ppart, Gpart, Abuf, scratch


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _chunk_a_update(c, cpp, src, Ppart, Gpart, Abuf, Wp, eps_a, l2a, l2s, Al, Pl, Gl, Hl, El):
    """A chunk's start of an iteration: its problem's P, G summed, the A update (into ``Al``),
    ``H = A'ᵀA' + l2s I`` (into ``Hl``), the new A stored by the problem's first chunk, and the
    chunk's slots for this iteration's partials cleared.

    ``eps_a``, ``l2a``, ``l2s``: :func:`_penalty_scalars`. The partials summed
    here are P and G (unshifted); H is formed whole from the whole new A, so
    its shift is added once, here.
    """
    p = c // cpp
    dst = 1 - src
    _reduce_problem(Ppart[src], Gpart[src], p * cpp, cpp, Pl, Gl)
    _copy(Al, Abuf[src, p])
    _a_update(Al, Wp, Pl, Gl, eps_a, l2a, Hl, El)
    _add_diag(Hl, l2s)
    if c % cpp == 0:
        _copy(Abuf[dst, p], Al)
    Ppart[dst, c] = 0
    Gpart[dst, c] = 0


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _block_parallel_pg(X, S, Ppart, Gpart, cpp, pc, tb, R):
    """The block-parallel schedules' start without carried P, G: each chunk's ``X Sᵀ``,
    ``S Sᵀ`` over its pixels (:func:`pixel_chunking`) into its slots of ``Ppart``, ``Gpart``
    (``R``: per-thread scratch)."""
    for c in prange(X.shape[0] * cpp):
        fp = enter_ftz()
        p = c // cpp
        tid = nb.get_thread_id()
        j0, j1 = _chunk_pixels(c, cpp, pc, S.shape[2])
        _pg_range(X[p], S[p], j0, j1, tb, Ppart[c], Gpart[c], R[tid])
        leave_ftz(fp)


@nb.njit(cache=True)
def _chunk_pixels(c, cpp, pc, t):
    """Chunk ``c``'s pixels ``j0 … j1−1`` (:func:`pixel_chunking`)."""
    j0 = (c % cpp) * pc
    return j0, min(t, j0 + pc)


@nb.njit(cache=True)
def _block_parallel_finish(A, P, G, Abuf, Ppart, Gpart, cpp, n_iter, accumulate_last):
    """The returned A, and P, G summed over each problem's chunks (when they are wanted)."""
    last = n_iter % 2
    for p in range(A.shape[0]):
        _copy(A[p], Abuf[last, p])
    if n_iter == 0 or accumulate_last:
        for p in range(A.shape[0]):
            _reduce_problem(Ppart[last], Gpart[last], p * cpp, cpp, P[p], G[p])


#: the row-parallel schedule's smallest chunk of rows, and the smallest m·t it runs for: a
#: guard against parallel regions that cost more than their work (at the guard, 512 × 64,
#: rank 4, the schedule still ran 16.5 against the column kernel's 20.3 µs per iteration)
ROW_CHUNK_MIN = 64
ROW_PARALLEL_MIN_WORK = 1 << 15
#: pixels per unit of the row-parallel schedule's S half
_S_UNIT = 256


@nb.njit(cache=True)
def row_chunks(b, m, t, itemsize, nthreads):
    """Chunks of rows per problem for the row-parallel schedules of :func:`mu_run` and
    :func:`fastmu.kernels.cpu_cd.cd_run`; 0 where the column-block schedules apply.

    A tall X (many rows, few pixels) has too few column blocks to share out, and
    the problem-major schedule would leave one or two problems on one thread.
    Both halves of an iteration (MU or CD) split by rows instead: A's rows are
    independent, and so are the rows of ``P = X Sᵀ``; ``AᵀX`` and ``AᵀA`` are
    sums of per-chunk parts. Each chunk reads its rows of X twice, for ``P``
    and for ``AᵀX``, so chunks hold at most half of ``_BLOCK_BYTES`` of X
    (the second read then hits cache), at least two per thread and a multiple
    of the threads in all. At 16384 × 65, float32, rank 4, on the 2-core dev
    machine (1 MB of L2 per core; fastest of three runs of 200 iterations),
    8–16 chunks ran 0.56–0.60 ms per iteration, 4–6 chunks 0.73–0.84, and 32
    chunks 0.69.
    """
    if nthreads < 2 or b % nthreads == 0 or b >= 4 * nthreads or m * t < ROW_PARALLEL_MIN_WORK:
        return 0
    nblk = (t + block_length(m, itemsize) - 1) // block_length(m, itemsize)
    if b * nblk >= 2 * nthreads:  # enough column blocks
        return 0
    # chunks of at most half of _BLOCK_BYTES, at least two per thread, a multiple of the threads in all
    slab = _BLOCK_BYTES // 2
    total = max(2 * nthreads, b * ((m * t * itemsize + slab - 1) // slab))
    total = (total + nthreads - 1) // nthreads * nthreads
    cpp = min((total + b - 1) // b, m // ROW_CHUNK_MIN)
    if cpp < 2:
        return 0
    rpc = (m + cpp - 1) // cpp
    return (m + rpc - 1) // rpc


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _rows_p(Xc, Sp, Pc, tb, Sb):
    """``Pc = Xc Sᵀ`` for a chunk of rows, column block by column block (``Sb`` scratch)."""
    rows = Xc.shape[0]
    n, t = Sp.shape
    Pc[:, :] = 0
    for j0 in range(0, t, tb):
        L = min(tb, t - j0)
        for k in range(n):
            for jj in range(L):
                Sb[k, jj] = Sp[k, j0 + jj]
        _p_block(Xc, Sb, rows, n, j0, L, Pc)


@nb.njit(cache=True)
def _rows_block(rows, t, itemsize):
    """Pixels per column block within a chunk of ``rows`` rows: equal blocks of at most
    :func:`block_length` (a last block of a pixel or two would cost a pass over the rows)."""
    nbl = (t + block_length(rows, itemsize) - 1) // block_length(rows, itemsize)
    return (t + nbl - 1) // nbl


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _rows_r(Xc, Ac, Rc, tb, Rb):
    """``Rc = Acᵀ Xc``: a chunk of rows' part of ``AᵀX``, column block by column block
    (``Rb`` scratch)."""
    rows = Xc.shape[0]
    t = Rc.shape[1]
    n = Ac.shape[1]
    for j0 in range(0, t, tb):
        L = min(tb, t - j0)
        _r_block(Xc, Ac, rows, n, j0, L, Rb, True)  # the chunk's rows were just read for P
        for k in range(n):
            for jj in range(L):
                Rc[k, j0 + jj] = Rb[k, jj]


@nb.njit(cache=True)
def _rows_state(X, A, S, G, pg_valid, cpp, nthreads):
    """What both row-parallel schedules allocate, and ``G = S Sᵀ`` where it is not carried in.

    Returns ``rpc`` (rows per chunk), ``tb`` (pixels per column block),
    ``nsu`` (pixel units per problem), the per-chunk parts of ``AᵀX`` and
    ``AᵀA``, the per-unit parts of ``S'S'ᵀ``, their sums ``Rsum``, ``H``, and
    per-thread scratch ``Rb`` (n × ≥ tb, ≥ ``_S_UNIT``).
    """
    b, m = X.shape[0], X.shape[1]
    t = S.shape[2]
    n = A.shape[2]
    dt = X.dtype
    rpc = (m + cpp - 1) // cpp
    tb = _rows_block(rpc, t, X.itemsize)
    nsu = (t + _S_UNIT - 1) // _S_UNIT
    Rpart = np.empty((b * cpp, n, t), dt)
    Hpart = np.empty((b * cpp, n, n), dt)
    Gpart = np.empty((b * nsu, n, n), dt)
    Rsum = np.empty((b, n, t), dt)
    H = np.empty((b, n, n), dt)
    Rb = np.empty((nthreads, n, max(tb, _S_UNIT)), dt)
    if not pg_valid:
        for p in range(b):
            G[p] = 0
            _gram_block(S[p], n, t, G[p])
    return rpc, tb, nsu, Rpart, Hpart, Gpart, Rsum, H, Rb


@nb.njit(cache=True)
def _chunk_rows(c, cpp, rpc, m):
    """Chunk ``c``'s problem and rows ``r0 … r1−1``."""
    r0 = (c % cpp) * rpc
    return c // cpp, r0, min(m, r0 + rpc)


@nb.njit(cache=True)
def _s_unit(u, nsu, Rsum, R):
    """Pixel unit ``u``'s problem, first pixel and length; its columns of ``AᵀX`` into ``R``."""
    p = u // nsu
    j0 = (u % nsu) * _S_UNIT
    L = min(_S_UNIT, Rsum.shape[2] - j0)
    for k in range(Rsum.shape[1]):
        for jj in range(L):
            R[k, jj] = Rsum[p, k, j0 + jj]
    return p, j0, L


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _sum_chunks(Rpart, Hpart, cpp, Rsum, H):
    """Each problem's ``AᵀX`` and ``AᵀA``: the sums of its chunks' parts, in chunk order."""
    for p in range(H.shape[0]):
        _reduce_problem(Rpart, Hpart, p * cpp, cpp, Rsum[p], H[p])


@nb.njit(cache=True)
def _sum_units(Gpart, nsu, G):
    """``G[p]``: the sum of problem p's unit parts, in unit order."""
    for p in range(G.shape[0]):
        G[p] = 0
        for u in range(p * nsu, (p + 1) * nsu):
            _add(G[p], Gpart[u])


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _mu_rows(X, A, S, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, cpp, penalty):
    """:func:`mu_run` with the rows shared out (``cpp`` chunks per problem; :func:`row_chunks`).

    Per iteration two parallel regions. Over the chunks: the chunk's rows of
    ``P`` from the current S (skipped where carried in), the A update of its
    rows, then its part of ``AᵀX`` and ``AᵀA``, its rows of X still in cache.
    Over blocks of pixels: the parts summed in chunk order, the S update, and
    the block's part of ``S'S'ᵀ``. After the last iteration one more pass over
    the chunks leaves ``P`` for the returned S, where it is wanted.

    ``AᵀA`` is a sum of per-chunk parts here, so ``l2_S`` joins its diagonal
    after the sum (adding it per chunk would add it ``cpp`` times).
    """
    b, m = X.shape[0], X.shape[1]
    n = A.shape[2]
    dt = X.dtype
    eps_a, l2a, eps_s, l2s = _penalty_scalars(X, eps, penalty)
    wstep = 0 if W.shape[0] == 1 else 1
    rpc, tb, nsu, Rpart, Hpart, Gpart, Rsum, H, Rb = _rows_state(X, A, S, G, pg_valid, cpp, nthreads)
    Dk = np.empty((nthreads, _S_UNIT), dt)
    Erow = np.empty((nthreads, n), dt)
    for it in range(n_iter + 1):
        last = it == n_iter
        want_p = (it > 0 or not pg_valid) and (not last or accumulate_last or n_iter == 0)
        for c in prange(b * cpp):
            fp = enter_ftz()
            p, r0, r1 = _chunk_rows(c, cpp, rpc, m)
            tid = nb.get_thread_id()
            Xc = X[p, r0:r1]
            if want_p:
                _rows_p(Xc, S[p], P[p, r0:r1], tb, Rb[tid])
            if not last:
                Ac = A[p, r0:r1]
                _a_update(Ac, W[p * wstep, r0:r1], P[p, r0:r1], G[p], eps_a, l2a, Hpart[c], Erow[tid])
                _rows_r(Xc, Ac, Rpart[c], tb, Rb[tid])
            leave_ftz(fp)
        if last:
            break
        acc = accumulate_last or it < n_iter - 1
        _sum_chunks(Rpart, Hpart, cpp, Rsum, H)
        for p in range(b):  # H complete: its L2 shift, once
            _add_diag(H[p], l2s)
        for u in prange(b * nsu):
            fp = enter_ftz()
            tid = nb.get_thread_id()
            R = Rb[tid]
            p, j0, L = _s_unit(u, nsu, Rsum, R)
            if n == 4:
                _s_update4(H[p], S[p], j0, L, eps_s, R)
            else:
                _s_update(H[p], S[p], j0, L, eps_s, R, Dk[tid])
            if acc:  # R holds the new S
                Gpart[u] = 0
                _gram_block(R, n, L, Gpart[u])
            leave_ftz(fp)
        if acc:
            _sum_units(Gpart, nsu, G)


#: ``mu_run``'s default penalty: none (plain MU)
NO_PENALTY: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


def penalty_tuple(penalty: Sequence[float] | None) -> tuple[float, float, float, float]:
    """``penalty`` (a :class:`fastmu.penalty.Penalty`, any sequence of four numbers, or None)
    as the plain tuple of four Python floats the compiled schedules take.

    A tuple of one type keeps the schedules at one compiled signature; a
    NamedTuple or NumPy scalars would each compile their own.
    """
    if penalty is None:
        return NO_PENALTY
    l1a, l2a, l1s, l2s = (float(v) for v in penalty)
    return (l1a, l2a, l1s, l2s)


def mu_run(X, A, S, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, penalty=NO_PENALTY) -> None:
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
        ``n_iter`` is 0. They never include the penalty (the L2 shift of G is
        added where the A update loads it), so :func:`objective_from_pg` gives
        the data term ``0.5‖X − A S‖²`` and a run may change its penalty
        between calls on carried P, G.
    n_iter
        Number of iterations (A update then S update).
    eps
        ε added to every denominator.
    pg_valid, accumulate_last
        See ``P, G``.
    nthreads
        ``numba.config.NUMBA_NUM_THREADS`` (sizes the per-thread scratch; a
        run-time argument so that cached machine code stays valid).
    penalty
        ``(l1_A, l2_A, l1_S, l2_S)``, finite and ≥ 0 (not checked here;
        :func:`fastmu.penalty.check_penalty` validates): the weights of
        :mod:`fastmu.penalty`, a plain tuple or a
        :class:`~fastmu.penalty.Penalty`. The updates become
        ``A ⊙ W ⊙ P ⊘ (A (G + l2_A I) + ε + l1_A)`` and
        ``S ⊙ (A'ᵀX) ⊘ ((A'ᵀA' + l2_S I) S + ε + l1_S)``. All zeros (the
        default) is plain (learned) MU, bit for bit. Padded zero components
        (:func:`pad_rank`) stay zero: their numerators are 0 and their
        denominators at least ``ε + l1 > 0``.

    Notes
    -----
    Three schedules, chosen by the shape of the batch:

    - *problem-major* (``b`` a multiple of the thread count, at least four
      per thread, or too little work to share): each thread runs all
      iterations of its own problems, so a problem's X stays in that core's L2
      across iterations and threads never wait for each other;
    - *block-parallel* (one or a few problems): the column blocks of every
      problem are spread over the threads and the partial P, G are reduced
      after each iteration;
    - *row-parallel* (one or a few tall problems, too few column blocks to
      go round the threads; :func:`row_chunks`): chunks of rows are spread
      over the threads instead (:func:`_mu_rows`).

    Each schedule is a compiled function of its own, chosen here in Python,
    so that a first call compiles only the one it runs (Numba compiles on
    first use; with an empty cache that is most of a first call's time). As
    one function the two column schedules made a first call on one 65 × 16384
    problem take 48.6 s; the block-parallel one alone, 36–37 s (2-core AMD
    EPYC, float32).

    The penalty enters each schedule as four scalars outside the per-pixel
    loops (:func:`_penalty_scalars`): ``ε + l1_A`` and ``l2_A`` in the A
    update (:func:`_a_update`), ``l2_S`` on the diagonal of ``H = A'ᵀA'``
    once H is complete (:func:`_add_diag`; after the chunks' parts are summed
    in the row-parallel schedule), and ``ε + l1_S`` in place of ε in the S
    update. The unpenalised run executes the same loops as before.
    """
    b, m = X.shape[0], X.shape[1]
    t = S.shape[2]
    pen = NO_PENALTY if penalty is NO_PENALTY else penalty_tuple(penalty)
    which = schedule(b, m, t, X.itemsize, nthreads)
    if which == "rows":  # tall X, few pixels: share out the rows
        cpp = row_chunks(b, m, t, X.itemsize, nthreads)
        _mu_rows(X, A, S, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, cpp, pen)
    elif which == "problem-major":
        _mu_problem_major(X, A, S, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, pen)
    else:
        _mu_block_parallel(X, A, S, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, pen)


def schedule(b: int, m: int, t: int, itemsize: int, nthreads: int) -> str:
    """The schedule :func:`mu_run` runs ``X (b, m, t)`` with.

    ``"problem-major"`` (one parallel region for the whole run),
    ``"block-parallel"`` or ``"rows"`` (one region per iteration: the
    threads wait for each other every iteration).
    """
    if row_chunks(b, m, t, itemsize, nthreads) > 0:
        return "rows"
    tb = block_length(m, itemsize)
    nblk = (t + tb - 1) // tb
    return "problem-major" if _problem_major(b, nblk, nthreads, 2) else "block-parallel"


@nb.njit(cache=True)
def _columns_scratch(X, n, nthreads):
    """Per-problem ``H``, ``E`` and per-thread ``R``, ``D`` scratch of the column schedules."""
    b, m = X.shape[0], X.shape[1]
    tb = block_length(m, X.itemsize)
    dt = X.dtype
    return (np.empty((b, n, n), dt), np.empty((b, n), dt), np.empty((nthreads, n, tb), dt),
            np.empty((nthreads, tb), dt))


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _mu_problem_major(X, A, S, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, penalty):
    """Problem-major: each thread runs every iteration of its own problems."""
    b, m = X.shape[0], X.shape[1]
    t = S.shape[2]
    tb = block_length(m, X.itemsize)
    nblk = (t + tb - 1) // tb
    eps_a, l2a, eps_s, l2s = _penalty_scalars(X, eps, penalty)
    H, Erow, R, Dk = _columns_scratch(X, A.shape[2], nthreads)
    wstep = 0 if W.shape[0] == 1 else 1  # W shared by the batch, or one per problem
    hot = _hot(b, m, t, X.itemsize, n_iter, True)
    for p in prange(b):
        fp = enter_ftz()  # subnormals are slow: see fpenv.py
        tid = nb.get_thread_id()
        Pp = P[p]
        Gp = G[p]
        if not pg_valid:
            Pp[:, :] = 0
            Gp[:, :] = 0
            _pg_range(X[p], S[p], 0, t, tb, Pp, Gp, R[tid])
        for it in range(n_iter):
            acc = accumulate_last or it < n_iter - 1
            _a_update(A[p], W[p * wstep], Pp, Gp, eps_a, l2a, H[p], Erow[p])
            _add_diag(H[p], l2s)
            Pp[:, :] = 0
            Gp[:, :] = 0
            for blk in range(nblk):
                j0 = blk * tb
                _s_chunk(X[p], A[p], H[p], S[p], j0, min(tb, t - j0), eps_s, acc,
                         Pp, Gp, R[tid], Dk[tid], hot)
        leave_ftz(fp)


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _mu_block_parallel(X, A, S, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, penalty):
    """Block-parallel: each problem's pixels are cut into chunks, about two per thread overall.

    One parallel region per iteration: every chunk sums its problem's partial
    P, G of the previous iteration and recomputes the tiny A update itself, so
    no second barrier is needed. A and the partials are double-buffered (read
    slot it % 2, write the other), so a chunk never reads what another chunk
    of the same iteration writes.
    """
    b, m = X.shape[0], X.shape[1]
    t = S.shape[2]
    tb = block_length(m, X.itemsize)
    eps_a, l2a, eps_s, l2s = _penalty_scalars(X, eps, penalty)
    _, _, R, Dk = _columns_scratch(X, A.shape[2], nthreads)
    wstep = 0 if W.shape[0] == 1 else 1
    cpp, pc = pixel_chunking(t, b, nthreads)  # chunks per problem, pixels per chunk
    hot = _hot(b, m, t, X.itemsize, n_iter, False)
    Ppart, Gpart, Abuf, (Al, Pl, Gl, Hl, El) = _block_parallel_state(A, P, G, cpp, nthreads, pg_valid)
    if not pg_valid:
        _block_parallel_pg(X, S, Ppart[0], Gpart[0], cpp, pc, tb, R)

    for it in range(n_iter):
        src = it % 2
        acc = accumulate_last or it < n_iter - 1
        for c in prange(b * cpp):
            fp = enter_ftz()
            p = c // cpp
            tid = nb.get_thread_id()
            _chunk_a_update(c, cpp, src, Ppart, Gpart, Abuf, W[p * wstep], eps_a, l2a, l2s, Al[tid], Pl[tid],
                            Gl[tid], Hl[tid], El[tid])
            c0, c1 = _chunk_pixels(c, cpp, pc, t)
            for j0 in range(c0, c1, tb):
                _s_chunk(X[p], Al[tid], Hl[tid], S[p], j0, min(tb, c1 - j0), eps_s, acc,
                         Ppart[1 - src, c], Gpart[1 - src, c], R[tid], Dk[tid], hot)
            leave_ftz(fp)
    _block_parallel_finish(A, P, G, Abuf, Ppart, Gpart, cpp, n_iter, accumulate_last)


def padded_rank(n: int) -> int:
    """The rank the blocked kernel runs rank ``n`` at: ``n`` or the next multiple of 4.

    The 4 × 4 register tiles leave components past a multiple of 4 to slower
    remainder loops; zero components (:func:`pad_rank`) cost arithmetic but
    run in the tiles. Measured on the dev machine (150 × 65×1024, 156 ×
    9025, 65 × 16384; 512- and 256-bit code): padding won for ranks 1, 2, 3,
    6 and 7 (up to 2.5x at rank 3) and lost for rank 5 (1.1-1.6x slower),
    so ranks ``4k + 1`` above 4 keep their rank.
    """
    r = n % 4
    if r == 0 or (n > 4 and r == 1):
        return n
    return n + 4 - r


def pad_rank(A: np.ndarray, S: np.ndarray, W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of ``A (b, m, n)``, ``S (b, n, t)``, ``W (bw, m, n)`` at rank ``rank ≥ n``.

    The added components are zero in A and S, so they stay exactly zero
    (``0·W·P / (… + ε + l1_A) = 0``, ``0·R / (… + ε + l1_S) = 0``, with or
    without penalties) and contribute exact zeros to ``P``, ``G`` and ``H``
    (but for ``l2_S`` on H's diagonal, which multiplies the zero row of S):
    the first n components follow the rank-n iteration. W's added columns
    are ones (any value would do).
    """
    b, m, n = A.shape
    Ak = np.zeros((b, m, rank), A.dtype)
    Ak[:, :, :n] = A
    Sk = np.zeros((b, rank, S.shape[2]), S.dtype)
    Sk[:, :n] = S
    Wk = np.ones((W.shape[0], m, rank), W.dtype)
    Wk[:, :, :n] = W
    return Ak, Sk, Wk


@nb.njit(cache=True, parallel=True)
def copy_rows(Sk, S):
    """``S[...] = Sk[:, :n, :t]`` for ``S (b, n, t)``: the real part of a padded S."""
    b, n, t = S.shape
    for c in prange(b * n):
        p = c // n
        k = c % n
        for j in range(t):
            S[p, k, j] = Sk[p, k, j]


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def objective_from_pg(X2, A, P, G, out):
    """``0.5‖X − A S‖²`` per problem from ``‖X‖²``, ``P = X Sᵀ``, ``G = S Sᵀ`` (float64).

    ``‖X − AS‖² = ‖X‖² − 2⟨A, P⟩ + ⟨AᵀA, G⟩``: no pass over X. Cancellation
    limits its accuracy to about ``eps(dtype)·‖X‖²``: fine for float64's
    stopping tests. In float32 that error (~6e-8·‖X‖², P and G being float32
    sums) passes the decrease a ``tol`` check looks for once the fit is
    good, and stopped runs hundreds of iterations early: float32 runs use
    :func:`residual_partials` instead.
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


#: pixels per (problem, tile) work item of :func:`residual_partials`
RESIDUAL_TILE = 2048


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def residual_row(xr, a, S2, j0, y):
    """``Σ_j (xr[j] − Σ_k a[k] S2[k, j0 + j])²`` over ``j < len(xr)``: the model in ``y`` (X's
    dtype, one vectorised pass per component), the differences and squares in float64."""
    w = xr.shape[0]
    s0 = S2[0, j0:j0 + w]
    for j in range(w):
        y[j] = a[0] * s0[j]
    for k in range(1, a.shape[0]):
        ak = a[k]
        sk = S2[k, j0:j0 + w]
        for j in range(w):
            y[j] += ak * sk[j]
    row = 0.0
    for j in range(w):
        d = np.float64(xr[j]) - np.float64(y[j])
        row += d * d
    return row


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def residual_partials(X, A, S, out):
    """``out[p, c] = ‖X[p] − A[p] S[p]‖²`` over the pixels of tile ``c``: one pass over X.

    For float32 runs, where :func:`objective_from_pg`'s cancellation is too
    coarse for ``tol``: the model ``A S`` is formed in X's dtype (its error,
    ``eps·|A S|`` per entry, puts an error of about ``eps·‖R‖·‖X‖`` on the
    result, as scikit-learn's own float32 residual has), the differences and
    their squares in float64. Tiles of :data:`RESIDUAL_TILE` pixels are the
    parallel work items; X may be wider than S (a padded copy): its first
    ``t`` columns count. The caller sums ``out`` over tiles in a fixed order.
    """
    b = A.shape[0]
    t = S.shape[2]
    nt = out.shape[1]
    for q in prange(b * nt):
        p = q // nt
        j0 = (q % nt) * RESIDUAL_TILE
        w = min(t - j0, RESIDUAL_TILE)
        y = np.empty(w, S.dtype)
        acc = 0.0
        for i in range(X.shape[1]):
            acc += residual_row(X[p, i, j0:j0 + w], A[p, i], S[p], j0, y)
        out[p, q % nt] = acc
