"""The two half sweeps that let the CD kernel run a tall X on its transpose.

Like MU's (:mod:`fastmu.kernels.cpu_transposed`): the fused CD kernel
streams over X's pixels, and on ``Xᵀ ≈ Sᵀ Aᵀ`` it sweeps ``Sᵀ`` first, then
``Aᵀ``. scikit-learn's sequence on X, ``A₁, S₁, A₂, …``, is the kernel's on
Xᵀ shifted by half an iteration: A's sweep once before the transposed run
(:func:`cd_a_half_step`, on X as given), and S's sweep after it, on a copy,
from the ``P``, ``G`` the transposed run carries (:func:`cd_sweep_from_pg`,
the kernel's own sweep). :mod:`fastmu.baselines.cd_transposed` drives them.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

from fastmu.kernels.cpu_cd import _a_cd
from fastmu.kernels.cpu_products import FASTMATH
from fastmu.kernels.fpenv import enter_ftz, leave_ftz

#: rows of X per parallel work item of :func:`cd_a_half_step`
HALF_STEP_ROWS = 256


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=FASTMATH)
def cd_a_half_step(X, A, S, l1, l2, viol, perm):
    """A's CD sweep alone, in place: from ``P = X Sᵀ − l1`` and ``G = S Sᵀ + l2 I``.

    ``X (b, m, t)``, ``A (b, m, n)``, ``S (b, n, t)``, one float dtype,
    C-contiguous; ``l1``, ``l2``: A's penalty weights. ``viol (b,)`` float64
    receives each problem's violation of the sweep; ``perm``: the order of its
    components (``arange(n)`` or a permutation). One pass over X, its
    rows shared out in runs of :data:`HALF_STEP_ROWS` (A's rows are
    independent, so each run sweeps its own).
    """
    b, m, t = X.shape
    n = A.shape[2]
    dt = X.dtype
    G = np.empty((b, n, n), dt)  # S Sᵀ: t·n² work per problem
    for p in range(b):
        for k in range(n):
            for l in range(k, n):
                acc = dt.type(0)
                for j in range(t):
                    acc += S[p, k, j] * S[p, l, j]
                G[p, k, l] = acc
                G[p, l, k] = acc
    per = (m + HALF_STEP_ROWS - 1) // HALF_STEP_ROWS
    vpart = np.zeros(b * per, np.float64)
    for c in prange(b * per):
        fp = enter_ftz()  # subnormals are slow: see fpenv.py
        p = c // per
        i0 = (c % per) * HALF_STEP_ROWS
        L = min(m, i0 + HALF_STEP_ROWS) - i0
        Pc = np.empty((L, n), dt)
        for i in range(L):
            for k in range(n):
                acc = dt.type(0)
                for j in range(t):
                    acc += X[p, i0 + i, j] * S[p, k, j]
                Pc[i, k] = acc
        H = np.empty((n, n), dt)  # AᵀA of the rows: not needed here
        vpart[c] = _a_cd(A[p, i0:i0 + L], Pc, G[p], H, np.empty((n, L), dt), np.empty((n, L), dt),
                         np.empty(L, dt), l1, l2, perm)
        leave_ftz(fp)
    for p in range(b):
        v = 0.0
        for c in range(p * per, (p + 1) * per):
            v += vpart[c]
        viol[p] = v


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath=FASTMATH)
def cd_sweep_from_pg(A, P, G, l1, l2, out, viol, perm):
    """``out = A`` swept once from ``P − l1``, ``G + l2 I``: the CD kernel's A sweep, on a copy.

    ``A``, ``P``, ``out (b, m, n)``, ``G (b, n, n)``: the kernel's own sweep
    (:func:`fastmu.kernels.cpu_cd._a_cd`), so the kernel's next call, which
    sweeps the same A from the same carried ``P``, ``G``, computes the same
    values. ``viol (b,)`` float64 receives each problem's violation; ``perm``:
    the order of the components.
    """
    b, m, n = A.shape
    dt = A.dtype
    for p in prange(b):
        fp = enter_ftz()
        out[p, :, :] = A[p]
        H = np.empty((n, n), dt)
        viol[p] = _a_cd(out[p], P[p], G[p], H, np.empty((n, m), dt), np.empty((n, m), dt), np.empty(m, dt),
                        l1, l2, perm)
        leave_ftz(fp)
