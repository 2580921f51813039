"""The two half iterations that let the CPU kernels run a tall X on its transpose.

The fused kernels stream over X's pixels (its second axis): a tall X, many
rows and few columns (16384 × 65, say), leaves them few pixels to stream
over. On ``Xᵀ ≈ Sᵀ Aᵀ`` the kernels update ``Sᵀ`` first, then ``Aᵀ``, so
MU's sequence ``A₁, S₁, A₂, …, A_k, S_k`` on X is the kernels' sequence on
Xᵀ shifted by half an iteration: one A update before the transposed run
(:func:`a_half_step`, on X as given), and the S update after it, from the
``P``, ``G`` the transposed run carries (:func:`a_update_from_pg`, the
kernels' own A update). :class:`fastmu.transposed.TransposedCPUEngine`
drives them.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

from fastmu.kernels.cpu import _a_update, _penalty_scalars
from fastmu.kernels.cpu_products import FASTMATH
from fastmu.kernels.fpenv import enter_ftz, leave_ftz

#: rows of X per parallel work item of :func:`a_half_step`
HALF_STEP_ROWS = 256


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=FASTMATH)
def a_half_step(X, A, S, eps, penalty, out):
    """``out = A ⊙ (X Sᵀ) ⊘ (A (S Sᵀ + l2_A I) + ε + l1_A)``: MU's A update alone.

    ``X (b, m, t)``, ``A``, ``out (b, m, n)``, ``S (b, n, t)``, one float
    dtype; ``penalty = (l1_A, l2_A, l1_S, l2_S)`` as for
    :func:`fastmu.kernels.cpu.mu_run` (only A's weights are read). One pass
    over X, its rows shared out in runs of :data:`HALF_STEP_ROWS`.
    """
    b, m, t = X.shape
    n = A.shape[2]
    eps_a, l2a, _, _ = _penalty_scalars(X, eps, penalty)
    G = np.empty((b, n, n), X.dtype)  # S Sᵀ + l2_A I: t·n² work per problem
    for p in range(b):
        for k in range(n):
            for l in range(k, n):
                acc = X.dtype.type(0)
                for j in range(t):
                    acc += S[p, k, j] * S[p, l, j]
                G[p, k, l] = acc
                G[p, l, k] = acc
            G[p, k, k] += l2a
    per = (m + HALF_STEP_ROWS - 1) // HALF_STEP_ROWS
    for c in prange(b * per):
        fp = enter_ftz()  # subnormals are slow: see fpenv.py
        p = c // per
        i0 = (c % per) * HALF_STEP_ROWS
        prow = np.empty(n, X.dtype)
        for i in range(i0, min(m, i0 + HALF_STEP_ROWS)):
            for k in range(n):
                acc = X.dtype.type(0)
                for j in range(t):
                    acc += X[p, i, j] * S[p, k, j]
                prow[k] = acc
            for k in range(n):
                den = eps_a
                for l in range(n):
                    den += A[p, i, l] * G[p, l, k]
                out[p, i, k] = A[p, i, k] * prow[k] / den
        leave_ftz(fp)


@nb.njit(cache=True, error_model="numpy", fastmath=FASTMATH)
def a_update_from_pg(A, W, P, G, eps, penalty, out):
    """``out = A ⊙ W ⊙ P ⊘ (A (G + l2_A I) + ε + l1_A)`` per problem: the kernels' A update.

    The same function the fused iterations run (:func:`fastmu.kernels.cpu._a_update`),
    on a copy: ``A (b, m, n)`` and the carried ``P (b, m, n)``, ``G (b, n, n)``
    are left as they are. ``W (bw, m, n)`` with ``bw`` 1 or ``b``.
    """
    b, m, n = A.shape
    eps_a, l2a, _, _ = _penalty_scalars(A, eps, penalty)
    H = np.empty((n, n), A.dtype)
    erow = np.empty(n, A.dtype)
    wstep = 0 if W.shape[0] == 1 else 1
    fp = enter_ftz()
    for p in range(b):
        out[p, :, :] = A[p]
        _a_update(out[p], W[p * wstep], P[p], G[p], eps_a, l2a, H, erow)
    leave_ftz(fp)
