"""The paper's training loss for the unrolled models (Kervazo et al., eq. 3).

::

    loss = − Σ_d Σ_l v_l ( cos(A_l^d, A*^d) + cos(S_l^d, S*^d) ),   v_l = (l − 1)/(L − 1)

``d`` runs over the problems of a batch, ``l = 1..L`` over the layers whose
outputs are scored, and ``cos(·, ·)`` is the mean cosine similarity of
same-position components — columns of A (spectra), rows of S (maps): the
paper's "SAD", 1 for a perfect estimate. No permutation matching: the learned
models output components in the training order.

Reduction: ``reduction="mean"`` (default) divides the sum over ``d`` by the
batch size, so the loss does not change scale with the batch size and lies in
``[−2 Σ_l v_l, 2 Σ_l v_l]``; ``"sum"`` is the formula as written.

This module imports torch.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["layer_weights", "mean_component_cosine", "unrolled_loss"]

Factors = tuple[torch.Tensor, torch.Tensor]


def layer_weights(n_layers: int, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The paper's linear layer weights ``v_l = (l − 1)/(L − 1)``, ``l = 1..L`` (``[1.]`` when L = 1)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
    if n_layers == 1:
        return torch.ones(1, dtype=dtype, device=device)
    return torch.arange(n_layers, dtype=dtype, device=device) / (n_layers - 1)


def mean_component_cosine(est: torch.Tensor, true: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over components of the cosine between same-position components.

    Parameters
    ----------
    est, true : Tensor (..., m, n) with ``dim=-2`` (columns of A), or (..., n, t) with ``dim=-1`` (rows of S)
    dim : int
        The axis along which each component runs.

    Returns
    -------
    Tensor (...)
        One value per problem, in [−1, 1]. A zero component has cosine 0.
    """
    if est.shape != true.shape:
        raise ValueError(f"estimate shape {tuple(est.shape)} differs from the truth's {tuple(true.shape)}")
    return _mean_cosine(est, true, true.norm(dim=dim), dim)


def _mean_cosine(est: torch.Tensor, true: torch.Tensor, true_norm: torch.Tensor, dim: int) -> torch.Tensor:
    # vecdot avoids the (b, n, t) product temporary; the truth's norms are
    # computed once per loss, not once per layer.
    tiny = torch.finfo(est.dtype).tiny
    dot = torch.linalg.vecdot(est, true, dim=dim)
    return (dot / (est.norm(dim=dim) * true_norm).clamp_min(tiny)).mean(dim=-1)


def unrolled_loss(
    outputs: Sequence[Factors] | Factors,
    A_true: torch.Tensor,
    S_true: torch.Tensor,
    weights: torch.Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Layer-weighted negative cosine loss (paper eq. 3).

    Parameters
    ----------
    outputs : list of (A_l, S_l), or one (A, S)
        Every scored layer's factors, first to last (``model(X, return_all=True)``);
        ``A_l (b, m, n)``, ``S_l (b, n, t)``. One pair counts as L = 1 (weight 1).
    A_true : Tensor (b, m, n)
    S_true : Tensor (b, n, t)
    weights : optional
        Per-layer weights (constants, read on the host; no gradient flows to
        them); default :func:`layer_weights` ``(L)``.
    reduction : {"mean", "sum"}
        Over the problems of the batch.

    Returns
    -------
    Tensor (scalar)

    Examples
    --------
    >>> import torch
    >>> A = torch.rand(2, 5, 3); S = torch.rand(2, 3, 7)
    >>> float(unrolled_loss([(A, S), (A, S)], A, S))  # v = (0, 1): −(1 + 1)
    -2.0
    """
    if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[0], torch.Tensor):
        outputs = [outputs]
    outputs = list(outputs)
    if not outputs:
        raise ValueError("outputs is empty")
    L = len(outputs)
    ref = outputs[0][0]
    # The weights are read on the host once: comparing device scalars layer by
    # layer would synchronise a GPU L times (and rule out CUDA-graph capture).
    if weights is None:
        v = layer_weights(L).tolist()
    else:
        vt = torch.as_tensor(weights).detach()
        if vt.shape != (L,):
            raise ValueError(f"weights must have one value per layer ({L}), got shape {tuple(vt.shape)}")
        v = vt.to("cpu", torch.float64).tolist()
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    total = ref.new_zeros(())
    nA = A_true.norm(dim=-2)
    nS = S_true.norm(dim=-1)
    for vl, (A, S) in zip(v, outputs):
        if vl == 0.0:  # v_1 = 0: skip the work (and the graph) for that layer
            continue
        if A.shape != A_true.shape or S.shape != S_true.shape:
            raise ValueError(
                f"layer output shapes {tuple(A.shape)}, {tuple(S.shape)} differ from the truth's "
                f"{tuple(A_true.shape)}, {tuple(S_true.shape)}"
            )
        per = _mean_cosine(A, A_true, nA, -2) + _mean_cosine(S, S_true, nS, -1)
        total = total + vl * (per.mean() if reduction == "mean" else per.sum())
    return -total
