"""The differentiable learned-MU layer: a ``torch.autograd.Function`` on fused kernels.

One layer::

    A' = A ⊙ W ⊙ (X Sᵀ) ⊘ (A S Sᵀ + ε)
    S' = S ⊙ (A'ᵀ X) ⊘ (A'ᵀ A' S + ε)

The forward runs the fused Numba kernel of the tensors' device (CPU:
:mod:`fastmu.kernels.cpu_backward`; CUDA: :mod:`fastmu.kernels.cuda_backward`)
on zero-copy views of the tensors, writing fresh output tensors. The backward
runs the handwritten backward kernel of the same module.

What is saved per layer: the inputs ``X, A, S, W`` (X is shared by every
layer of a model, so it is stored once) and the small ``P = X Sᵀ`` and
``G = S Sᵀ`` (O(m·n) per problem) that the forward computes anyway: keeping
them spares the backward a third pass over X. ``R``, ``D``, ``A'``, ``H`` and
all ratios are recomputed in the backward.

A deep model chains layers through :func:`learned_mu_step_pg`, which also
returns ``P`` and ``G`` of the new S (accumulated during the S update at no
extra pass over X) for the next layer: then each layer reads X once forward
and twice backward.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastmu import EPS

__all__ = ["LearnedMUStep", "learned_mu_step", "learned_mu_step_pg", "check_layer_inputs"]

_FLOATS = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def check_layer_inputs(
    X: Any, A: Any, S: Any, W: Any, *, check_w_values: bool = True
) -> None:
    """Validate the inputs of one learned-MU layer.

    Raises
    ------
    TypeError
        A non-tensor argument, a dtype other than float32/float64, or mixed dtypes.
    ValueError
        Wrong number of dimensions, inconsistent shapes, tensors on different
        devices, or (when ``check_w_values``) a negative or non-finite W.
    """
    names = ("X", "A", "S", "W")
    for name, v in zip(names, (X, A, S, W)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    for name, v in zip(names, (X, A, S, W)):
        if v.dtype not in _FLOATS:
            raise TypeError(f"{name} has dtype {v.dtype}; the learned layer computes in float32 or float64")
    dtypes = {str(v.dtype) for v in (X, A, S, W)}
    if len(dtypes) > 1:
        raise TypeError(
            "X, A, S and W must share one dtype, got "
            + ", ".join(f"{n}: {v.dtype}" for n, v in zip(names, (X, A, S, W)))
        )
    devices = {str(v.device) for v in (X, A, S, W)}
    if len(devices) > 1:
        raise ValueError(
            "X, A, S and W must be on the same device, got "
            + ", ".join(f"{n}: {v.device}" for n, v in zip(names, (X, A, S, W)))
        )
    for name, v in zip(names[:3], (X, A, S)):
        if v.dim() != 3:
            raise ValueError(f"{name} must be 3-D (batch first), got shape {tuple(v.shape)}")
    b, m, t = X.shape
    n = A.shape[2]
    if min(b, m, t, n) == 0:
        raise ValueError("X and A must not have zero-size dimensions")
    if tuple(A.shape) != (b, m, n):
        raise ValueError(f"A must have shape (b, m, n) = ({b}, {m}, n) to match X {tuple(X.shape)}, got {tuple(A.shape)}")
    if tuple(S.shape) != (b, n, t):
        raise ValueError(f"S must have shape (b, n, t) = {(b, n, t)}, got {tuple(S.shape)}")
    if not (tuple(W.shape) == (m, n) or tuple(W.shape) == (b, m, n)):
        raise ValueError(
            f"W must have shape (m, n) = {(m, n)} (shared by the batch) or (b, m, n) = {(b, m, n)} "
            f"(one per problem), got {tuple(W.shape)}"
        )
    if check_w_values:
        with torch.no_grad():
            if not bool(torch.isfinite(W).all()):
                raise ValueError("W contains NaN or infinite values")
            if bool((W < 0).any()):
                raise ValueError(f"W must be non-negative; its minimum is {float(W.min()):g}")


# ---------------------------------------------------------------------------
# Kernel calls
# ---------------------------------------------------------------------------


def _nthreads() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def _np(x: torch.Tensor):
    """Zero-copy NumPy view of a contiguous CPU tensor."""
    return x.detach().numpy() if x.requires_grad else x.numpy()  # detach costs ~0.4 µs


def _cuda_arrays(*xs: torch.Tensor):
    from numba import cuda

    # sync=False: the kernels are queued on torch's current stream, so no
    # host synchronisation is needed (the default would block per array).
    return [cuda.as_cuda_array(x.detach(), sync=False) for x in xs]


def _torch_alloc(device: torch.device):
    """An allocator for the kernels' scratch arrays backed by torch's caching allocator.

    Scratch memory then shows in ``torch.cuda.max_memory_allocated`` (and
    is reused stream-ordered like any torch temporary) instead of being
    hidden in separate Numba allocations.
    """
    from numba import cuda

    def alloc(shape, dtype):
        t = torch.empty(tuple(int(s) for s in shape), dtype=getattr(torch, np.dtype(dtype).name), device=device)
        return cuda.as_cuda_array(t, sync=False)  # keeps a reference to t

    return alloc


def _cuda_stream(device: torch.device):
    from numba import cuda

    return cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)


def _cuda_call_args(device: torch.device, *xs: torch.Tensor):
    """Arrays, stream and scratch allocator for the CUDA kernels' host functions.

    With the fast launch (:mod:`fastmu.kernels.cuda_launch`) the tensors go
    to the kernels as they are, on torch's current stream handle, and scratch
    arrays are plain torch tensors; otherwise each becomes a Numba view.
    """
    from fastmu.kernels.cuda_launch import fast_launch_available

    if fast_launch_available():
        def alloc(shape, dtype):
            return torch.empty(tuple(int(v) for v in shape), dtype=getattr(torch, np.dtype(dtype).name),
                               device=device)

        return list(xs), int(torch.cuda.current_stream(device).cuda_stream), alloc
    return _cuda_arrays(*xs), _cuda_stream(device), _torch_alloc(device)


def _forward(X, A, S, W3, P, G, eps, pg_valid, want_pg):
    """Run the fused forward; returns ``A', S', P, G, P', G'`` (P', G' empty unless wanted)."""
    b, m, t = X.shape
    n = A.shape[2]
    A_out = torch.empty_like(A)
    S_out = torch.empty_like(S)
    # The CUDA forward accumulates P, G with atomics into zeroed arrays; torch's
    # memset is cheaper than a Numba launch.
    new = torch.zeros if X.device.type == "cuda" else torch.empty
    if not pg_valid:
        P = new((b, m, n), dtype=X.dtype, device=X.device)
        G = new((b, n, n), dtype=X.dtype, device=X.device)
    shape_pg = ((b, m, n), (b, n, n)) if want_pg else ((0, m, n), (0, n, n))
    P_out = new(shape_pg[0], dtype=X.dtype, device=X.device)
    G_out = new(shape_pg[1], dtype=X.dtype, device=X.device)
    if X.device.type == "cpu":
        # The solver's fused iteration (kernels.cpu.mu_run), run once in place on
        # the fresh outputs: it picks the problem-major schedule for batches,
        # which measured faster than a column-block-parallel layer forward.
        from fastmu.kernels import cpu as kf

        Xn, Pn, Gn = _np(X), _np(P), _np(G)
        if not pg_valid:  # P, G of the input S: the backward needs them too
            kf.mu_run(Xn, _np(A), _np(S), _np(W3), Pn, Gn, 0, float(eps), False, True, _nthreads())
        A_out.copy_(A)
        S_out.copy_(S)
        Pw = P_out if want_pg else torch.empty_like(P)
        Gw = G_out if want_pg else torch.empty_like(G)
        Pw.copy_(P)
        Gw.copy_(G)
        kf.mu_run(Xn, _np(A_out), _np(S_out), _np(W3), _np(Pw), _np(Gw), 1, float(eps), True,
                  bool(want_pg), _nthreads())
    elif X.device.type == "cuda":
        from fastmu.kernels import cuda_backward as kc

        with torch.cuda.device(X.device):
            arrs, stream, _ = _cuda_call_args(X.device, X, A, S, W3, P, G, A_out, S_out, P_out, G_out)
            kc.layer_forward(*arrs[:6], float(eps), bool(pg_valid), bool(want_pg), *arrs[6:],
                             stream=stream, zeroed=True)
    else:  # pragma: no cover - validated before
        raise ValueError(f"no fused learned-MU kernel for device {X.device}")
    return A_out, S_out, P, G, P_out, G_out


def _backward(X, A, S, W3, P, G, gA_out, gS_out, eps, need):
    """Run the handwritten backward; returns ``gX, gA, gS, gW3`` (None where not needed)."""
    need_gX, need_gA, need_gS, need_gW = need
    b, m, t = X.shape
    n = A.shape[2]
    dev, dt = X.device, X.dtype
    dummy = torch.empty((1, 1, 1), dtype=dt, device=dev)
    has_gS = gS_out is not None
    gA_out = torch.zeros_like(A) if gA_out is None else gA_out.contiguous()
    gS_in = gS_out.contiguous() if has_gS else torch.empty((1, n, 1), dtype=dt, device=dev)
    gA = torch.empty_like(A) if need_gA else dummy
    gS = torch.empty_like(S) if need_gS else dummy
    gW = torch.empty_like(W3) if need_gW else dummy
    gX = torch.empty_like(X) if need_gX else dummy
    if dev.type == "cpu":
        from fastmu.kernels import cpu_backward as kb

        kb.layer_backward(
            _np(X), _np(A), _np(S), _np(W3), _np(P), _np(G), _np(gA_out), _np(gS_in), float(eps), has_gS,
            need_gA, need_gS, need_gW, need_gX, _np(gA), _np(gS), _np(gW), _np(gX), _nthreads(),
        )
    else:
        from fastmu.kernels import cuda_backward as kc

        with torch.cuda.device(dev):
            arrs, stream, alloc = _cuda_call_args(dev, X, A, S, W3, P, G, gA_out, gS_in, gA, gS, gW, gX)
            kc.layer_backward(
                *arrs[:8], float(eps), has_gS, need_gA, need_gS, need_gW, need_gX, *arrs[8:],
                stream=stream, alloc=alloc,
            )
    return (
        gX if need_gX else None,
        gA if need_gA else None,
        gS if need_gS else None,
        gW if need_gW else None,
    )


class LearnedMUStep(torch.autograd.Function):
    """One learned-MU layer with a fused forward and a handwritten backward.

    ``LearnedMUStep.apply(X, A, S, W, eps, P, G, want_pg)`` returns
    ``(A', S', P', G')``. ``X (b, m, t)``, ``A (b, m, n)``, ``S (b, n, t)``
    contiguous; ``W`` ``(m, n)`` or ``(b, m, n)``, non-negative; ``P``, ``G``
    either ``None`` or ``X Sᵀ`` and ``S Sᵀ`` of this S (a cache handed on by
    the previous layer, never differentiated); ``P'``, ``G'`` are those of
    ``S'`` when ``want_pg``, else empty. Use :func:`learned_mu_step` (checked)
    or :func:`learned_mu_step_pg` rather than calling this directly.
    """

    @staticmethod
    def forward(ctx, X, A, S, W, eps, P, G, want_pg):  # type: ignore[override]
        W3 = W.unsqueeze(0) if W.dim() == 2 else W
        pg_valid = P is not None
        A_out, S_out, P_in, G_in, P_out, G_out = _forward(X, A, S, W3, P, G, eps, pg_valid, want_pg)
        ctx.save_for_backward(X, A, S, W, P_in, G_in)
        ctx.eps = float(eps)
        ctx.mark_non_differentiable(P_out, G_out)
        # Missing upstream gradients stay None: a zero gS' lets the backward
        # skip its first pass over X.
        ctx.set_materialize_grads(False)
        return A_out, S_out, P_out, G_out

    @staticmethod
    def backward(ctx, gA_out, gS_out, _gP, _gG):  # type: ignore[override]
        X, A, S, W, P, G = ctx.saved_tensors
        need = tuple(bool(x) for x in ctx.needs_input_grad[:4])  # X, A, S, W
        if not any(need) or (gA_out is None and gS_out is None):
            return (None,) * 8
        W3 = W.unsqueeze(0) if W.dim() == 2 else W
        gX, gA, gS, gW = _backward(X, A, S, W3, P, G, gA_out, gS_out, ctx.eps, need)
        if gW is not None and W.dim() == 2:
            gW = gW.reshape(W.shape)
        return gX, gA, gS, gW, None, None, None, None


def learned_mu_step(
    X: torch.Tensor, A: torch.Tensor, S: torch.Tensor, W: torch.Tensor, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """One differentiable learned-MU layer: the A update with ``W``, then the S update.

    Parameters
    ----------
    X : Tensor (b, m, t)
        Non-negative data.
    A : Tensor (b, m, n)
    S : Tensor (b, n, t)
        Current factors (positive).
    W : Tensor (m, n) or (b, m, n)
        Non-negative layer weight, shared by the batch (NALMU) or one per
        problem (ALMU).
    eps : float
        ε of every denominator (:data:`fastmu.EPS`).

    Returns
    -------
    A_new : Tensor (b, m, n)
    S_new : Tensor (b, n, t)

    Raises
    ------
    TypeError, ValueError
        See :func:`check_layer_inputs`.

    Notes
    -----
    float32 and float64, CPU (Numba) and CUDA (Numba CUDA). Gradients flow to
    every input that requires one; the backward computes only those.

    Examples
    --------
    >>> import torch
    >>> from fastmu.nn import learned_mu_step
    >>> X = torch.rand(2, 8, 32, dtype=torch.float64)
    >>> A = torch.full((2, 8, 3), 0.5, dtype=torch.float64)
    >>> S = torch.full((2, 3, 32), 0.5, dtype=torch.float64)
    >>> W = torch.ones(8, 3, dtype=torch.float64, requires_grad=True)
    >>> A1, S1 = learned_mu_step(X, A, S, W)
    >>> (A1.sum() + S1.sum()).backward()
    >>> W.grad.shape
    torch.Size([8, 3])
    """
    check_layer_inputs(X, A, S, W)
    if X.device.type not in ("cpu", "cuda"):
        raise ValueError(f"no fused learned-MU kernel for device {X.device}; use fastmu.reference.mu_step_torch")
    A_out, S_out, _, _ = LearnedMUStep.apply(
        X.contiguous(), A.contiguous(), S.contiguous(), W.contiguous(), float(eps), None, None, False
    )
    return A_out, S_out


def learned_mu_step_pg(
    X: torch.Tensor,
    A: torch.Tensor,
    S: torch.Tensor,
    W: torch.Tensor,
    eps: float = EPS,
    pg: tuple[torch.Tensor, torch.Tensor] | None = None,
    want_pg: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The layer for model stacks: unchecked, and handing ``X Sᵀ``, ``S Sᵀ`` to the next layer.

    ``pg`` must be exactly the ``(P, G)`` returned by the previous layer for
    this ``S`` (or None: computed here, one more pass over X). Inputs must be
    contiguous, valid (see :func:`check_layer_inputs`) and W non-negative; the
    models guarantee that by construction, so the per-layer checks (which
    synchronise a GPU) are skipped.
    """
    P, G = (None, None) if pg is None else pg
    A_out, S_out, P_out, G_out = LearnedMUStep.apply(X, A, S, W, float(eps), P, G, bool(want_pg))
    return A_out, S_out, ((P_out, G_out) if want_pg else None)
