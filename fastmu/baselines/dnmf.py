"""DNMF: deep-unfolded NMF, adapted to blind separation with a different A per problem.

Reference
---------
R. Nasser, Y. C. Eldar and R. Sharan, "Deep unfolding for non-negative
matrix factorization with application to mutational signature analysis",
Journal of Computational Biology 29(1), 2022.

The original (unsupervised) network
-----------------------------------
DNMF unrolls the multiplicative update of the activations with the
dictionary held fixed, and replaces the two matrices that hold the
dictionary, ``Aᵀ`` and ``AᵀA``, with learned non-negative matrices per layer::

    S_{l+1} = S_l ⊙ (U_l X) ⊘ (V_l S_l + ε),     U_l (n × m) ≥ 0,  V_l (n × n) ≥ 0

``U_l`` and ``V_l`` are shared by every input: the dictionary is implicit in
the weights. The paper used a few layers (it reports that a shallow network
already matches many MU iterations), hence ``n_layers=10`` by default here.

Adaptation to fastmu's problem (and why)
----------------------------------------
Here every problem has its *own* mixing matrix ``A`` (a different set of
spectra), and the paper's loss scores both factors, so:

* **A learned reference dictionary.** ``A_ref (m × n)``, non-negative with
  unit-norm columns in the forward, is a parameter shared by all layers, and
  each layer's matrices are per-layer multiplicative corrections of it::

      U_l = A_refᵀ ⊙ exp(θU_l),      V_l = (A_refᵀ A_ref) ⊙ exp(θV_l),      θ = 0 at init

  so ``U_l`` and ``V_l`` start at ``A_refᵀ`` and ``A_refᵀA_ref``: the untrained
  network is *exactly* MU on ``S`` with ``A`` fixed to the normalised
  ``A_init`` (``exp(0) == 1``). The set of reachable ``(U_l, V_l)`` is every
  pair of positive matrices, as with DNMF's free weights, but training
  ``A_ref`` moves all layers coherently.
* **A per problem.** DNMF has no ``A`` output; each layer re-estimates it from
  ``X`` and its ``S_l`` with one differentiable ridge least-squares step,
  projected on the non-negative orthant::

      A_l = max(X S_lᵀ (S_l S_lᵀ + δ I)⁻¹, floor),   δ = ridge · trace(S_l S_lᵀ) / n

  (``torch.linalg.solve``, batched). The floor, ``finfo.eps`` times the
  largest entry of the problem's estimate (detached), stands for the
  projection's 0 and keeps every column non-zero, so its cosine with the truth
  is defined and differentiable. ``A_l`` is a read-out: it does not feed the
  next layer (in DNMF the dictionary lives in the weights).
* **Start.** ``S_0`` is fastmu's constant start (:func:`fastmu.nn.models.constant_init`),
  as for NALMU; the columns of ``A_ref`` break the symmetry between the
  components, so the output follows the column order of ``A_init`` — which
  must be the training order (sync, therm, fe1, fe2 for the paper's data).

Choices
-------
Parametrisation: ``A_ref = normalise(exp(φ))``, ``θU``, ``θV`` unconstrained;
exponentials keep every weight strictly positive without clipping after
optimiser steps, and an optimiser step is then a *relative* change of the
weight, which suits a multiplicative update (the same choice as
:class:`fastmu.NALMU`). Zeros of ``A_init`` (e.g. the mean Fe-line spectrum
far from the line) cannot be represented by ``exp``: they are raised to
``1e-6`` times their column's maximum before taking the log.

``A_init`` is required: it fixes the order of the output components and is
the only thing that makes the components differ at the start (with constant
columns every row of ``S`` would stay identical). A built-in default pattern
would impose an order unrelated to the physical components, so the model
raises a clear error instead of guessing; pass e.g. the mean of the training
spectra, columns in the training order.

The model is scale-equivariant, like MU: ``model(c X) = (A, c S)`` up to the
ε of the update and the relative ridge.

This module imports torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fastmu import EPS
from fastmu.nn.models import (
    _check_model_input, _squeeze, check_finite_output, check_model_dtype, constant_init, model_device,
)
from fastmu.validation import check_eps, positive_count

__all__ = ["DNMF", "ridge_nnls_step"]

Factors = tuple[torch.Tensor, torch.Tensor]

#: zeros of the normalised A_init are raised to this fraction of their column's maximum (log-parametrisation)
A_REF_FLOOR = 1e-6


def _spectra_matrix(A_init: Any, m: int, n: int, who: str) -> torch.Tensor:
    """Validate a reference-spectra matrix; return it with unit-norm columns (float64, CPU).

    Raises ``ValueError`` (``TypeError`` for non-numeric input) with a message
    naming ``who`` (the model class).
    """
    if A_init is None:
        raise ValueError(
            f"{who} needs A_init, an (m, n) = ({m}, {n}) non-negative matrix of reference spectra whose "
            f"columns are in the training order (e.g. the mean of the training spectra): it fixes the order "
            f"of the output components and is what makes them differ at the start")
    try:
        if isinstance(A_init, torch.Tensor):
            a = A_init.detach().to("cpu", torch.float64)
        else:
            a = torch.from_numpy(np.array(A_init, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"A_init must be a numeric (m, n) array, got {type(A_init).__name__}") from exc
    if tuple(a.shape) != (m, n):
        raise ValueError(f"A_init must have shape (m, n) = ({m}, {n}), got {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("A_init contains NaN or infinite values")
    if bool((a < 0).any()):
        raise ValueError(f"A_init must be non-negative (spectra); its smallest entry is {float(a.min()):.3g}")
    norms = a.norm(dim=0)
    if bool((norms == 0).any()):
        bad = [int(k) for k in torch.nonzero(norms == 0).flatten()]
        raise ValueError(f"A_init has all-zero column(s) {bad}; every component needs a reference spectrum")
    a = a / norms
    if n > 1:
        cos = a.T @ a - torch.eye(n, dtype=torch.float64)
        if float(cos.max()) > 1.0 - 1e-9:
            raise ValueError("A_init has two parallel columns; the components' reference spectra must differ")
    return a


def _check_layers(n_layers: Any, m: Any, n: Any) -> tuple[int, int, int]:
    """``n_layers, m, n`` as Python ints (any positive integer, NumPy's or a 0-d integer tensor too; not bool)."""
    return positive_count(n_layers, "n_layers"), positive_count(m, "m"), positive_count(n, "n")


def _check_dtype_device(dtype: Any, device: Any, who: str) -> torch.device | None:
    """Refuse a non-float32/float64 ``dtype`` (the models solve linear systems) and an unknown device."""
    check_model_dtype(dtype, who, allowed=(torch.float32, torch.float64))
    return model_device(device)


def ridge_nnls_step(X: torch.Tensor, S: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """One differentiable non-negative least-squares estimate of ``A`` from ``X ≈ A S``.

    ``A = max(X Sᵀ (S Sᵀ + δ I)⁻¹, floor)`` with ``δ = ridge · trace(S Sᵀ)/n``
    (at least the dtype's ``tiny``, so an all-zero ``S`` gives a solvable
    system) and ``floor = finfo.eps · max(estimate)`` per problem (detached;
    at least ``tiny``), the stand-in for the projection's 0 that keeps every
    column non-zero.

    Parameters
    ----------
    X : Tensor (b, m, t)
    S : Tensor (b, n, t)
    ridge : float
        Relative ridge (scale-free: ``δ`` scales with ``S Sᵀ``).

    Returns
    -------
    A : Tensor (b, m, n), every entry positive
    """
    finfo = torch.finfo(S.dtype)
    G = S @ S.transpose(-1, -2)
    n = G.shape[-1]
    delta = (ridge * torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / n).clamp_min(finfo.tiny)
    G = G + delta[:, None, None] * torch.eye(n, dtype=G.dtype, device=G.device)
    # (S Sᵀ + δI) is symmetric, so Aᵀ = (S Sᵀ + δI)⁻¹ (S Xᵀ): one batched solve, no inverse
    At = torch.linalg.solve(G, S @ X.transpose(-1, -2))
    A = At.transpose(-1, -2)
    with torch.no_grad():
        floor = (finfo.eps * A.amax(dim=(-2, -1), keepdim=True)).clamp_min(finfo.tiny)
    return torch.maximum(A, floor)


class DNMF(nn.Module):
    """Deep-unfolded NMF (Nasser, Eldar & Sharan 2022) with a per-problem ``A`` read-out.

    Layer ``l``: ``S ← S ⊙ (U_l X) ⊘ (V_l S + ε)``, then (for the output)
    ``A_l = max(X Sᵀ (S Sᵀ + δI)⁻¹, floor)``; see the module docstring for the
    adaptation and the parametrisation.

    Parameters
    ----------
    n_layers : int, default 10
        Unrolled layers (DNMF is a shallow network).
    m : int, default 65
        Channels (rows of X).
    n : int, default 4
        Components.
    A_init : array-like (m, n), required
        Non-negative reference spectra, columns in the training order (e.g.
        the mean of the training spectra); normalised to unit-norm columns.
        ``U_l``, ``V_l`` start at ``A_refᵀ``, ``A_refᵀA_ref`` with ``A_ref`` =
        normalised ``A_init`` (zeros raised to ``1e-6`` × the column's max).
    ridge : float, default 1e-6
        Relative ridge ``δ / (trace(S Sᵀ)/n)`` of the ``A`` read-out.
    eps : float, default :data:`fastmu.EPS`
        Added to the update's denominator; finite and > 0 (with 0 a zero
        pixel gives 0/0).
    dtype, device
        Of the parameters (X must match them): float32 or float64, and a
        device torch sees.

    Attributes
    ----------
    log_A_ref : Parameter (m, n)
        ``A_ref = normalise_columns(exp(log_A_ref))``.
    theta_U : Parameter (n_layers, n, m)
        ``U_l = A_refᵀ ⊙ exp(θU_l)``; zeros at init.
    theta_V : Parameter (n_layers, n, n)
        ``V_l = (A_refᵀ A_ref) ⊙ exp(θV_l)``; zeros at init.

    Examples
    --------
    >>> import torch
    >>> from fastmu.baselines import DNMF
    >>> model = DNMF(n_layers=4, m=8, n=3, A_init=torch.rand(8, 3) + 0.1)
    >>> A, S = model(torch.rand(2, 8, 50))
    >>> A.shape, S.shape
    (torch.Size([2, 8, 3]), torch.Size([2, 3, 50]))
    """

    def __init__(
        self,
        n_layers: int = 10,
        m: int = 65,
        n: int = 4,
        *,
        A_init: Any = None,
        ridge: float = 1e-6,
        eps: float = EPS,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        n_layers, m, n = _check_layers(n_layers, m, n)
        device = _check_dtype_device(dtype, device, "DNMF")
        A0 = _spectra_matrix(A_init, m, n, "DNMF")
        ridge = float(ridge)
        if not (np.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite non-negative number, got {ridge!r}")
        # > 0 and held by the dtype: with eps = 0 a zero pixel gives 0/0 = NaN
        eps = check_eps(eps, torch.get_default_dtype() if dtype is None else dtype)
        self.n_layers, self.m, self.n = n_layers, m, n
        self.ridge, self.eps = ridge, eps
        # exp cannot hold 0: raise zeros (and near-zeros) to a small fraction of the column's max
        A0 = torch.maximum(A0, A_REF_FLOOR * A0.amax(dim=0, keepdim=True))
        # A_init arrives as float64: without an explicit dtype, use the default one (as nn.Parameter(zeros) would)
        kw = {"dtype": torch.get_default_dtype() if dtype is None else dtype, "device": device}
        self.log_A_ref = nn.Parameter(torch.log(A0).to(**kw))
        self.theta_U = nn.Parameter(torch.zeros(n_layers, n, m, **kw))
        self.theta_V = nn.Parameter(torch.zeros(n_layers, n, n, **kw))

    def reference_spectra(self) -> torch.Tensor:
        """``A_ref (m, n)``: positive, unit-norm columns."""
        A = torch.exp(self.log_A_ref)
        return A / A.norm(dim=0, keepdim=True)

    def layer_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's ``U (n_layers, n, m)`` and ``V (n_layers, n, n)``, all entries positive."""
        A = self.reference_spectra()
        U = A.T * torch.exp(self.theta_U)
        V = (A.T @ A) * torch.exp(self.theta_V)
        return U, V

    def forward(self, X: torch.Tensor, return_all: bool = False) -> Factors | list[Factors]:
        """Unmix ``X``.

        Parameters
        ----------
        X : Tensor (b, m, t) or (m, t)
            Non-negative data, the dtype and device of the model.
        return_all : bool
            Return every layer's ``(A_l, S_l)`` (for the layer-weighted loss)
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
        X, squeeze = _check_model_input(X, self.m, self.log_A_ref, eps=self.eps)  # and X's values
        _, S = constant_init(X, self.n)
        U, V = self.layer_matrices()
        outs: list[Factors] = []
        # unbind: one backward op for all layers' slices (see fastmu.nn.models.run_layers)
        b = X.shape[0]
        for U_l, V_l in zip(U.unbind(0), V.unbind(0)):
            # bmm with U_l expanded: `U_l @ X` would fold the batch into X's rows and
            # copy X transposed on every layer
            S = S * torch.bmm(U_l.expand(b, -1, -1), X) / (V_l @ S + self.eps)
            if return_all:
                outs.append((ridge_nnls_step(X, S, self.ridge), S))
        out: Factors | list[Factors] = outs if return_all else (ridge_nnls_step(X, S, self.ridge), S)
        check_finite_output(self, X, *(out[-1] if return_all else out))
        return _squeeze(out, squeeze)

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, m={self.m}, n={self.n}, ridge={self.ridge}"
