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

Computation: :func:`unrolled_loss` runs as one autograd node on fused
kernels (:mod:`fastmu.kernels.cpu_cosine`, :mod:`fastmu.kernels.cuda_cosine`):
per layer and factor one pass over the estimate forward and one backward
(writing its gradient), where torch ops take about 70 small ops per layer, a
host cost that bounds a GPU training step. ``fused=False`` (and any case the
kernels do not cover) computes the same expression in torch ops.

This module imports torch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import numpy as np
import torch

from fastmu.nn.functional import eager_under_compile, first_order_only
from fastmu.validation import positive_count

__all__ = ["NORM_FLOOR", "layer_weights", "mean_component_cosine", "unrolled_loss"]

#: Components (estimated or true) with a norm below this count as zero in the loss: cosine 0,
#: no gradient. The loss sums in float64, where entries down to ~1e-154 square without
#: underflow, so above it the cosine is exact to rounding; float32 data never comes near it
#: (its smallest entries, ~1e-45, are normal in float64), only an all-zero component does.
NORM_FLOOR = 1e-100

Factors = tuple[torch.Tensor, torch.Tensor]


def layer_weights(n_layers: int, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The paper's linear layer weights ``v_l = (l − 1)/(L − 1)``, ``l = 1..L`` (``[1.]`` when L = 1).

    Parameters
    ----------
    n_layers : int
        L, at least 1 (a Python or NumPy integer).
    dtype : torch.dtype, default torch.float64
    device : torch.device or str, optional

    Returns
    -------
    Tensor, shape (L,)
    """
    n_layers = positive_count(n_layers, "n_layers")
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
        One value per problem, in [−1, 1]. A component whose norm (or whose
        truth's norm) is below :data:`NORM_FLOOR` counts as zero: cosine 0,
        and no gradient.

    Notes
    -----
    NumPy arrays are accepted (converted to tensors, as are integer inputs
    to float64); the result is a tensor.
    """
    est, true = _as_float_tensor(est, "est"), _as_float_tensor(true, "true")
    if est.shape != true.shape:
        raise ValueError(f"estimate shape {tuple(est.shape)} differs from the truth's {tuple(true.shape)}")
    if not -true.dim() <= dim < true.dim():
        raise ValueError(f"dim={dim} is out of range for tensors of {true.dim()} dimensions")
    return _mean_cosine(est, true, _norms(true, dim), dim)


def _as_float_tensor(x: Any, name: str) -> torch.Tensor:
    """A floating-point tensor of ``x`` (a tensor or a NumPy array; integers become float64)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} has dtype {x.dtype}; pass a numeric array")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("=")))  # native byte order
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} has dtype {x.dtype}; the cosine is computed for real values")
    return x if x.is_floating_point() else x.to(torch.float64)


def _norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Component norms in float64 (the sums of the loss all run in float64)."""
    return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float64)


def _mean_cosine(est: torch.Tensor, true: torch.Tensor, true_norm: torch.Tensor, dim: int) -> torch.Tensor:
    # vecdot avoids the (b, n, t) product temporary; the truth's norms
    # (float64) are computed once per loss, not once per layer. The sums run
    # in float64, as in the fused kernels: in float32 the norm of an estimate
    # with entries below ~1e-19 underflows to 0 while its dot product with
    # the truth does not, which would give cosines far above 1.
    e, t = est.to(torch.float64), true.to(torch.float64)
    dot = torch.linalg.vecdot(e, t, dim=dim)
    ne = e.norm(dim=dim)
    # below the floor: cosine 0 and no gradient (the inner where keeps the
    # masked branch finite, so its zero gradient is not 0 · inf = NaN)
    ok = ~((ne < NORM_FLOOR) | (true_norm < NORM_FLOOR))  # NaN norms stay in, and propagate
    c = torch.where(ok, dot / torch.where(ok, ne * true_norm, 1.0), 0.0)
    return c.mean(dim=-1).to(est.dtype)


def unrolled_loss(
    outputs: Sequence[Factors] | Factors,
    A_true: torch.Tensor,
    S_true: torch.Tensor,
    weights: torch.Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
    fused: bool = True,
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
        Per-layer weights, finite and non-negative (constants, read on the
        host; no gradient flows to them); default :func:`layer_weights` ``(L)``.
    reduction : {"mean", "sum"}
        Over the problems of the batch.
    fused : bool
        Compute each layer's terms with the fused kernels of
        :mod:`fastmu.kernels.cpu_cosine` / :mod:`fastmu.kernels.cuda_cosine`
        (one pass over each factor forward, one backward; the whole loss is
        one autograd node) where they apply: float32/float64 tensors on the
        CPU or a CUDA device, and a truth that does not require grad.
        Otherwise, or with ``fused=False``, torch ops with autograd
        (about 70 ops per layer). Both give the same value and gradients to
        rounding. The fused backward gives first derivatives only: asking
        for a second one (``create_graph=True``, a Hessian) raises; use
        ``fused=False`` for those.

    Returns
    -------
    Tensor (scalar)

    Raises
    ------
    TypeError
        ``outputs`` not one ``(A, S)`` pair or a list of them, non-tensor or
        non-floating truths, factors of another dtype than the truth's, or
        non-numeric weights.
    ValueError
        Empty ``outputs``, mismatched shapes or devices, weights not one finite
        non-negative value per layer, or an unknown ``reduction``.

    Examples
    --------
    >>> import torch
    >>> A = torch.rand(2, 5, 3); S = torch.rand(2, 3, 7)
    >>> float(unrolled_loss([(A, S), (A, S)], A, S))  # v = (0, 1): −(1 + 1)
    -2.0
    """
    outputs = _layer_outputs(outputs)
    L = len(outputs)
    for name, truth in (("A_true", A_true), ("S_true", S_true)):
        if not isinstance(truth, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(truth).__name__}")
        if not truth.is_floating_point():
            raise TypeError(f"{name} has dtype {truth.dtype}; the loss compares floating-point factors: convert it "
                            f"(e.g. {name}.to(A.dtype) with A a layer output)")
    if A_true.dim() < 2 or S_true.dim() < 2 or A_true.numel() == 0 or S_true.numel() == 0:
        raise ValueError(f"A_true and S_true must be non-empty (..., m, n) and (..., n, t), got shapes "
                         f"{tuple(A_true.shape)} and {tuple(S_true.shape)}")
    if S_true.dtype != A_true.dtype or S_true.device != A_true.device:
        raise TypeError(f"A_true and S_true must share dtype and device, got {A_true.dtype} on {A_true.device} "
                        f"and {S_true.dtype} on {S_true.device}")
    if A_true.device.type == "cpu":  # Numba's kernels or torch's OpenMP, in a forked child
        from fastmu import fork_safety

        fork_safety.check_cpu_kernels_usable()
    # the fused kernels size their per-component sums from A_true: S_true must agree
    if A_true.shape[:-2] != S_true.shape[:-2] or A_true.shape[-1] != S_true.shape[-2]:
        raise ValueError(f"A_true (..., m, n) and S_true (..., n, t) must share the batch and n, got shapes "
                         f"{tuple(A_true.shape)} and {tuple(S_true.shape)}")
    # The weights are read on the host once: comparing device scalars layer by
    # layer would synchronise a GPU L times (and rule out CUDA-graph capture).
    v = layer_weights(L).tolist() if weights is None else _check_weights(weights, L)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    for A, S in outputs:
        for name, f, truth in (("A", A, A_true), ("S", S, S_true)):
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"layer output {name} must be a torch.Tensor, got {type(f).__name__}")
            if f.dtype != truth.dtype:
                raise TypeError(f"layer output {name} has dtype {f.dtype} but the truth has {truth.dtype}")
            if f.device != truth.device:
                raise ValueError(f"layer output {name} is on {f.device} but the truth is on {truth.device}")
        if A.shape != A_true.shape or S.shape != S_true.shape:
            raise ValueError(
                f"layer output shapes {tuple(A.shape)}, {tuple(S.shape)} differ from the truth's "
                f"{tuple(A_true.shape)}, {tuple(S_true.shape)}"
            )
    scored = [(vl, A, S) for vl, (A, S) in zip(v, outputs) if vl != 0.0]  # v_1 = 0: no work, no graph
    if not scored:
        return A_true.new_zeros(()).neg_()
    if fused and _fusable(A_true, S_true):
        return _fused_loss(scored, A_true, S_true, reduction)
    total = A_true.new_zeros(())
    nA = _norms(A_true, -2)
    nS = _norms(S_true, -1)
    for vl, A, S in scored:
        per = _mean_cosine(A, A_true, nA, -2) + _mean_cosine(S, S_true, nS, -1)
        total = total + vl * (per.mean() if reduction == "mean" else per.sum())
    return -total


def _layer_outputs(outputs: Any) -> list[tuple[Any, Any]]:
    """``outputs`` as a non-empty list of ``(A_l, S_l)`` pairs (one pair given alone counts as one layer)."""
    if isinstance(outputs, torch.Tensor):
        raise TypeError("outputs must be a list of (A_l, S_l) pairs or one (A, S) pair, got a single tensor")
    if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[0], torch.Tensor):
        outputs = [outputs]
    try:
        outputs = list(outputs)
    except TypeError:
        raise TypeError(f"outputs must be a list of (A_l, S_l) pairs or one (A, S) pair, "
                        f"got {type(outputs).__name__}") from None
    if not outputs:
        raise ValueError("outputs is empty")
    if all(isinstance(x, torch.Tensor) for x in outputs):  # e.g. (A, S, X): not one layer per tensor
        raise TypeError(f"outputs is a sequence of {len(outputs)} tensors; one layer's output is an (A, S) pair: "
                        "pass one pair or a list of pairs (model(X, return_all=True))")
    for l, pair in enumerate(outputs):
        # a tuple of three tensors is not three layers: each layer is a pair
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            got = (f"a {type(pair).__name__} of {len(pair)}" if isinstance(pair, (tuple, list))
                   else f"a {type(pair).__name__}")
            raise TypeError(f"outputs[{l}] must be an (A_l, S_l) pair, got {got}; pass a list of pairs "
                            "(model(X, return_all=True)) or one (A, S) pair")
    return outputs


def _check_weights(weights: Any, L: int) -> list[float]:
    """The per-layer weights as floats on the host: ``L`` finite non-negative numbers."""
    try:
        vt = torch.as_tensor(weights).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"weights must be a tensor or a sequence of numbers, got {type(weights).__name__}") from exc
    if vt.is_complex() or vt.dtype == torch.bool:
        raise TypeError(f"weights must be real numbers, got dtype {vt.dtype}")
    if vt.shape != (L,):
        raise ValueError(f"weights must have one value per layer ({L}), got shape {tuple(vt.shape)}")
    v = vt.to("cpu", torch.float64).tolist()
    # a negative weight would reward a layer for the wrong components; NaN makes the loss NaN
    if not all(math.isfinite(x) and x >= 0 for x in v):
        raise ValueError(f"weights must be finite and non-negative, got {v}")
    return v


# ---------------------------------------------------------------------------
# The fused loss: one autograd node over the layers, a kernel per factor and layer
# ---------------------------------------------------------------------------


def _fusable(A_true: torch.Tensor, S_true: torch.Tensor) -> bool:
    """Whether the kernels cover the case (the factors' dtypes and devices are the truth's: checked)."""
    if A_true.device.type not in ("cpu", "cuda") or A_true.dtype not in (torch.float32, torch.float64):
        return False
    return not (A_true.requires_grad or S_true.requires_grad)


def _as3d(x: torch.Tensor) -> torch.Tensor:
    """``(..., D1, D2)`` as a C-contiguous ``(B, D1, D2)`` (no copy for a contiguous 3-D tensor)."""
    x = x.contiguous()
    return x if x.dim() == 3 else x.reshape(-1, x.shape[-2], x.shape[-1])


class _CpuCosine:
    def session(self) -> contextlib.AbstractContextManager:
        from fastmu import fork_safety

        return fork_safety.cpu_kernels()  # the forward and the backward run in it

    def forward(self, E, T, cols, tnorm, floor, scale, stats, j) -> None:
        from fastmu.kernels.cpu_cosine import cosine_forward

        cosine_forward(*(x.detach().numpy() for x in (E, T)), cols, tnorm.numpy(), floor, scale, stats.numpy(), j)

    def backward(self, E, T, cols, tnorm, floor, stats, j, g, scale, G) -> None:
        from fastmu.kernels.cpu_cosine import cosine_backward

        cosine_backward(*(x.detach().numpy() for x in (E, T)), cols, tnorm.numpy(), floor, stats.numpy(), j,
                        g.detach().numpy(), scale, G.numpy())


def _cosine_runner(x: torch.Tensor) -> Any:
    if x.device.type == "cpu":
        return _CpuCosine()
    from fastmu.kernels.cuda_cosine import CosinePlan

    return CosinePlan(int(torch.cuda.current_stream(x.device).cuda_stream))


class _FusedLoss(torch.autograd.Function):
    """``−Σ_l scale_l Σ_{d,k} (cos(A_l) + cos(S_l))`` with the fused cosine kernels.

    ``_FusedLoss.apply(A_true, S_true, scales, run, A_1..A_L, S_1..S_L)``: 3-D
    contiguous tensors; ``scales[l] = v_l / (n · batch or 1)``. Saved: the
    factors (read again by the backward) and per component the cosine and
    ``‖e‖`` (float64, O(L·b·n)); nothing of the size of S is computed twice.
    """

    @staticmethod
    def forward(ctx, A_true, S_true, scales, run, *factors):  # type: ignore[override]
        L = len(scales)
        floor = NORM_FLOOR
        # ‖t‖ per component in float64, once per loss
        tnA, tnS = _norms(A_true, -2), _norms(S_true, -1)
        stats = torch.empty((3, 2 * L, *tnA.shape), dtype=torch.float64, device=A_true.device)
        with contextlib.ExitStack() as stack:
            if A_true.device.type == "cuda":
                stack.enter_context(torch.cuda.device(A_true.device))
            stack.enter_context(run.session())
            for l in range(L):
                run.forward(factors[l], A_true, True, tnA, floor, scales[l], stats, 2 * l)
                run.forward(factors[L + l], S_true, False, tnS, floor, scales[l], stats, 2 * l + 1)
        ctx.save_for_backward(A_true, S_true, tnA, tnS, stats, *factors)
        ctx.scales, ctx.run, ctx.floor = scales, run, floor
        return stats[2].sum().neg_().to(A_true.dtype)

    @staticmethod
    @first_order_only("the fused loss", "unrolled_loss(..., fused=False)")
    def backward(ctx, g):  # type: ignore[override]
        A_true, S_true, tnA, tnS, stats, *factors = ctx.saved_tensors
        L, run, floor = len(ctx.scales), ctx.run, ctx.floor
        need = ctx.needs_input_grad[4:]
        g1 = g.reshape(1).contiguous()
        grads: list[torch.Tensor | None] = [None] * (2 * L)
        # one allocation per factor for every layer's gradient
        gA = A_true.new_empty((L, *A_true.shape)).unbind(0) if any(need[:L]) else None
        gS = S_true.new_empty((L, *S_true.shape)).unbind(0) if any(need[L:]) else None
        with contextlib.ExitStack() as stack:
            if A_true.device.type == "cuda":
                stack.enter_context(torch.cuda.device(A_true.device))
            stack.enter_context(run.session())
            for l in range(L):
                if need[l]:
                    run.backward(factors[l], A_true, True, tnA, floor, stats, 2 * l, g1, -ctx.scales[l], gA[l])
                    grads[l] = gA[l]
                if need[L + l]:
                    run.backward(factors[L + l], S_true, False, tnS, floor, stats, 2 * l + 1, g1,
                                 -ctx.scales[l], gS[l])
                    grads[L + l] = gS[l]
        return (None, None, None, None, *grads)


@eager_under_compile
def _fused_loss(scored: list, A_true: torch.Tensor, S_true: torch.Tensor, reduction: str) -> torch.Tensor:
    At, St = _as3d(A_true), _as3d(S_true)
    B, n = At.shape[0], At.shape[2]
    div = n * (B if reduction == "mean" else 1)
    scales = tuple(vl / div for vl, _, _ in scored)
    factors = [_as3d(A) for _, A, _ in scored] + [_as3d(S) for _, _, S in scored]
    return _FusedLoss.apply(At, St, scales, _cosine_runner(At), *factors)
