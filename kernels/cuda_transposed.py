"""CUDA twins of :mod:`fastmu.kernels.cpu_transposed`: what a tall X needs to run on its transpose.

The CUDA kernels keep a problem's m rows of ``A'`` and ``P`` in shared
memory, so a tall X with more rows than that holds cannot run as given; its
transpose can. :class:`fastmu.transposed.TransposedCUDAEngine` runs the fused
kernels on ``Xᵀ`` half an iteration ahead, as the CPU engine does, with
these: a batched transpose, MU's A update alone (before the first
iteration) and the A update from carried ``P``, ``G`` (for the S handed to
the caller). One thread per row, sums in float64: they run once per call,
so they are written to be simple rather than fast. Every launch is queued on
the caller's stream. No warp shuffles or grid barriers: CI runs them in
Numba's CUDA simulator.
"""
from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np
from numba import cuda

#: threads per block of these kernels
THREADS = 128
#: the largest rank (the kernels' local arrays); fastmu.kernels.cuda.MAX_N
MAX_N = 8


@cuda.jit
def _transpose(src, dst):
    """``dst[p, j, i] = src[p, i, j]``: a grid-stride loop over src's entries (reads coalesced)."""
    b, r, c = src.shape
    total = b * r * c
    k = cuda.grid(1)
    step = cuda.gridsize(1)
    while k < total:
        p = k // (r * c)
        q = k - p * r * c
        i = q // c
        j = q - i * c
        dst[p, j, i] = src[p, i, j]
        k += step


@cuda.jit
def _gram(S, l2, G):
    """``G[p] = S[p] S[p]ᵀ + l2 I``: one thread per entry (p, k, l), summed over the columns."""
    b, n, t = S.shape
    k = cuda.grid(1)
    if k < b * n * n:
        p = k // (n * n)
        q = k - p * n * n
        i = q // n
        j = q - i * n
        acc = 0.0
        for c in range(t):
            acc += nb.float64(S[p, i, c]) * nb.float64(S[p, j, c])
        if i == j:
            acc += nb.float64(l2)
        G[p, i, j] = acc


@cuda.jit
def _a_update_rows(X, A, S, P, G, eps_a, l2a, out, from_x):
    """``out = A ⊙ P ⊘ (A (G + l2a I) + eps_a)`` per row, one thread per (problem, row).

    With ``from_x`` the row of ``P`` is ``X Sᵀ`` of that row (X (b, m, t), S
    (b, n, t); G then already holds ``S Sᵀ + l2a I`` and l2a is not added
    again); otherwise it is read from ``P`` (b, m, n) and l2a joins G's
    diagonal here.
    """
    b, m, n = A.shape
    k = cuda.grid(1)
    if k < b * m:
        p = k // m
        i = k - p * m
        prow = cuda.local.array(MAX_N, nb.float64)
        for c in range(n):
            if from_x:
                acc = 0.0
                for j in range(X.shape[2]):
                    acc += nb.float64(X[p, i, j]) * nb.float64(S[p, c, j])
                prow[c] = acc
            else:
                prow[c] = P[p, i, c]
        for c in range(n):
            den = nb.float64(eps_a)
            for d in range(n):
                g = nb.float64(G[p, d, c])
                if d == c and not from_x:
                    g += nb.float64(l2a)
                den += nb.float64(A[p, i, d]) * g
            out[p, i, c] = nb.float64(A[p, i, c]) * prow[c] / den


def _blocks(count: int) -> int:
    return max(1, -(-count // THREADS))


def transpose(src: Any, dst: Any, stream: Any = 0) -> None:
    """``dst (b, c, r) = src (b, r, c)`` transposed per problem (C-contiguous device arrays)."""
    b, r, c = src.shape
    _transpose[min(_blocks(b * r * c), 65535), THREADS, stream](src, dst)


def _scalars(dtype: Any, eps: float, l1: float, l2: float) -> tuple[Any, Any]:
    """``ε + l1`` formed in float64 and rounded once, and ``l2``, in the arrays' dtype (as the CPU twins)."""
    f = np.dtype(dtype).type
    return f(eps + l1), f(l2)


def a_half_step(X: Any, A: Any, S: Any, eps: float, penalty: tuple[float, float, float, float], out: Any,
                stream: Any = 0) -> None:
    """``out = A ⊙ (X Sᵀ) ⊘ (A (S Sᵀ + l2_A I) + ε + l1_A)``: MU's A update alone.

    ``X (b, m, t)``, ``A``, ``out (b, m, n)``, ``S (b, n, t)`` device arrays of
    one float dtype; ``penalty = (l1_A, l2_A, l1_S, l2_S)`` (A's weights read).
    """
    b, m, n = A.shape
    if n > MAX_N:
        raise ValueError(f"at most {MAX_N} components, got {n}")
    eps_a, l2a = _scalars(X.dtype, eps, penalty[0], penalty[1])
    G = cuda.device_array((b, n, n), np.float64, stream=stream)
    _gram[_blocks(b * n * n), THREADS, stream](S, np.float64(l2a), G)
    _a_update_rows[_blocks(b * m), THREADS, stream](X, A, S, A, G, eps_a, l2a, out, True)


def a_update_from_pg(A: Any, P: Any, G: Any, eps: float, penalty: tuple[float, float, float, float], out: Any,
                     stream: Any = 0) -> None:
    """``out = A ⊙ P ⊘ (A (G + l2_A I) + ε + l1_A)`` per problem, from carried ``P (b, m, n)``,
    ``G (b, n, n)``; A, P, G are only read."""
    b, m, n = A.shape
    if n > MAX_N:
        raise ValueError(f"at most {MAX_N} components, got {n}")
    eps_a, l2a = _scalars(A.dtype, eps, penalty[0], penalty[1])
    _a_update_rows[_blocks(b * m), THREADS, stream](A, A, A, P, G, eps_a, l2a, out, False)
