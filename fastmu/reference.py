"""Pure reference implementations of one MU / learned-MU iteration.

These are the oracles every kernel is tested against, and the torch one is
also the fallback backend on devices without a fused kernel. They follow
the update rule to the letter: the A update first, then the S update with the new A,
with ε added to each denominator::

    A' = A ⊙ W ⊙ (X Sᵀ) ⊘ (A S Sᵀ + ε)
    S' = S ⊙ (A'ᵀ X) ⊘ (A'ᵀ A' S + ε)

``penalty`` (a :class:`fastmu.penalty.Penalty`, or None for none) adds the
gradients of L1 and L2 penalties on A and S to the denominators::

    A' = A ⊙ W ⊙ (X Sᵀ) ⊘ (A S Sᵀ + l2_A A + ε + l1_A)
    S' = S ⊙ (A'ᵀ X) ⊘ (A'ᵀ A' S + l2_S S + ε + l1_S)

All functions are batched: ``X (b, m, t)``, ``A (b, m, n)``, ``S (b, n, t)``,
``W`` ``(m, n)`` shared or ``(b, m, n)`` per problem, or ``None`` (plain MU).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fastmu import EPS
from fastmu.penalty import Penalty

if TYPE_CHECKING:  # pragma: no cover
    import torch


def mu_step_numpy(
    X: np.ndarray, A: np.ndarray, S: np.ndarray, W: np.ndarray | None = None, eps: float = EPS,
    penalty: Penalty | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One batched (learned) MU iteration in plain NumPy; returns new ``(A, S)``."""
    l1a, l2a, l1s, l2s = penalty if penalty is not None else (0.0, 0.0, 0.0, 0.0)
    P = X @ np.swapaxes(S, -1, -2)
    G = S @ np.swapaxes(S, -1, -2)
    num = A * P if W is None else A * W * P
    den = A @ G + eps
    if l1a or l2a:
        den = den + l2a * A + l1a
    A_new = num / den
    At = np.swapaxes(A_new, -1, -2)
    den = (At @ A_new) @ S + eps
    if l1s or l2s:
        den = den + l2s * S + l1s
    S_new = S * (At @ X) / den
    return A_new, S_new


def mu_step_torch(
    X: "torch.Tensor",
    A: "torch.Tensor",
    S: "torch.Tensor",
    W: "torch.Tensor | None" = None,
    eps: float = EPS,
    penalty: Penalty | None = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One batched (learned) MU iteration with torch ops (differentiable by autograd).

    This is the pure-torch reference of the fused layer: autograd through it
    is the oracle for the handwritten backward kernels.
    """
    l1a, l2a, l1s, l2s = penalty if penalty is not None else (0.0, 0.0, 0.0, 0.0)
    St = S.transpose(-1, -2)
    P = X @ St
    G = S @ St
    num = A * P if W is None else A * W * P
    den = A @ G + eps
    if l1a or l2a:
        den = den + l2a * A + l1a
    A_new = num / den
    At = A_new.transpose(-1, -2)
    den = (At @ A_new) @ S + eps
    if l1s or l2s:
        den = den + l2s * S + l1s
    S_new = S * (At @ X) / den
    return A_new, S_new


def mu_numpy(
    X: np.ndarray, A: np.ndarray, S: np.ndarray, n_iter: int, eps: float = EPS, penalty: Penalty | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n_iter`` plain (or penalised) MU iterations with NumPy (the test oracle and benchmark peer)."""
    A, S = A.copy(), S.copy()
    for _ in range(n_iter):
        A, S = mu_step_numpy(X, A, S, None, eps, penalty)
    return A, S


def objective_numpy(X: np.ndarray, A: np.ndarray, S: np.ndarray) -> np.ndarray:
    """``0.5 ‖X − A S‖²_F`` per problem, computed directly in float64."""
    R = X.astype(np.float64) - A.astype(np.float64) @ S.astype(np.float64)
    return 0.5 * np.einsum("...ij,...ij->...", R, R)
