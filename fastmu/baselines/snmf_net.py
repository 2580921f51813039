"""SNMF-Net: unrolled L_p-sparse projected-gradient NMF with learned steps and thresholds.

Reference
---------
F. Xiong, J. Zhou, S. Tao, J. Lu, J. Zhou and Y. Qian, "SNMF-Net: Learning
a Deep Alternating Neural Network for Hyperspectral Unmixing", IEEE
Transactions on Geoscience and Remote Sensing 60, 2021.

The original network
--------------------
SNMF-Net unrolls L1/2-regularised NMF, ``min ½‖X − AS‖² + λ‖S‖_{1/2}``,
solved by alternating proximal/projected gradient steps. Layer ``k`` updates
the abundances with a learned preconditioner ``B_k``, step ``α_k`` and a
generalised L_p thresholding with learned ``p_k`` and thresholds ``θ_k``,
then the endmembers with a projected gradient step::

    S ← relu(prox_{p_k, θ_k}(S − α_k B_kᵀ (A S − X)))
    A ← relu(A − β_k (A S − X) Sᵀ)

with the thresholding (applied entry-wise, ``θ`` per component)::

    prox(x) = x − p θ x^{p−1}   if x > τ(p, θ),   0 otherwise,
    τ(p, θ) = (2θ(1−p))^{1/(2−p)} + p θ (2θ(1−p))^{(p−1)/(2−p)}
            = (2−p)/(2(1−p)) · (2θ(1−p))^{1/(2−p)}

(the second form, computed in logs, has no negative power of θ, so neither it
nor its gradient overflows as θ → 0 or p → 1; at p = 1 it is θ, soft
thresholding). The paper's depth is 9 layers, the default here.

Adaptation to fastmu's problem (and why)
----------------------------------------
* No sum-to-one projection and no clamp of S at 1: they encode abundances
  (fractions of a pixel, summing to one, at most one); fastmu's maps are
  source intensities (scaled to max 1 over the map, not per pixel), so both
  constraints would be wrong.
* Scale-free steps. ``β_k`` is a learned scalar times ``1/(‖S Sᵀ‖_F + ϵ‖X‖²_F)``
  computed per problem from the current ``S`` (ϵ the dtype's machine epsilon,
  so a thresholded-to-zero S gives a zero step rather than ``0/0``): the Lipschitz constant of the
  A-gradient is ``λ_max(S Sᵀ) ≤ ‖S Sᵀ‖_F``, so the step is safe at the
  initial scalar 1 whatever the problem's intensity, where the original fixed
  scalar suits one data scale only. (The Frobenius norm, unlike
  ``λ_max``, is cheap and smoothly differentiable.) Likewise the thresholding
  acts on ``S / s`` with ``s = max(X)`` per problem, then is scaled back, so
  ``θ`` is a relative threshold: the whole model is scale-equivariant,
  ``model(c X) = (A, c S)``, like MU and the other fastmu models.
* Start: ``A_0`` is the normalised ``A_init`` for every problem (the original
  starts from a VCA estimate per image) and ``S_0`` one ridge least-squares
  step ``relu((A_0ᵀA_0 + δI)⁻¹ A_0ᵀ X)``. ``A_init``'s column order is the
  order of the output components (the training order) — it is required,
  for the reasons given in :mod:`fastmu.baselines.dnmf`.

Parametrisation (valid ranges without clipping after optimiser steps)
---------------------------------------------------------------------
``α_k = exp(log_alpha_k)`` (init ``1/λ_max(A_0ᵀA_0)``), ``β_k =
exp(log_beta_k)`` (init 1), ``θ_k = exp(log_theta_k)`` per component (init
``0.01 α_k``): exponentials keep them positive, and an optimiser step is a
relative change, right for step sizes and thresholds whose useful values span
decades. ``p_k = sigmoid(rho_k)`` (init ``rho = 0``: ``p = 0.5`` exactly)
keeps ``p`` in (0, 1). ``B_k`` (init ``A_0``) is unconstrained: it multiplies a
signed residual, and any real preconditioner is valid.

This module imports torch.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from fastmu.baselines.dnmf import _check_dtype_device, _check_layers, _spectra_matrix
from fastmu.nn.models import _check_model_input, _squeeze, check_finite_output

__all__ = ["SNMFNet", "lp_threshold"]

Factors = tuple[torch.Tensor, torch.Tensor]


def lp_threshold(x: torch.Tensor, p: torch.Tensor | float, theta: torch.Tensor | float) -> torch.Tensor:
    """SNMF-Net's generalised L_p thresholding, differentiable in ``x``, ``p`` and ``theta``.

    ``x − p θ x^{p−1}`` where ``x > τ(p, θ)``, else 0, with
    ``τ = (2−p)/(2(1−p)) · (2θ(1−p))^{1/(2−p)}`` (see the module docstring).

    Parameters
    ----------
    x : Tensor
    p : Tensor or float in [0, 1] (0: hard thresholding at sqrt(2θ), 1: soft thresholding at θ)
        Broadcastable to ``x``.
    theta : Tensor or float ≥ 0
        Broadcastable to ``x`` (e.g. ``(n, 1)`` for per-row thresholds of ``(b, n, t)``).

    Returns
    -------
    Tensor, the shape of ``x``; non-negative.
    """
    p = torch.as_tensor(p, dtype=x.dtype, device=x.device)
    theta = torch.as_tensor(theta, dtype=x.dtype, device=x.device)
    finfo = torch.finfo(x.dtype)
    # Guards: log θ needs θ > 0 and log(1−p) needs p < 1 (a saturated sigmoid
    # gives exactly 1); below tiny the threshold is 0 to rounding anyway.
    theta_c = theta.clamp_min(finfo.tiny)
    q = (1 - p).clamp_min(finfo.tiny)
    e = 1 / (2 - p)
    tau = (2 - p) / 2 * torch.exp(e * torch.log(2 * theta_c) - q * e * torch.log(q))
    keep = x > tau
    # x^{p−1} is evaluated only where kept (x > τ ≥ 0); elsewhere at 1, and never
    # below eps, so neither the value nor its gradient can be infinite.
    xs = torch.where(keep, x, torch.ones_like(x)).clamp_min(finfo.eps)
    return torch.where(keep, x - p * theta * xs ** (p - 1), torch.zeros_like(x))


class SNMFNet(nn.Module):
    """SNMF-Net (Xiong et al. 2021): unrolled L_p-sparse alternating projected-gradient NMF.

    Layer ``k``: ``S ← s·relu(prox_{p_k,θ_k}((S − α_k B_kᵀ(AS − X))/s))``,
    ``s = max(X)``, then ``A ← relu(A − β_k/(‖SSᵀ‖_F + ϵ‖X‖²_F) · (AS − X)Sᵀ)``;
    see the module docstring for the adaptation and the parametrisation.

    Parameters
    ----------
    n_layers : int, default 9
        Unrolled layers (the paper's depth).
    m : int, default 65
        Channels (rows of X).
    n : int, default 4
        Components.
    A_init : array-like (m, n), required
        Non-negative starting spectra, columns in the training order (e.g. the
        mean of the training spectra); normalised to unit-norm columns. It is
        ``A_0`` for every problem and the initial ``B_k``.
    ridge : float, default 1e-6
        Relative ridge of the least-squares start, ``δ = ridge · trace(A_0ᵀA_0)/n``.
    theta_scale : float, default 0.01
        Initial thresholds ``θ_k = theta_scale · α_k``.
    dtype, device
        Of the parameters (X must match them): float32 or float64, and a
        device torch sees.

    Attributes
    ----------
    A_init : buffer (m, n)
        ``A_0``, unit-norm columns.
    B : Parameter (n_layers, m, n)
        Preconditioners (unconstrained), ``A_0`` at init.
    log_alpha, log_beta, rho : Parameter (n_layers,)
        ``α = exp(log_alpha)``, ``β = exp(log_beta)``, ``p = sigmoid(rho)``.
    log_theta : Parameter (n_layers, n)
        ``θ = exp(log_theta)``.

    Examples
    --------
    >>> import torch
    >>> from fastmu.baselines import SNMFNet
    >>> model = SNMFNet(n_layers=3, m=8, n=3, A_init=torch.rand(8, 3) + 0.1)
    >>> A, S = model(torch.rand(8, 50))
    >>> A.shape, S.shape
    (torch.Size([8, 3]), torch.Size([3, 50]))
    """

    def __init__(
        self,
        n_layers: int = 9,
        m: int = 65,
        n: int = 4,
        *,
        A_init: Any = None,
        ridge: float = 1e-6,
        theta_scale: float = 0.01,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        n_layers, m, n = _check_layers(n_layers, m, n)
        device = _check_dtype_device(dtype, device, "SNMFNet")
        A0 = _spectra_matrix(A_init, m, n, "SNMFNet")
        ridge, theta_scale = float(ridge), float(theta_scale)
        if not (np.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite non-negative number, got {ridge!r}")
        if not (np.isfinite(theta_scale) and theta_scale > 0):
            raise ValueError(f"theta_scale must be a finite positive number, got {theta_scale!r}")
        self.n_layers, self.m, self.n = n_layers, m, n
        self.ridge, self.theta_scale = ridge, theta_scale
        # A_init arrives as float64: without an explicit dtype, use the default one (as nn.Parameter(zeros) would)
        kw = {"dtype": torch.get_default_dtype() if dtype is None else dtype, "device": device}
        # 1/λ_max(A_0ᵀA_0): the largest safe gradient step on S for A = A_0 (float64, once)
        alpha0 = 1.0 / float(torch.linalg.eigvalsh(A0.T @ A0).max())
        self.register_buffer("A_init", A0.to(**kw))
        self.B = nn.Parameter(A0.to(**kw).expand(n_layers, m, n).clone())
        self.log_alpha = nn.Parameter(torch.full((n_layers,), math.log(alpha0), **kw))
        self.log_beta = nn.Parameter(torch.zeros(n_layers, **kw))
        self.rho = nn.Parameter(torch.zeros(n_layers, **kw))
        self.log_theta = nn.Parameter(torch.full((n_layers, n), math.log(theta_scale * alpha0), **kw))

    def layer_parameters(self) -> dict[str, torch.Tensor]:
        """The constrained layer parameters: ``alpha``, ``beta``, ``p`` (n_layers,), ``theta`` (n_layers, n)."""
        return {
            "alpha": torch.exp(self.log_alpha),
            "beta": torch.exp(self.log_beta),
            "p": torch.sigmoid(self.rho),
            "theta": torch.exp(self.log_theta),
        }

    def initial_factors(self, X: torch.Tensor) -> Factors:
        """``A_0`` (``A_init``, per problem) and ``S_0 = relu((A_0ᵀA_0 + δI)⁻¹ A_0ᵀ X)``; X batched."""
        A0 = self.A_init
        G = A0.T @ A0
        delta = max(self.ridge * float(torch.diagonal(G).sum()) / self.n, torch.finfo(G.dtype).tiny)
        # A_0 is shared: one (n, m) least-squares operator for the whole batch
        P = torch.linalg.solve(G + delta * torch.eye(self.n, dtype=G.dtype, device=G.device), A0.T)
        S = torch.relu(torch.bmm(P.expand(X.shape[0], -1, -1), X))  # bmm: see forward
        A = A0.expand(X.shape[0], self.m, self.n)
        return A, S

    def forward(self, X: torch.Tensor, return_all: bool = False) -> Factors | list[Factors]:
        """Unmix ``X``.

        Parameters
        ----------
        X : Tensor (b, m, t) or (m, t)
            Non-negative data, the dtype and device of the model.
        return_all : bool
            Return every layer's ``(A_k, S_k)`` (for the layer-weighted loss)
            instead of only the last.

        Returns
        -------
        (A, S) with A (b, m, n), S (b, n, t), or a list of ``n_layers`` such
        pairs; 2-D input gives unbatched factors.

        Raises
        ------
        FloatingPointError
            The factors came out NaN or infinite: X too large for the dtype,
            or non-finite or overflowing parameters (the last layer's factors and
            the parameters are checked: one read on the host).
        """
        X, squeeze = _check_model_input(X, self.m, self.B)  # and X's values
        finfo = torch.finfo(X.dtype)
        A, S = self.initial_factors(X)
        # the thresholds act on S in units of the problem's brightest entry (scale-free θ)
        s = X.amax(dim=(1, 2), keepdim=True).clamp_min(finfo.tiny)
        # Added to ‖S Sᵀ‖_F in the A-step: relative to the data (‖X‖², the scale of
        # ‖S Sᵀ‖), so a thresholded-to-zero S gives a zero update, not 0 · (β / tiny)
        # = NaN, and a tiny S cannot give a huge step.
        floor = (finfo.eps * torch.linalg.matrix_norm(X) ** 2).clamp_min(finfo.tiny)
        prm = self.layer_parameters()
        outs: list[Factors] = []
        layers = zip(self.B.unbind(0), prm["alpha"].unbind(0), prm["beta"].unbind(0), prm["p"].unbind(0),
                     prm["theta"].unbind(0))
        # The gradients are formed without the residual R = A S − X: Bᵀ R = (BᵀA) S − BᵀX
        # and R Sᵀ = A (S Sᵀ) − X Sᵀ. R is as large as X, and building it twice per layer
        # (and keeping it for the backward) made a layer several passes over X-sized
        # arrays; this way each step reads X once and only (b, n, ·) arrays are kept.
        # A shared (n, m) matrix times X (b, m, t) goes through torch.bmm with the matrix
        # expanded: `Bt @ X` folds the batch into X's rows instead, which copies X
        # transposed on every call (measured: half a layer's time at 25 × 65 × 16384).
        b = X.shape[0]
        for B, alpha, beta, p, theta in layers:
            Bt = B.T.expand(b, self.n, self.m)
            Z = S - alpha * ((Bt @ A) @ S - torch.bmm(Bt, X))
            # prox output is already ≥ 0; the relu is the paper's projection (and a rounding guard)
            S = torch.relu(lp_threshold(Z / s, p, theta.unsqueeze(-1))) * s
            St = S.transpose(-1, -2)
            SSt = S @ St
            scale = (torch.linalg.matrix_norm(SSt) + floor)[:, None, None]
            A = torch.relu(A - beta * ((A @ SSt - X @ St) / scale))
            if return_all:
                outs.append((A, S))
        check_finite_output(self, X, A, S)
        return _squeeze(outs if return_all else (A, S), squeeze)

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, m={self.m}, n={self.n}, ridge={self.ridge}"
