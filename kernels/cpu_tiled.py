"""Rank-4 fused MU on a tiled copy of X: one read of X from L2 per iteration, explicit SIMD.

The blocked kernels of :mod:`fastmu.kernels.cpu` read each 1024-pixel
block of X twice per iteration (``A'ᵀX`` for the S update, then ``X S'ᵀ``);
the block does not fit in L1, so both reads come from L2, and on the dev
machine L2 bandwidth, not the FMA units, bounded the iteration. Here the
unit of work is a *tile* of ``4·lanes`` pixels (64 for float32 with 512-bit
vectors): its 65 rows of X (17 kB) are read from L2 once for ``A'ᵀX``, whose
16 vector accumulators stay in registers, the tile's S is updated in
registers, and the second use of the rows, ``X S'ᵀ``, hits L1. Partial
``X S'ᵀ`` sums are kept lane-wide (one vector per entry of P) and reduced to
scalars once per chunk of tiles, so small tiles cost no horizontal sums.

X is copied once per solve into tile-major order, ``Xt (b, ntile, m, TW)``,
zero-padded past ``t``: a tile's rows are then one contiguous 17 kB run
(rows of the caller's X lie 4 kB or more apart, so the rows of one tile
would compete for the same L1 sets). S lives in a padded copy
``Sp (b, 4, ntile·TW)`` whose padding stays zero: padded pixels have X = 0
and S = 0, so their update gives ``0·0/ε = 0`` and adds nothing to P or G.

Semantics are those of :func:`fastmu.kernels.cpu.mu_run` for ``n = 4``,
penalties included::

    A' = A ⊙ W ⊙ (X Sᵀ) ⊘ (A (S Sᵀ + l2_A I) + ε + l1_A)
    S' = S ⊙ (A'ᵀ X) ⊘ ((A'ᵀ A' + l2_S I) S + ε + l1_S)

The A update is the blocked kernel's; in the tile the penalty is already in
the splatted ``H`` (``l2_S`` on its diagonal) and ε (``ε + l1_S``), so the
tile's code is the same with and without it. The schedules (problem-major,
block-parallel) are the same. Lower ranks run
through it padded with zero components (:func:`fastmu.kernels.cpu.pad_rank`).
"""
from __future__ import annotations

import os

import numba as nb
import numpy as np
from numba import prange

from fastmu.kernels.cpu import (
    NO_PENALTY,
    RESIDUAL_TILE,
    _FM,
    _a_update,
    _add_diag,
    _block_parallel_finish,
    _block_parallel_state,
    _chunk_a_update,
    _chunking,
    _penalty_scalars,
    _problem_major,
    penalty_tuple,
    residual_row,
)
from fastmu.kernels.fpenv import enter_ftz, leave_ftz
from fastmu.kernels.simd import VECTOR_BYTES, lanes_for, vdiv, vfma, vhsum, vlanes, vload, vmul, vsplat, vstore, vzeros

#: vectors per tile row (16 accumulators: 4 components × 4 vectors)
NV = 4
#: cache line: the alignment of the tiled copies and the scratch
LINE = 64


def available(n_components: int) -> bool:
    """Whether the tiled kernel serves rank ``n_components`` on this process's CPU target.

    Ranks 1 to 4 (below 4 padded by the caller with
    :func:`fastmu.kernels.cpu.pad_rank`), and only with 512-bit vectors: with
    256-bit registers (16 of them on AVX2) the 16 accumulators
    spill and the tiled kernel measured about half the speed of the blocked
    one, and a two-vector variant without spills 0.71-0.74x
    (``NUMBA_CPU_NAME=haswell`` on the dev machine). ``FASTMU_CPU_TILED=0``
    turns it off (read on every call, for A/B runs).
    """
    return 1 <= n_components <= 4 and VECTOR_BYTES == 64 and os.environ.get("FASTMU_CPU_TILED", "1") != "0"


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = LINE) -> np.ndarray:
    """An uninitialised C array whose data start on an ``align``-byte boundary.

    NumPy's large allocations start 16 bytes past a page boundary, so every
    64-byte vector load would straddle two cache lines.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    buf = np.empty(count * dtype.itemsize + align, np.uint8)
    off = -buf.ctypes.data % align
    return buf[off : off + count * dtype.itemsize].view(dtype).reshape(shape)


def make_tiled(X: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aligned, zero-padded tiled copies ``(Xt, Sp)`` of ``X (b, m, t)`` and ``S (b, 4, t)``."""
    b, m, t = X.shape
    tw = tile_width(X.itemsize)
    ntile = -(-t // tw)
    Xt = aligned_empty((b, ntile, m, tw), X.dtype)
    Sp = aligned_empty((b, S.shape[1], ntile * tw), X.dtype)
    pack(X, S, Xt, Sp)
    return Xt, Sp


def tile_width(itemsize: int) -> int:
    """Pixels per tile for elements of ``itemsize`` bytes."""
    return NV * lanes_for(itemsize)


@nb.njit(cache=True, parallel=True)
def pack(X, S, Xt, Sp):
    """Copy ``X (b, m, t)`` into tiles ``Xt`` and ``S (b, n, t)`` into ``Sp``, zero-padded."""
    b, m, t = X.shape
    ntile, tw = Xt.shape[1], Xt.shape[3]
    for c in prange(b * ntile):
        p = c // ntile
        q = c % ntile
        j0 = q * tw
        L = min(tw, t - j0)
        for i in range(m):
            for jj in range(L):
                Xt[p, q, i, jj] = X[p, i, j0 + jj]
            for jj in range(L, tw):
                Xt[p, q, i, jj] = 0
        for k in range(S.shape[1]):
            for jj in range(L):
                Sp[p, k, j0 + jj] = S[p, k, j0 + jj]
            for jj in range(L, tw):
                Sp[p, k, j0 + jj] = 0


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _ld4(arr, o, w):
    return vload(arr, o), vload(arr, o + w), vload(arr, o + 2 * w), vload(arr, o + 3 * w)


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _st4(arr, o, w, v):
    vstore(arr, o, v[0])
    vstore(arr, o + w, v[1])
    vstore(arr, o + 2 * w, v[2])
    vstore(arr, o + 3 * w, v[3])


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _axpy4(c, x, r):
    """``r + c·x`` for four vectors (c a splatted scalar)."""
    return vfma(c, x[0], r[0]), vfma(c, x[1], r[1]), vfma(c, x[2], r[2]), vfma(c, x[3], r[3])


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _dot4(x, s, acc):
    """``acc + Σ_q x_q ⊙ s_q`` (lane-wise; one vector entry of P kept lane-wide)."""
    return vfma(x[3], s[3], vfma(x[2], s[2], vfma(x[1], s[1], vfma(x[0], s[0], acc))))


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _s1(ak, rk, a0, a1, a2, a3, h0, h1, h2, h3, e):
    """``a_k r_k / (h_k0 a0 + h_k1 a1 + h_k2 a2 + h_k3 a3 + ε)`` on one vector (exact division)."""
    return vdiv(vmul(ak, rk), vfma(h3, a3, vfma(h2, a2, vfma(h1, a1, vfma(h0, a0, e)))))


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _snew4(sk, rk, s0, s1, s2, s3, h0, h1, h2, h3, e):
    """New values of component k on the tile's four vectors (``s0``..``s3``: old S by component)."""
    return (
        _s1(sk[0], rk[0], s0[0], s1[0], s2[0], s3[0], h0, h1, h2, h3, e),
        _s1(sk[1], rk[1], s0[1], s1[1], s2[1], s3[1], h0, h1, h2, h3, e),
        _s1(sk[2], rk[2], s0[2], s1[2], s2[2], s3[2], h0, h1, h2, h3, e),
        _s1(sk[3], rk[3], s0[3], s1[3], s2[3], s3[3], h0, h1, h2, h3, e),
    )


@nb.njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _tile(xt, Ap, Hp, sp, so, eps, update, accumulate, pw, gw):
    """One tile: S update (``update``) and its lane-wide ``X S'ᵀ``, ``S' S'ᵀ`` added to ``pw``, ``gw``.

    ``xt (m, TW)`` is the tile of X, ``sp (4, tpad)`` the problem's padded S
    (the tile starts at column ``so``), ``pw`` holds ``m·4`` vectors (entry
    ``(i, k)`` at vector ``4i + k``), ``gw`` 10 (upper triangle of G, row-major).
    ``Hp`` is ``A'ᵀA' + l2_S I`` and ``eps`` the S update's ``ε + l1_S``.
    """
    w = vlanes(xt)
    m = xt.shape[0]
    tp = sp.shape[1]
    s0 = _ld4(sp, so, w)
    s1 = _ld4(sp, tp + so, w)
    s2 = _ld4(sp, 2 * tp + so, w)
    s3 = _ld4(sp, 3 * tp + so, w)
    if update:
        z = vzeros(xt)
        r0 = (z, z, z, z)
        r1 = (z, z, z, z)
        r2 = (z, z, z, z)
        r3 = (z, z, z, z)
        for i in range(m):  # A'ᵀX: 16 accumulators in registers, 4 rows of the tile per row of A
            x = _ld4(xt, i * 4 * w, w)
            r0 = _axpy4(vsplat(Ap[i, 0]), x, r0)
            r1 = _axpy4(vsplat(Ap[i, 1]), x, r1)
            r2 = _axpy4(vsplat(Ap[i, 2]), x, r2)
            r3 = _axpy4(vsplat(Ap[i, 3]), x, r3)
        e = vsplat(eps)
        h00, h01, h02, h03 = vsplat(Hp[0, 0]), vsplat(Hp[0, 1]), vsplat(Hp[0, 2]), vsplat(Hp[0, 3])
        h11, h12, h13 = vsplat(Hp[1, 1]), vsplat(Hp[1, 2]), vsplat(Hp[1, 3])
        h22, h23, h33 = vsplat(Hp[2, 2]), vsplat(Hp[2, 3]), vsplat(Hp[3, 3])
        # H is symmetric: h_lk = h_kl.
        n0 = _snew4(s0, r0, s0, s1, s2, s3, h00, h01, h02, h03, e)
        n1 = _snew4(s1, r1, s0, s1, s2, s3, h01, h11, h12, h13, e)
        n2 = _snew4(s2, r2, s0, s1, s2, s3, h02, h12, h22, h23, e)
        n3 = _snew4(s3, r3, s0, s1, s2, s3, h03, h13, h23, h33, e)
        _st4(sp, so, w, n0)
        _st4(sp, tp + so, w, n1)
        _st4(sp, 2 * tp + so, w, n2)
        _st4(sp, 3 * tp + so, w, n3)
    else:
        n0, n1, n2, n3 = s0, s1, s2, s3
    if not accumulate:
        return
    for i in range(m):  # X S'ᵀ: the tile's rows are in L1 now
        x = _ld4(xt, i * 4 * w, w)
        o = i * 4 * w
        vstore(pw, o, _dot4(x, n0, vload(pw, o)))
        vstore(pw, o + w, _dot4(x, n1, vload(pw, o + w)))
        vstore(pw, o + 2 * w, _dot4(x, n2, vload(pw, o + 2 * w)))
        vstore(pw, o + 3 * w, _dot4(x, n3, vload(pw, o + 3 * w)))
    vstore(gw, 0, _dot4(n0, n0, vload(gw, 0)))
    vstore(gw, w, _dot4(n0, n1, vload(gw, w)))
    vstore(gw, 2 * w, _dot4(n0, n2, vload(gw, 2 * w)))
    vstore(gw, 3 * w, _dot4(n0, n3, vload(gw, 3 * w)))
    vstore(gw, 4 * w, _dot4(n1, n1, vload(gw, 4 * w)))
    vstore(gw, 5 * w, _dot4(n1, n2, vload(gw, 5 * w)))
    vstore(gw, 6 * w, _dot4(n1, n3, vload(gw, 6 * w)))
    vstore(gw, 7 * w, _dot4(n2, n2, vload(gw, 7 * w)))
    vstore(gw, 8 * w, _dot4(n2, n3, vload(gw, 8 * w)))
    vstore(gw, 9 * w, _dot4(n3, n3, vload(gw, 9 * w)))


@nb.njit(cache=True, error_model="numpy", fastmath=_FM)
def _tiles(Xtp, Ap, Hp, sp, q0, q1, eps, update, accumulate, Pc, Gc, pw, gw):
    """Tiles ``q0 .. q1-1`` of one problem; adds their ``X S'ᵀ``, ``S' S'ᵀ`` to ``Pc``, ``Gc``."""
    m = Xtp.shape[1]
    w = vlanes(pw)
    tw = Xtp.shape[2]
    if accumulate:
        z = vzeros(pw)
        for v in range(4 * m):
            vstore(pw, v * w, z)
        for v in range(10):
            vstore(gw, v * w, z)
    for q in range(q0, q1):
        _tile(Xtp[q], Ap, Hp, sp, q * tw, eps, update, accumulate, pw, gw)
    if not accumulate:
        return
    for i in range(m):
        for k in range(4):
            Pc[i, k] += vhsum(vload(pw, (4 * i + k) * w))
    v = 0
    for k in range(4):
        for l in range(k, 4):
            g = vhsum(vload(gw, v * w))
            Gc[k, l] += g
            if l != k:
                Gc[l, k] += g
            v += 1


@nb.njit(cache=True)
def _aligned_rows(nrows, rowlen, like):
    """``(nrows, rowlen)`` scratch of ``like``'s dtype starting on a cache line.

    Rows are whole vectors, so every row starts on a cache line too.
    """
    pad = LINE // like.itemsize
    buf = np.empty(nrows * rowlen + pad, like.dtype)
    off = (-buf.ctypes.data % LINE) // like.itemsize
    return buf[off : off + nrows * rowlen].reshape((nrows, rowlen))


def mu_run(Xt, A, Sp, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, penalty=NO_PENALTY) -> None:
    """:func:`fastmu.kernels.cpu.mu_run` for ``n = 4`` on ``Xt``/``Sp`` from :func:`pack`.

    ``Sp`` holds S (padded) and is updated in place; :func:`fastmu.kernels.cpu.copy_rows` copies it out.
    The problem-major and block-parallel schedules are two compiled functions, so that a first call
    compiles only the one it runs.

    Parameters
    ----------
    Xt, Sp
        The tiled X and padded S of :func:`make_tiled` / :func:`pack`.
    A, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads
        As in :func:`fastmu.kernels.cpu.mu_run` (rank 4).
    penalty
        ``(l1_A, l2_A, l1_S, l2_S)``, as in :func:`fastmu.kernels.cpu.mu_run`: a plain tuple or a
        :class:`~fastmu.penalty.Penalty`; all zeros (the default) is plain MU, bit for bit. P and
        G stay ``X Sᵀ`` and ``S Sᵀ`` (unshifted).
    """
    pen = NO_PENALTY if penalty is NO_PENALTY else penalty_tuple(penalty)
    if schedule(Xt.shape[0], Xt.shape[1], nthreads) == "problem-major":
        _tiled_problem_major(Xt, A, Sp, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, pen)
    else:
        _tiled_block_parallel(Xt, A, Sp, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, pen)


def schedule(b: int, ntile: int, nthreads: int) -> str:
    """``"problem-major"`` or ``"block-parallel"``: the schedule :func:`mu_run` runs ``b`` problems
    of ``ntile`` tiles with (see :func:`fastmu.kernels.cpu.schedule`)."""
    # tiles are 16x smaller units than the blocked kernel's column blocks
    return "problem-major" if _problem_major(b, ntile, nthreads, 8) else "block-parallel"


@nb.njit(cache=True)
def _tiled_scratch(Xt, nthreads):
    """Per-thread ``P`` and ``G`` lane partials, each row on a cache line."""
    m, tw = Xt.shape[2], Xt.shape[3]
    w = tw // NV  # lanes
    return _aligned_rows(nthreads, 4 * m * w, Xt), _aligned_rows(nthreads, 10 * w, Xt)


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _tiled_problem_major(Xt, A, Sp, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, penalty):
    """Problem-major: each thread runs every iteration of its own problems."""
    b, ntile = Xt.shape[0], Xt.shape[1]
    n = A.shape[2]
    dt = Xt.dtype
    eps_a, l2a, eps_s, l2s = _penalty_scalars(Xt, eps, penalty)
    H = np.empty((b, n, n), dt)
    Erow = np.empty((b, n), dt)
    PW, GW = _tiled_scratch(Xt, nthreads)
    wstep = 0 if W.shape[0] == 1 else 1
    for p in prange(b):
        fp = enter_ftz()
        tid = nb.get_thread_id()
        Pp = P[p]
        Gp = G[p]
        if not pg_valid:
            Pp[:, :] = 0
            Gp[:, :] = 0
            _tiles(Xt[p], A[p], H[p], Sp[p], 0, ntile, eps_s, False, True, Pp, Gp, PW[tid], GW[tid])
        for it in range(n_iter):
            acc = accumulate_last or it < n_iter - 1
            _a_update(A[p], W[p * wstep], Pp, Gp, eps_a, l2a, H[p], Erow[p])
            _add_diag(H[p], l2s)  # H is whole here: its L2 shift, once
            Pp[:, :] = 0
            Gp[:, :] = 0
            _tiles(Xt[p], A[p], H[p], Sp[p], 0, ntile, eps_s, True, acc, Pp, Gp, PW[tid], GW[tid])
        leave_ftz(fp)


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def _tiled_block_parallel(Xt, A, Sp, W, P, G, n_iter, eps, pg_valid, accumulate_last, nthreads, penalty):
    """Block-parallel, as :func:`fastmu.kernels.cpu._mu_block_parallel`: chunks of tiles,
    double-buffered A and partials (the penalty enters in :func:`fastmu.kernels.cpu._chunk_a_update`
    and the tile's ε)."""
    b, ntile = Xt.shape[0], Xt.shape[1]
    eps_a, l2a, eps_s, l2s = _penalty_scalars(Xt, eps, penalty)
    PW, GW = _tiled_scratch(Xt, nthreads)
    wstep = 0 if W.shape[0] == 1 else 1
    cpp, tpc = _chunking(ntile, b, nthreads)  # chunks per problem, tiles per chunk
    Ppart, Gpart, Abuf, (Al, Pl, Gl, Hl, El) = _block_parallel_state(A, P, G, cpp, nthreads, pg_valid)
    if not pg_valid:
        for c in prange(b * cpp):
            fp = enter_ftz()
            p = c // cpp
            tid = nb.get_thread_id()
            q0 = (c % cpp) * tpc
            _tiles(Xt[p], A[p], Hl[tid], Sp[p], q0, min(ntile, q0 + tpc), eps_s, False, True,
                   Ppart[0, c], Gpart[0, c], PW[tid], GW[tid])
            leave_ftz(fp)

    for it in range(n_iter):
        src = it % 2
        acc = accumulate_last or it < n_iter - 1
        for c in prange(b * cpp):
            fp = enter_ftz()
            p = c // cpp
            tid = nb.get_thread_id()
            _chunk_a_update(c, cpp, src, Ppart, Gpart, Abuf, W[p * wstep], eps_a, l2a, l2s, Al[tid], Pl[tid],
                            Gl[tid], Hl[tid], El[tid])
            q0 = (c % cpp) * tpc
            _tiles(Xt[p], Al[tid], Hl[tid], Sp[p], q0, min(ntile, q0 + tpc), eps_s, True, acc,
                   Ppart[1 - src, c], Gpart[1 - src, c], PW[tid], GW[tid])
            leave_ftz(fp)
    _block_parallel_finish(A, P, G, Abuf, Ppart, Gpart, cpp, n_iter, accumulate_last)


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=_FM)
def residual_partials(Xt, A, Sp, out):
    """:func:`fastmu.kernels.cpu.residual_partials` on the tiled copies: ``out[p, c]`` is
    ``‖X − A S‖²`` over the ``c``-th run of :data:`fastmu.kernels.cpu.RESIDUAL_TILE` pixels
    (whole tiles) of problem ``p``, ``Xt (b, ntile, m, tw)``, ``Sp (b, 4, ntile·tw)``.

    Reading the tiled copy the iterations read, rather than the caller's X,
    keeps it in cache for the next iteration. The zero padding (pixels,
    components) adds exact zeros.
    """
    b, ntile, m, tw = Xt.shape
    per = max(1, RESIDUAL_TILE // tw)  # tiles per work item
    nc = out.shape[1]
    for c in prange(b * nc):
        p = c // nc
        q0 = (c % nc) * per
        y = np.empty(tw, Xt.dtype)
        acc = 0.0
        for q in range(q0, min(ntile, q0 + per)):
            for i in range(m):
                acc += residual_row(Xt[p, q, i], A[p, i], Sp[p], q * tw, y)
        out[p, c % nc] = acc


def residual_items(Xt) -> int:
    """The work items per problem of :func:`residual_partials` (``out``'s second axis)."""
    per = max(1, RESIDUAL_TILE // Xt.shape[3])
    return -(-Xt.shape[1] // per)
