"""The paper's cosine loss term, one layer's factor at a time, forward and handwritten backward (Numba CPU).

For an estimate ``E`` and a truth ``T`` of one shape ``(B, D1, D2)`` the
components are the columns (``cols``: ``A (b, m, n)``, component ``k`` is
``E[b, :, k]``) or the rows (``S (b, n, t)``, component ``k`` is ``E[b, k, :]``).
Per problem ``b`` and component ``k``::

    c = ⟨e, t⟩ / (‖e‖ ‖t‖)   where ‖e‖ ≥ floor and ‖t‖ ≥ floor
      = 0                    elsewhere (a zero component has no direction)

(``floor`` is :data:`fastmu.losses.NORM_FLOOR`, 1e-100: every sum runs in
float64, where squares of entries down to 1e-154 stay normal, so above the
floor ``c`` is the true cosine to rounding and lies in [−1, 1]), the same
expression as :func:`fastmu.losses.mean_component_cosine` in torch ops, and
its gradient::

    ∂c/∂e = t / (‖e‖ ‖t‖) − c e / ‖e‖²   where both norms ≥ floor
          = 0                           elsewhere

A zero component thus passes no gradient, where a clamped denominator would
pass ``t / tiny`` (~1e37 in float32) and wreck a training step.

Why a kernel: in torch ops each layer's term is about 70 small ops (forward
and backward), so a 50-layer loss is ~3400 ops: on a GPU host-bound. Here
the forward reads ``E`` and ``T`` once (one launch per factor and layer) and
the backward reads them once and writes the gradient. On the CPU torch's
several passes over a layer's S mostly hit the caches, so there the kernels
gain less (``bench/results/loss_cpu.json``: 1.15×).

``stats (3, J, B, K)`` float64 collects per row ``j`` (a layer's A or S):
``stats[0]`` the cosines, ``stats[1]`` ``‖e‖``, ``stats[2]`` the cosine times
``scale`` (the layer's weight over the averaging), whose sum is the loss.
Sums run in float64, in an order fixed by the compiled code (not by the thread schedule). ``tnorm (B, K)`` holds ``‖t‖`` in
float64. Rows are spread over threads (``prange``); below
:data:`PARALLEL_MIN` elements a serial twin runs (a parallel region costs
more than it saves on a 65 × 4 A).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

#: elements of E below which the serial twin runs
PARALLEL_MIN = 1 << 15


def _forward(E, T, cols, tnorm, floor, scale, stats, j):  # pragma: no cover - compiled
    B, D1, D2 = E.shape
    K = D2 if cols else D1
    R = D1 if cols else D2
    for q in prange(B * K):
        b = q // K
        k = q % K
        dot = 0.0
        ee = 0.0
        if cols:
            for r in range(R):
                e = np.float64(E[b, r, k])
                dot += e * np.float64(T[b, r, k])
                ee += e * e
        else:
            for r in range(R):
                e = np.float64(E[b, k, r])
                dot += e * np.float64(T[b, k, r])
                ee += e * e
        ne = np.sqrt(ee)
        tn = tnorm[b, k]
        # written so that NaN fails both tests and propagates (a NaN estimate must not score 0)
        c = 0.0 if ne < floor or tn < floor else dot / (ne * tn)
        stats[0, j, b, k] = c
        stats[1, j, b, k] = ne
        stats[2, j, b, k] = c * scale


def _backward(E, T, cols, tnorm, floor, stats, j, g, scale, G):  # pragma: no cover - compiled
    B, D1, D2 = E.shape
    K = D2 if cols else D1
    gs = np.float64(g[0]) * scale
    # the per-component coefficients first: with them computed inside the row loop the
    # element loop ran 2× slower (measured; LLVM then did not vectorise it)
    ca = np.empty((B, K))
    ce = np.empty((B, K))
    for b in range(B):
        for k in range(K):
            ne = stats[1, j, b, k]
            tn = tnorm[b, k]
            if ne < floor or tn < floor:
                ca[b, k] = 0.0
                ce[b, k] = 0.0
            else:
                ca[b, k] = gs / (ne * tn)
                ce[b, k] = gs * stats[0, j, b, k] / (ne * ne)
    if cols:
        for b in prange(B):
            for r in range(D1):
                for k in range(D2):
                    G[b, r, k] = ca[b, k] * np.float64(T[b, r, k]) - ce[b, k] * np.float64(E[b, r, k])
    else:
        for q in prange(B * K):
            b = q // K
            k = q % K
            a = ca[b, k]
            c = ce[b, k]
            for r in range(D2):
                G[b, k, r] = a * np.float64(T[b, k, r]) - c * np.float64(E[b, k, r])


# Reassociation lets LLVM vectorise the row sums (as in kernels/cpu.py); no 'arcp'/'nnan':
# divisions stay IEEE divisions and NaN propagates.
_opts = dict(cache=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})
_forward_par = nb.njit(parallel=True, **_opts)(_forward)
_forward_ser = nb.njit(**_opts)(_forward)
_backward_par = nb.njit(parallel=True, **_opts)(_backward)
_backward_ser = nb.njit(**_opts)(_backward)


def cosine_forward(E, T, cols: bool, tnorm, floor: float, scale: float, stats, j: int) -> None:
    """Cosines of one factor's components against the truth's, into ``stats[:, j]`` (see the module)."""
    run = _forward_par if E.size >= PARALLEL_MIN else _forward_ser
    run(E, T, bool(cols), tnorm, float(floor), float(scale), stats, int(j))


def cosine_backward(E, T, cols: bool, tnorm, floor: float, stats, j: int, g, scale: float, G) -> None:
    """``G = g[0] · scale · ∂(Σ cosines)/∂E`` per component, from the forward's ``stats[:, j]``."""
    run = _backward_par if E.size >= PARALLEL_MIN else _backward_ser
    run(E, T, bool(cols), tnorm, float(floor), stats, int(j), g, float(scale), G)


__all__ = ["PARALLEL_MIN", "cosine_backward", "cosine_forward"]
