"""One learned-MU layer on NVIDIA GPUs (Numba CUDA): forward and handwritten backward.

Same math, arguments and semantics as :mod:`fastmu.kernels.cpu_backward`
(the equations of :mod:`fastmu.kernels.cpu_backward`); arrays are C-contiguous Numba device arrays (e.g.
``numba.cuda.as_cuda_array`` of torch tensors), and everything is queued on
the caller's stream without synchronising the host.

Forward: the fused one-iteration kernel of :mod:`fastmu.kernels.cuda`
(``mu_run`` with ``n_iter=1``) on copies of A and S, with ``P``/``G`` handed
in and out so that a model reads X once per layer.

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

Kernels are specialised per (dtype, n, threads per block): ``n`` sizes the
per-thread register arrays. ``FASTMU_CUDA_BWD_THREADS`` (default 128; tests
use 32) sets the threads per block = pixel tile width.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
from numba import cuda

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


def _check(X: Any, A: Any, S: Any, W: Any, P: Any, G: Any) -> tuple[int, int, int, int]:
    b, m, t = X.shape
    n = A.shape[2]
    if tuple(A.shape) != (b, m, n) or tuple(S.shape) != (b, n, t):
        raise ValueError(f"inconsistent shapes X {X.shape}, A {A.shape}, S {S.shape}")
    if W.shape[0] not in (1, b) or tuple(W.shape[1:]) != (m, n):
        raise ValueError(f"W must be (1 or b, m, n), got {W.shape}")
    if tuple(P.shape) != (b, m, n) or tuple(G.shape) != (b, n, n):
        raise ValueError(f"P, G must be (b, m, n), (b, n, n), got {P.shape}, {G.shape}")
    dts = {np.dtype(a.dtype) for a in (X, A, S, W, P, G)}
    if len(dts) != 1 or np.dtype(X.dtype).name not in ("float32", "float64"):
        raise TypeError(f"all arrays must share one dtype, float32 or float64; got {sorted(d.name for d in dts)}")
    if n > MAX_N:
        raise ValueError(f"n = {n} exceeds the CUDA backward's MAX_N = {MAX_N}")
    return b, m, t, n


def _device_alloc(stream: Any):
    def alloc(shape: tuple[int, ...], dtype: Any) -> Any:
        return cuda.device_array(shape, dtype, stream=stream)

    return alloc


def layer_forward(
    X, A, S, W, P, G, eps, pg_valid, accumulate, A_out, S_out, P_out, G_out, stream=0, alloc=None,
) -> None:
    """One learned-MU layer, out of place (see :func:`fastmu.kernels.cpu_backward.layer_forward`).

    ``P``, ``G`` are read when ``pg_valid`` and written otherwise; ``P_out``,
    ``G_out`` receive ``X S'ᵀ``, ``S' S'ᵀ`` when ``accumulate``. ``alloc(shape,
    dtype)`` makes scratch device arrays (default: Numba allocations on
    ``stream``; the torch layer passes torch's caching allocator).
    """
    from fastmu.kernels import cuda as kcuda

    alloc = alloc or _device_alloc(stream)
    b, m, t, n = _check(X, A, S, W, P, G)
    A_out.copy_to_device(A, stream=stream)
    S_out.copy_to_device(S, stream=stream)
    if not pg_valid:
        # n_iter = 0: only P = X Sᵀ, G = S Sᵀ of the input (kept for the backward)
        kcuda.mu_run(X, A_out, S_out, W, P, G, 0, eps, False, True, stream=stream)
    if accumulate:
        Pw, Gw = P_out, G_out
    else:  # mu_run updates P, G in place; the saved input values must survive
        Pw = alloc(P.shape, P.dtype)
        Gw = alloc(G.shape, G.dtype)
    Pw.copy_to_device(P, stream=stream)
    Gw.copy_to_device(G, stream=stream)
    ws = kcuda.GridWorkspace(alloc)
    kcuda.mu_run(X, A_out, S_out, W, Pw, Gw, 1, eps, True, bool(accumulate), stream=stream, workspace=ws)


def layer_backward(
    X, A, S, W, P, G, gAo, gSo, eps, has_gSo,
    need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX, stream=0, alloc=None,
) -> None:
    """Gradients of one learned-MU layer (see :func:`fastmu.kernels.cpu_backward.layer_backward`).

    ``alloc(shape, dtype)`` makes the scratch arrays, as in :func:`layer_forward`.
    """
    alloc = alloc or _device_alloc(stream)
    b, m, t, n = _check(X, A, S, W, P, G)
    dt = np.dtype(X.dtype)
    tpb = _threads
    prep, pass1, tiny, sum_w, pass2, _ = _build(dt.name, n, tpb)
    ntiles = math.ceil(t / tpb)
    bw = W.shape[0]
    epsd = dt.type(eps)

    def buf(*shape: int) -> Any:
        return alloc(shape, dt)

    E, Aq, gP, gQ = buf(b, m, n), buf(b, m, n), buf(b, m, n), buf(b, m, n)
    H, gH, gG, Gs = buf(b, n, n), buf(b, n, n), buf(b, n, n), buf(b, n, n)
    gWp = gW if (need_gW and bw != 1) else buf(b if need_gW else 1, m, n)
    if has_gSo:
        XgRpart, gHpart = buf(ntiles, b, m, n), buf(ntiles, b, n, n)
    else:
        XgRpart, gHpart = buf(1, 1, 1, 1), buf(1, 1, 1, 1)
    gA_ = gA if need_gA else buf(1, 1, 1)

    prep[b, tpb, stream](A, W, P, G, epsd, E, Aq, H)
    if has_gSo:
        pass1[(ntiles, b), tpb, stream](X, Aq, H, S, gSo, epsd, bool(need_gS), gS, XgRpart, gHpart)
    tiny[b, tpb, stream](
        A, W, P, G, E, Aq, gAo, bool(has_gSo), XgRpart, gHpart, bool(need_gA), bool(need_gW),
        gA_, gWp, gH, gP, gQ, gG, Gs,
    )
    if need_gW and bw == 1:
        sum_w[1, tpb, stream](gWp, gW)
    if need_gS or need_gX:
        pass2[(ntiles, b), tpb, stream](
            X, Aq, H, S, gSo, gP, Gs, epsd, bool(has_gSo), bool(need_gS), bool(need_gX), gS, gX
        )
