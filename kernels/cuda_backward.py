"""One learned-MU layer on NVIDIA GPUs (Numba CUDA): forward and handwritten backward.

Same math, arguments and semantics as :mod:`fastmu.kernels.cpu_backward`
(the equations of :mod:`fastmu.kernels.cpu_backward`); arrays are C-contiguous Numba device arrays (e.g.
``numba.cuda.as_cuda_array`` of torch tensors), and everything is queued on
the caller's stream without synchronising the host.

Forward: one launch of the fused out-of-place iteration of
:mod:`fastmu.kernels.cuda` (``layer_step``), with ``P``/``G`` handed in and
out so that a model reads X once per layer.

Backward, five launches, every barrier inside a block (the CUDA simulator,
which CI runs, has no grid-wide barrier and no warp shuffles):

1. ``prep`` — one block per problem: ``E = A G + ε``, ``A' = A ⊙ W ⊙ P ⊘ E``,
   ``H = A'ᵀA'``.
2. ``pass1`` — grid (pixel tiles, problems), one thread per pixel column:
   recompute ``R_j = A'ᵀ X_j`` and ``D_j`` in registers, form ``gR``, ``gU``,
   write the column-local part of ``gS``; stage ``gR``, ``gU``, ``S`` of the
   tile in shared memory and let each thread reduce a few of the tile's
   ``X gRᵀ`` (m·n) and ``gU Sᵀ`` (n²) entries. Each tile writes its partial
   sums to its own slot (no atomics).
3. ``tiny`` — one block per problem: the partials summed in tile order, then
   the §4 equations through A' (``gA``, ``gW`` per problem, ``gP``, ``gQ``,
   ``gG + gGᵀ``).
4. ``sum_w`` — one block (shared W only): ``gW = Σ_p gW_p`` in problem order.
5. ``pass2`` — grid (tiles, problems), one thread per pixel column:
   ``gS += gPᵀX + (gG + gGᵀ) S``; ``gX = gP S + A' gR`` when asked.

All sums run in a fixed order (partials per tile, reduced in tile order), so
the backward is bit-reproducible run to run, as on the CPU (the forward's
P, G reductions use atomics, whose order varies on a GPU).

With the forward's ``"regs"`` staging (:func:`fastmu.kernels.cuda.set_staging`)
passes 1 and 2 use its layout instead (:func:`_build_regs`): warps split the
rows of 32-pixel tiles and hold X in registers, so a thread's loads are in
flight together rather than one row after another; pass 1's pixel sums stay
in registers over a block's tiles and are summed over lanes in lane order
into one partial slot per block. Still fixed orders, still no atomics.

Kernels are specialised per (dtype, n, threads per block): ``n`` sizes the
per-thread register arrays. ``FASTMU_CUDA_BWD_THREADS`` (default 128; tests
use 32) sets the threads per block = pixel tile width.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from typing import Any

import numba
import numpy as np
from numba import cuda

from fastmu.kernels.cuda_launch import Launcher, is_c_contiguous, is_torch, np_dtype

#: largest rank the backward kernels are compiled for (per-thread registers: 5·n)
MAX_N = 16

_threads = int(os.environ.get("FASTMU_CUDA_BWD_THREADS", "128"))


def set_threads(threads: int) -> None:
    """Threads per block (= pixel tile width) of the backward kernels."""
    global _threads
    if threads < 1 or threads > 1024:
        raise ValueError(f"threads must be in [1, 1024], got {threads}")
    _threads = int(threads)


@functools.lru_cache(maxsize=None)
def _build(dtype_name: str, n: int, tpb: int):
    """Compile (lazily, on first launch) the backward kernels for one dtype, rank and block size."""
    nb_dtype = {"float32": np.float32, "float64": np.float64}[dtype_name]
    from numba import types

    ty = types.float32 if dtype_name == "float32" else types.float64

    @cuda.jit
    def prep(A, W, P, G, eps, E, Aq, H):
        p = cuda.blockIdx.x
        tx = cuda.threadIdx.x
        m = A.shape[1]
        pw = p if W.shape[0] > 1 else 0
        for e in range(tx, m * n, tpb):
            i = e // n
            k = e % n
            acc = eps
            for l in range(n):
                acc += A[p, i, l] * G[p, l, k]
            E[p, i, k] = acc
            Aq[p, i, k] = A[p, i, k] * W[pw, i, k] * P[p, i, k] / acc
        cuda.syncthreads()
        for e in range(tx, n * n, tpb):
            k = e // n
            l = e % n
            acc = ty(0)
            for i in range(m):
                acc += Aq[p, i, k] * Aq[p, i, l]
            H[p, k, l] = acc

    @cuda.jit
    def pass1(X, Aq, H, S, gSo, eps, need_gS, gS, XgRpart, gHpart):
        tile = cuda.blockIdx.x
        p = cuda.blockIdx.y
        tx = cuda.threadIdx.x
        m = X.shape[1]
        t = X.shape[2]
        j0 = tile * tpb
        j = j0 + tx
        gR_sh = cuda.shared.array((n, tpb), ty)
        gU_sh = cuda.shared.array((n, tpb), ty)
        S_sh = cuda.shared.array((n, tpb), ty)
        s = cuda.local.array(n, ty)
        r = cuda.local.array(n, ty)
        gu = cuda.local.array(n, ty)
        if j < t:
            for k in range(n):
                s[k] = S[p, k, j]
                r[k] = 0
            for i in range(m):
                x = X[p, i, j]
                for k in range(n):
                    r[k] += Aq[p, i, k] * x
            for k in range(n):
                d = eps
                for l in range(n):
                    d += H[p, k, l] * s[l]
                q = gSo[p, k, j] / d
                so = s[k] * r[k] / d  # S', rounded as in the forward
                gR_sh[k, tx] = q * s[k]
                gu[k] = -q * so
                gU_sh[k, tx] = gu[k]
                r[k] = q * r[k]
                S_sh[k, tx] = s[k]
            if need_gS:
                for k in range(n):
                    acc = r[k]
                    for l in range(n):
                        acc += H[p, k, l] * gu[l]
                    gS[p, k, j] = acc
        else:
            for k in range(n):
                gR_sh[k, tx] = 0
                gU_sh[k, tx] = 0
                S_sh[k, tx] = 0
        cuda.syncthreads()
        L = min(tpb, t - j0)
        for e in range(tx, m * n, tpb):
            i = e // n
            k = e % n
            acc = ty(0)
            for jj in range(L):
                acc += X[p, i, j0 + jj] * gR_sh[k, jj]
            XgRpart[tile, p, i, k] = acc
        for e in range(tx, n * n, tpb):
            k = e // n
            l = e % n
            acc = ty(0)
            for jj in range(L):
                acc += gU_sh[k, jj] * S_sh[l, jj]
            gHpart[tile, p, k, l] = acc

    @cuda.jit
    def tiny(A, W, P, G, E, Aq, gAo, has_gSo, XgRpart, gHpart, need_gA, need_gW, gA, gWp, gH, gP, gQ, gG, Gs):
        p = cuda.blockIdx.x
        tx = cuda.threadIdx.x
        m = A.shape[1]
        ntiles = XgRpart.shape[0]
        pw = p if W.shape[0] > 1 else 0
        if has_gSo:
            for e in range(tx, n * n, tpb):
                k = e // n
                l = e % n
                acc = ty(0)
                for c in range(ntiles):
                    acc += gHpart[c, p, k, l]
                gH[p, k, l] = acc
            cuda.syncthreads()
        for e in range(tx, m * n, tpb):
            i = e // n
            k = e % n
            acc = gAo[p, i, k]
            if has_gSo:
                x = ty(0)
                for c in range(ntiles):
                    x += XgRpart[c, p, i, k]
                acc += x
                for l in range(n):
                    acc += Aq[p, i, l] * (gH[p, l, k] + gH[p, k, l])
            g = acc / E[p, i, k]
            if need_gA:
                gA[p, i, k] = g * W[pw, i, k] * P[p, i, k]
            if need_gW:
                gWp[p, i, k] = g * A[p, i, k] * P[p, i, k]
            gP[p, i, k] = g * A[p, i, k] * W[pw, i, k]
            gQ[p, i, k] = -g * Aq[p, i, k]
        cuda.syncthreads()
        if need_gA:
            for e in range(tx, m * n, tpb):
                i = e // n
                k = e % n
                acc = ty(0)
                for l in range(n):
                    acc += gQ[p, i, l] * G[p, l, k]
                gA[p, i, k] += acc
        for e in range(tx, n * n, tpb):
            k = e // n
            l = e % n
            acc = ty(0)
            for i in range(m):
                acc += A[p, i, k] * gQ[p, i, l]
            gG[p, k, l] = acc
        cuda.syncthreads()
        for e in range(tx, n * n, tpb):
            k = e // n
            l = e % n
            Gs[p, k, l] = gG[p, k, l] + gG[p, l, k]

    @cuda.jit
    def sum_w(gWp, gW):
        tx = cuda.threadIdx.x
        b = gWp.shape[0]
        m = gWp.shape[1]
        for e in range(tx, m * n, tpb):
            i = e // n
            k = e % n
            acc = ty(0)
            for q in range(b):
                acc += gWp[q, i, k]
            gW[0, i, k] = acc

    @cuda.jit
    def pass2(X, Aq, H, S, gSo, gP, Gs, eps, has_gSo, need_gS, need_gX, gS, gX):
        tile = cuda.blockIdx.x
        p = cuda.blockIdx.y
        tx = cuda.threadIdx.x
        m = X.shape[1]
        t = X.shape[2]
        j = tile * tpb + tx
        if j >= t:
            return
        s = cuda.local.array(n, ty)
        r = cuda.local.array(n, ty)
        for k in range(n):
            s[k] = S[p, k, j]
            r[k] = 0
        if need_gS:
            for i in range(m):
                x = X[p, i, j]
                for k in range(n):
                    r[k] += gP[p, i, k] * x
            for k in range(n):
                acc = r[k]
                for l in range(n):
                    acc += Gs[p, k, l] * s[l]
                if has_gSo:
                    gS[p, k, j] += acc
                else:
                    gS[p, k, j] = acc
        if need_gX:
            for k in range(n):  # r ← gR_j (zero without an upstream gS')
                if has_gSo:
                    d = eps
                    for l in range(n):
                        d += H[p, k, l] * s[l]
                    r[k] = gSo[p, k, j] / d * s[k]
                else:
                    r[k] = 0
            for i in range(m):
                acc = ty(0)
                for k in range(n):
                    acc += gP[p, i, k] * s[k] + Aq[p, i, k] * r[k]
                gX[p, i, j] = acc

    return prep, pass1, tiny, sum_w, pass2, nb_dtype


@functools.lru_cache(maxsize=None)
def _build_regs(dtype_name: str, n: int, rg: int, rpg: int, exact: bool = False):
    """The two passes over X in the ``"regs"`` layout of :mod:`fastmu.kernels.cuda`.

    A block is ``rg`` warps over 32-pixel tiles; warp ``g`` holds rows
    ``g·rpg ...`` of the tile's columns (one per lane) in registers, so a
    thread's loads of X are all in flight at once. Grid ``(bpp, b)``: block
    ``bx`` takes tiles ``bx, bx + bpp, ...`` of problem ``blockIdx.y``.
    Reductions over rows meet in shared memory and are summed in warp order;
    reductions over pixels stay in per-thread registers over the block's
    tiles and are summed over lanes in lane order at the end, into the
    block's own slot of ``XgRpart`` / ``gHpart``: fixed orders throughout,
    so the backward stays bit-reproducible.
    """
    from numba import types

    ty = types.float32 if dtype_name == "float32" else types.float64
    isz = 4 if dtype_name == "float32" else 8
    TW = 32
    RG, RPG = rg, rpg
    nthr = TW * RG
    KPT = -(-n // RG)  # components finished per thread (k = g, g + RG, ...)
    KN = KPT * n
    VPT = RPG * n
    CH = _reduce_rows(RG, RPG, n, isz)
    CHN = CH * n
    NR = -(-RPG // CH)  # rounds
    RGN = RG * n  # shared shapes must be plain closure constants for the CUDA compiler
    TW1 = TW + 1
    # at least 512 resident threads per SM (at most 128 registers), as the forward;
    # the simulator's jit takes no launch bounds
    kjit = cuda.jit
    if not getattr(numba.config, "ENABLE_CUDASIM", 0):
        kjit = functools.partial(cuda.jit, launch_bounds=(nthr, max(1, 512 // nthr)))

    from fastmu.kernels.cuda import regs_helpers

    load_rows, share_rows, sum_shares = regs_helpers(dtype_name, n, RG, RPG, exact)
    u64 = numba.uint64
    EXACT = bool(exact)

    @cuda.jit(device=True)
    def load_small(Src, p, Dst, m, tid):
        """``Dst[i·n + k] = Src[p, i, k]`` (a per-problem m × n matrix into shared memory)."""
        for q in range(tid, m * n, nthr):
            Dst[q] = Src[p, q // n, q % n]

    @kjit
    def pass1(X, Aq, H, S, gSo, eps, need_gS, gS, XgRpart, gHpart):
        bx = cuda.blockIdx.x
        p = cuda.blockIdx.y
        nbx = cuda.gridDim.x
        tid = cuda.threadIdx.x
        lane = tid % TW
        g = tid // TW
        row0 = g * RPG
        m = X.shape[1]
        t = X.shape[2]
        zero = ty(0)
        Ash = cuda.shared.array(0, ty)  # A' (m × n)
        Hsh = cuda.shared.array((n, n), ty)
        Ssh = cuda.shared.array((n, TW), ty)
        Qsh = cuda.shared.array((n, TW), ty)  # gS' of the tile
        Xsh = cuda.shared.array((RGN, TW), ty)  # the warps' shares of R_j
        gRsh = cuda.shared.array((n, TW), ty)
        gUsh = cuda.shared.array((n, TW), ty)
        Rqsh = cuda.shared.array((n, TW), ty)  # gS' ⊙ R ⊘ D of the tile
        red = cuda.shared.array((RG, CHN, TW1), ty)
        load_small(Aq, p, Ash, m, tid)
        for q in range(tid, n * n, nthr):
            Hsh[q // n, q % n] = H[p, q // n, q % n]
        xr = cuda.local.array(RPG, ty)
        xg = cuda.local.array(VPT, ty)  # X gRᵀ partials: this thread's rows × components
        gh = cuda.local.array(KN, ty)  # gU Sᵀ partials: rows k = g + kk·RG
        sv = cuda.local.array(n, ty)
        for q in range(VPT):
            xg[q] = 0
        for q in range(KN):
            gh[q] = 0
        cuda.syncthreads()
        ntiles = (t + TW - 1) // TW
        for c in range(bx, ntiles, nbx):
            j = c * TW + lane
            valid = j < t
            load_rows(X, p, row0, j, valid, m, xr, 0)
            for kk in range(KPT):
                k = g + kk * RG
                if k < n:
                    Ssh[k, lane] = S[p, k, j] if valid else zero
                    Qsh[k, lane] = gSo[p, k, j] if valid else zero
            share_rows(Ash, row0, m, xr, 0, Xsh, g, lane)
            cuda.syncthreads()
            for l in range(n):
                sv[l] = Ssh[l, lane]
            for kk in range(KPT):
                k = g + kk * RG
                if k < n:
                    rk = sum_shares(Xsh, k, lane)
                    d = eps
                    for l in range(n):
                        d += Hsh[k, l] * sv[l]
                    q = Qsh[k, lane] / d
                    so = sv[k] * rk / d  # S', rounded as in the forward
                    gRsh[k, lane] = q * sv[k]
                    gUsh[k, lane] = -q * so
                    Rqsh[k, lane] = q * rk
            cuda.syncthreads()
            for kk in range(KPT):
                k = g + kk * RG
                if k < n:
                    gu = gUsh[k, lane]
                    if need_gS and valid:
                        acc = Rqsh[k, lane]
                        for l in range(n):
                            acc += Hsh[k, l] * gUsh[l, lane]
                        gS[p, k, j] = acc
                    for l in range(n):
                        gh[kk * n + l] += gu * sv[l]
            for k in range(n):
                gr = gRsh[k, lane]
                for r in range(RPG):
                    xg[r * n + k] += xr[r] * gr
            cuda.syncthreads()  # before the next tile overwrites the shared tiles
        # this block's partial sums, over lanes in lane order, into its own slot
        for rnd in range(NR):
            for v in range(CHN):
                r = rnd * CH + v // n
                if r < RPG:
                    red[g, v, lane] = xg[r * n + v % n]
            cuda.syncthreads()
            if lane < CHN:
                r = rnd * CH + lane // n
                i = row0 + r
                if r < RPG and i < m:
                    acc = zero
                    for ll in range(TW):
                        acc += red[g, lane, ll]
                    XgRpart[bx, p, i, lane % n] = acc
            cuda.syncthreads()
        for k in range(n):
            if g == k % RG:
                kk = k // RG
                for l in range(n):
                    red[0, l, lane] = gh[kk * n + l]
            cuda.syncthreads()
            if tid < n:
                acc = zero
                for ll in range(TW):
                    acc += red[0, tid, ll]
                gHpart[bx, p, k, tid] = acc
            cuda.syncthreads()

    @kjit
    def pass2(X, Aq, H, S, gSo, gP, Gs, eps, has_gSo, need_gS, need_gX, gS, gX):
        bx = cuda.blockIdx.x
        p = cuda.blockIdx.y
        nbx = cuda.gridDim.x
        tid = cuda.threadIdx.x
        lane = tid % TW
        g = tid // TW
        row0 = g * RPG
        m = X.shape[1]
        t = X.shape[2]
        zero = ty(0)
        dyn = cuda.shared.array(0, ty)
        Psh = dyn[: m * n]  # gP
        Ash = dyn[m * n : 2 * m * n]  # A'
        Hsh = cuda.shared.array((n, n), ty)
        GSsh = cuda.shared.array((n, n), ty)
        Ssh = cuda.shared.array((n, TW), ty)  # S of the tile
        Rsh = cuda.shared.array((n, TW), ty)  # gR of the tile (gX only)
        Xsh = cuda.shared.array((RGN, TW), ty)
        load_small(gP, p, Psh, m, tid)
        load_small(Aq, p, Ash, m, tid)
        for q in range(tid, n * n, nthr):
            Hsh[q // n, q % n] = H[p, q // n, q % n]
            GSsh[q // n, q % n] = Gs[p, q // n, q % n]
        xr = cuda.local.array(RPG, ty)
        sv = cuda.local.array(n, ty)
        rv = cuda.local.array(n, ty)
        cuda.syncthreads()
        ntiles = (t + TW - 1) // TW
        for c in range(bx, ntiles, nbx):
            j = c * TW + lane
            valid = j < t
            for kk in range(KPT):
                k = g + kk * RG
                if k < n:
                    Ssh[k, lane] = S[p, k, j] if valid else zero
            if need_gS:
                load_rows(X, p, row0, j, valid, m, xr, 0)
                share_rows(Psh, row0, m, xr, 0, Xsh, g, lane)
            cuda.syncthreads()
            for l in range(n):
                sv[l] = Ssh[l, lane]
            for kk in range(KPT):
                k = g + kk * RG
                if k < n:
                    if need_gS and valid:
                        acc = sum_shares(Xsh, k, lane)
                        for l in range(n):
                            acc += GSsh[k, l] * sv[l]
                        if has_gSo:
                            gS[p, k, j] += acc
                        else:
                            gS[p, k, j] = acc
                    if need_gX:
                        rk = zero
                        if has_gSo and valid:
                            d = eps
                            for l in range(n):
                                d += Hsh[k, l] * sv[l]
                            rk = gSo[p, k, j] / d * sv[k]
                        Rsh[k, lane] = rk
            cuda.syncthreads()
            if need_gX and valid:
                for k in range(n):
                    rv[k] = Rsh[k, lane]
                # unsigned indices (no wraparound code) and, for a warp whose rows
                # all lie below m, no guard per row (as in the forward's loads)
                pu, ju = u64(p), u64(j)
                full = EXACT or row0 + RPG <= m
                for r in range(RPG):
                    i = row0 + r
                    if full or i < m:
                        acc = zero
                        for k in range(n):
                            acc += Psh[u64(i * n + k)] * sv[k] + Ash[u64(i * n + k)] * rv[k]
                        gX[pu, u64(i), ju] = acc
            # No barrier needed here: the next tile writes Ssh and Xsh before its
            # first barrier, after every thread has passed this tile's second
            # (all reads of them come before it), and Rsh after its first
            # barrier, which every thread reaches only when done with gX.

    return pass1, pass2


def _reduce_rows(rg: int, rpg: int, n: int, isz: int) -> int:
    """Rows of pass 1's per-thread partials reduced per round: the round's shared buffer
    ``(rg, rows·n, 33)`` stays within 24 kB, and one lane sums one entry."""
    return max(1, min(rpg, (24 * 1024 // (rg * 33 * isz)) // n, max(1, 32 // n)))


def regs_shared_bytes(dtype: Any, m: int, n: int, rg: int, rpg: int) -> int:
    """Shared memory per block of the larger ``"regs"`` backward pass (static + dynamic)."""
    isz = np.dtype(dtype).itemsize
    ch = _reduce_rows(rg, rpg, n, isz)
    pass1 = n * n + 6 * n * 32 + rg * n * 32 + rg * ch * n * 33 + m * n
    pass2 = 2 * n * n + 2 * n * 32 + rg * n * 32 + 2 * m * n
    return max(pass1, pass2) * isz


def backward_layout(dtype: Any, m: int, n: int) -> tuple[int, int] | None:
    """``(row groups, rows per group)`` when the backward passes use the ``"regs"`` layout, else None.

    They follow the forward's staging (:func:`fastmu.kernels.cuda.set_staging`,
    ``"auto"`` resolved by :func:`fastmu.kernels.cuda.choose_staging`):
    ``"regs"`` there selects them here too, up to n = 8, 32 warps per block
    and 48 kB of shared memory; otherwise the one-thread-per-column passes run.
    """
    from fastmu.kernels import cuda as kcuda

    cfg = kcuda.get_config()
    if n > kcuda.MAX_N:
        return None
    try:  # "auto" (the default) resolves as the forward's launch does
        staging = kcuda.choose_staging(dtype, m, n)
    except ValueError:
        return None
    if staging != "regs":
        return None
    rg, rpg = kcuda.regs_layout(dtype, m, n)
    if cfg["rows_per_thread"] is None and np.dtype(dtype).itemsize == 4 and n <= 4 and rg * rpg != m:
        # pass 1 keeps more per-thread state than the forward (gU Sᵀ partials, the
        # column's S). ptxas (sm_90, bench/sass_report.py): built for warps that
        # cover m exactly, 13 rows fit 126 registers and 16 rows spill 12 bytes; with
        # the code for a partial last warp as well, 13-16 rows spill 100-400 bytes
        # and 11 rows spill nothing
        rg = -(-int(m) // 11)
        rpg = -(-int(m) // rg)
    if rg > 32 or regs_shared_bytes(dtype, m, n, rg, rpg) > 48 * 1024:
        return None
    return rg, rpg


def _check(X: Any, A: Any, S: Any, W: Any, P: Any, G: Any) -> tuple[int, int, int, int]:
    b, m, t = X.shape
    n = A.shape[2]
    if tuple(A.shape) != (b, m, n) or tuple(S.shape) != (b, n, t):
        raise ValueError(f"inconsistent shapes X {X.shape}, A {A.shape}, S {S.shape}")
    if W.shape[0] not in (1, b) or tuple(W.shape[1:]) != (m, n):
        raise ValueError(f"W must be (1 or b, m, n), got {W.shape}")
    if tuple(P.shape) != (b, m, n) or tuple(G.shape) != (b, n, n):
        raise ValueError(f"P, G must be (b, m, n), (b, n, n), got {P.shape}, {G.shape}")
    dts = {np_dtype(a) for a in (X, A, S, W, P, G)}
    if len(dts) != 1 or np_dtype(X).name not in ("float32", "float64"):
        raise TypeError(f"all arrays must share one dtype, float32 or float64; got {sorted(d.name for d in dts)}")
    if n > MAX_N:
        raise ValueError(f"n = {n} exceeds the CUDA backward's MAX_N = {MAX_N}")
    return b, m, t, n


def _device_alloc(stream: Any):
    def alloc(shape: tuple[int, ...], dtype: Any) -> Any:
        return cuda.device_array(shape, dtype, stream=stream)

    return alloc


class LayerPlan:
    """The launches of a learned-MU layer's forward and backward for one shape, planned once.

    Every layer of a model has X's shape, the dtype and W's batch ``bw`` (1:
    shared W; ``b``: one per problem), so a model plans once per call and
    each layer then only launches: kernels, grids and shared-memory sizes
    are chosen here, and each launch site is a
    :class:`~fastmu.kernels.cuda_launch.Launcher`. The backward's scratch
    arrays come from ``alloc(shape, dtype)`` at the first backward that needs
    them and are reused by later ones: every launch of a plan is queued on its
    one ``stream``, in order, so a layer's kernels are done with them before
    the next layer's overwrite them. The forward's and the backward's launches
    are planned at their first use (a single-layer call plans only its own).
    Arrays are all Numba device arrays or all torch CUDA tensors (see
    :func:`layer_forward`, :func:`layer_backward`).
    """

    def __init__(self, b: int, m: int, t: int, n: int, dtype: Any, bw: int, stream: Any = 0,
                 alloc: Any = None) -> None:
        dt = np.dtype(dtype)
        if n > MAX_N:
            raise ValueError(f"n = {n} exceeds the CUDA backward's MAX_N = {MAX_N}")
        from fastmu.kernels.cuda import _MAX_GRID_Y

        if b > _MAX_GRID_Y:  # the forward's and the passes' grids have one row per problem
            raise ValueError(
                f"the CUDA learned layer runs at most {_MAX_GRID_Y} problems per call (one grid row "
                f"each), got b = {b}; split the batch"
            )
        self.shape, self.dtype, self.bw, self.stream = (b, m, t, n), dt, int(bw), stream
        self.alloc = alloc or _device_alloc(stream)
        self._step: Launcher | None = None  # the forward's launch site, planned at the first forward
        self._bwd: tuple | None = None  # the backward's, planned at the first backward
        self._scratch: dict[str, Any] = {}
        self._in_session = False

    def _sites(self) -> list[Launcher]:
        return ([self._step] if self._step else []) + (list(self._bwd[1:]) if self._bwd else [])

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """A span of launches with no foreign code between them (one forward or backward of a
        layer stack): each launch site then skips the checks of arrays passed again as the
        same object as in its previous launch (X, the scratch; see
        :meth:`~fastmu.kernels.cuda_launch.Launcher.session`)."""
        self._in_session = True
        for site in self._sites():
            site.session()
        try:
            yield
        finally:
            self._in_session = False
            for site in self._sites():
                site.end_session()

    def _plan_forward(self) -> Launcher:
        from fastmu.kernels import cuda as kcuda

        b, m, t, n = self.shape
        k, _, bpp, dyn = kcuda._kernels_for(b, m, t, n, self.dtype, flat_ok=False)
        self._step = Launcher(k.layer_step, (bpp, b), k.tpb, self.stream, dyn)
        if self._in_session:
            self._step.session()
        return self._step

    def _plan_backward(self) -> tuple:
        from fastmu.kernels import cuda as kcuda

        b, m, t, n = self.shape
        dt, stream = self.dtype, self.stream
        tpb = _threads
        prep, pass1, tiny, sum_w, pass2, _ = _build(dt.name, n, tpb)
        ntiles = math.ceil(t / tpb)
        lay = backward_layout(dt, m, n)
        if lay is not None:  # the "regs" passes: grid (bpp, b), one partial slot per block
            pass1, pass2 = _build_regs(dt.name, n, *lay, exact=lay[0] * lay[1] == m)
            nthr = 32 * lay[0]
            # one wave of blocks (as the forward), each with its own partial slot
            nslots = kcuda.choose_mode(b, t, 32, resident=max(1, 512 // nthr), flat_ok=False)[1]
            grid1 = grid2 = (nslots, b)
            dyn1, dyn2 = m * n * dt.itemsize, 2 * m * n * dt.itemsize
        else:  # one thread per pixel column: one partial slot per tile
            nslots = ntiles
            nthr, grid1, grid2, dyn1, dyn2 = tpb, (ntiles, b), (ntiles, b), 0, 0
        self._bwd = (
            nslots,
            Launcher(prep, b, tpb, stream, 0),
            Launcher(pass1, grid1, nthr, stream, dyn1),
            Launcher(tiny, b, tpb, stream, 0),
            Launcher(sum_w, 1, tpb, stream, 0),
            Launcher(pass2, grid2, nthr, stream, dyn2),
        )
        if self._in_session:
            for site in self._bwd[1:]:
                site.session()
        return self._bwd

    def _buf(self, name: str, *shape: int) -> Any:
        arr = self._scratch.get(name)
        if arr is None or tuple(arr.shape) != shape:
            arr = self._scratch[name] = self.alloc(shape, self.dtype)
        return arr

    def _quad(self, name: str, *shape: int) -> tuple:
        """Four scratch arrays of ``shape`` as views of one allocation (fewer allocations and,
        for torch, one op for the four views: a torch select costs µs), kept with the plan."""
        views = self._scratch.get(name)
        if views is None:
            arr = self.alloc((4, *shape), self.dtype)
            views = self._scratch[name] = tuple(arr.unbind(0)) if is_torch(arr) else tuple(arr[q] for q in range(4))
        return views

    def forward(self, X, A, S, W, P, G, eps, pg_valid, accumulate, A_out, S_out, P_out, G_out) -> None:
        """:func:`layer_forward` on arrays this plan was made for, ``P_out``, ``G_out`` (and
        ``P``, ``G`` unless ``pg_valid``) already zeroed; nothing is checked."""
        step = self._step or self._plan_forward()
        epsd = self.dtype.type(eps)
        if not pg_valid:  # P = X Sᵀ, G = S Sᵀ of the input S (the backward needs them too)
            step(X, S, S_out, W, A, P, G, A_out, P, G, epsd, False, True)
        step(X, S, S_out, W, A, P, G, A_out, P_out, G_out, epsd, True, bool(accumulate))

    def backward(self, X, A, S, W, P, G, gAo, gSo, eps, has_gSo,
                 need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX) -> None:
        """:func:`layer_backward` on arrays this plan was made for; nothing is checked."""
        nslots, prep, pass1, tiny, sum_w, pass2 = self._bwd or self._plan_backward()
        b, m, t, n = self.shape
        buf = self._buf
        E, Aq, gP, gQ = self._quad("mn", b, m, n)
        H, gH, gG, Gs = self._quad("nn", b, n, n)
        shared_w = self.bw == 1
        gWp = gW if (need_gW and not shared_w) else buf("gWp", b if need_gW else 1, m, n)
        if has_gSo:
            XgRpart, gHpart = buf("XgR", nslots, b, m, n), buf("gH", nslots, b, n, n)
        else:
            XgRpart, gHpart = buf("XgR1", 1, 1, 1, 1), buf("gH1", 1, 1, 1, 1)
        gA_ = gA if need_gA else buf("gA1", 1, 1, 1)
        epsd = self.dtype.type(eps)

        prep(A, W, P, G, epsd, E, Aq, H)
        if has_gSo:
            pass1(X, Aq, H, S, gSo, epsd, bool(need_gS), gS, XgRpart, gHpart)
        tiny(A, W, P, G, E, Aq, gAo, bool(has_gSo), XgRpart, gHpart, bool(need_gA), bool(need_gW),
             gA_, gWp, gH, gP, gQ, gG, Gs)
        if need_gW and shared_w:
            sum_w(gWp, gW)
        if need_gS or need_gX:
            pass2(X, Aq, H, S, gSo, gP, Gs, epsd, bool(has_gSo), bool(need_gS), bool(need_gX), gS, gX)


def layer_forward(
    X, A, S, W, P, G, eps, pg_valid, accumulate, A_out, S_out, P_out, G_out, stream=0, alloc=None, zeroed=False,
) -> None:
    """One learned-MU layer, out of place (see :func:`fastmu.kernels.cpu_backward.layer_forward`).

    ``P``, ``G`` are read when ``pg_valid`` and written otherwise; ``P_out``,
    ``G_out`` receive ``X S'ᵀ``, ``S' S'ᵀ`` when ``accumulate``. One launch
    of :func:`fastmu.kernels.cuda.layer_step` (two when ``P``, ``G`` must be
    computed first). The sums are accumulated with atomics into zeroed
    arrays: pass ``zeroed=True`` when the caller already zeroed ``P_out``,
    ``G_out`` (and ``P``, ``G`` when not ``pg_valid``), else they are
    zeroed here (Numba arrays only: whoever allocates torch tensors zeroes
    them, ``torch.zeros``). ``alloc`` is accepted for symmetry with
    :func:`layer_backward`; the forward needs no scratch memory.
    """
    from fastmu.kernels import cuda as kcuda

    b, m, t, n = _check(X, A, S, W, P, G)
    tensors = is_torch(X)
    for name, arr, shape in (("A_out", A_out, (b, m, n)), ("S_out", S_out, (b, n, t))) + (
            (("P_out", P_out, (b, m, n)), ("G_out", G_out, (b, n, n))) if accumulate else ()):
        kind_ok = is_torch(arr) if tensors else cuda.devicearray.is_cuda_ndarray(arr)
        if not kind_ok or tuple(arr.shape) != shape or not is_c_contiguous(arr):
            raise ValueError(f"{name} must be a C-contiguous array of shape {shape}, of the same kind as X")
        if np_dtype(arr) != np_dtype(X):
            raise TypeError(f"{name} has dtype {arr.dtype} but X has {np_dtype(X)}")
    if tensors and not zeroed and (accumulate or not pg_valid):
        raise ValueError("torch tensors must come zeroed (zeroed=True): allocate them with torch.zeros")
    if not zeroed:
        if not pg_valid:
            kcuda.zero_fill(P, stream)
            kcuda.zero_fill(G, stream)
        if accumulate:
            kcuda.zero_fill(P_out, stream)
            kcuda.zero_fill(G_out, stream)
    plan = LayerPlan(b, m, t, n, np_dtype(X), W.shape[0], stream, alloc)
    plan.forward(X, A, S, W, P, G, eps, pg_valid, accumulate, A_out, S_out, P_out, G_out)


def layer_backward(
    X, A, S, W, P, G, gAo, gSo, eps, has_gSo,
    need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX, stream=0, alloc=None,
) -> None:
    """Gradients of one learned-MU layer (see :func:`fastmu.kernels.cpu_backward.layer_backward`).

    ``alloc(shape, dtype)`` makes the scratch arrays, as in :func:`layer_forward`.
    """
    b, m, t, n = _check(X, A, S, W, P, G)
    plan = LayerPlan(b, m, t, n, np_dtype(X), W.shape[0], stream, alloc)
    plan.backward(X, A, S, W, P, G, gAo, gSo, eps, has_gSo, need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX)
