"""Pure reference implementations of one MU / learned-MU iteration.

These are the oracles every kernel is tested against, and the torch one is
also the fallback backend on devices without a fused kernel. They follow
the update rule to the letter: the A update first, then the S update with the new A,
with ε added to each denominator::

    A' = A ⊙ W ⊙ (X Sᵀ) ⊘ (A S Sᵀ + ε)
    S' = S ⊙ (A'ᵀ X) ⊘ (A'ᵀ A' S + ε)

All functions are batched: ``X (b, m, t)``, ``A (b, m, n)``, ``S (b, n, t)``,
``W`` ``(m, n)`` shared or ``(b, m, n)`` per problem, or ``None`` (plain MU).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fastmu import EPS

if TYPE_CHECKING:  # pragma: no cover
    import torch


def mu_step_numpy(
    X: np.ndarray, A: np.ndarray, S: np.ndarray, W: np.ndarray | None = None, eps: float = EPS
) -> tuple[np.ndarray, np.ndarray]:
    """One batched (learned) MU iteration in plain NumPy; returns new ``(A, S)``."""
    P = X @ np.swapaxes(S, -1, -2)
    G = S @ np.swapaxes(S, -1, -2)
    num = A * P if W is None else A * W * P
    A_new = num / (A @ G + eps)
    At = np.swapaxes(A_new, -1, -2)
    S_new = S * (At @ X) / ((At @ A_new) @ S + eps)
    return A_new, S_new


def mu_step_torch(
    X: "torch.Tensor",
    A: "torch.Tensor",
    S: "torch.Tensor",
    W: "torch.Tensor | None" = None,
    eps: float = EPS,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One batched (learned) MU iteration with torch ops (differentiable by autograd).

    This is the pure-torch reference of the fused layer: autograd through it
    is the oracle for the handwritten backward kernels.
    """
    St = S.transpose(-1, -2)
    P = X @ St
    G = S @ St
    num = A * P if W is None else A * W * P
    A_new = num / (A @ G + eps)
    At = A_new.transpose(-1, -2)
    S_new = S * (At @ X) / ((At @ A_new) @ S + eps)
    return A_new, S_new


def mu_numpy(
    X: np.ndarray, A: np.ndarray, S: np.ndarray, n_iter: int, eps: float = EPS
) -> tuple[np.ndarray, np.ndarray]:
    """``n_iter`` plain MU iterations with NumPy (the test oracle and benchmark peer)."""
    A, S = A.copy(), S.copy()
    for _ in range(n_iter):
        A, S = mu_step_numpy(X, A, S, None, eps)
    return A, S


def objective_numpy(X: np.ndarray, A: np.ndarray, S: np.ndarray) -> np.ndarray:
    """``0.5 ‖X − A S‖²_F`` per problem, computed directly in float64."""
    R = X.astype(np.float64) - A.astype(np.float64) @ S.astype(np.float64)
    return 0.5 * np.einsum("...ij,...ij->...", R, R)
