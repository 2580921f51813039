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

A stack of layers hands ``P`` and ``G`` of each new S (accumulated during
the S update at no extra pass over X) to the next layer: then each layer
reads X once forward and twice backward. Two ways to run a stack:

- :func:`learned_mu_unroll` (what the models use): the ``L`` layers as one
  autograd node (:class:`LearnedMUUnroll`) whose forward loops over the
  layers and whose backward loops back over them, with one launch plan,
  one allocation of the layers' ``P``, ``G``, one of their outputs (saved
  for the backward as two tensors, not ``2L``) and two gradient buffers
  used in turn;
- :func:`learned_mu_step_pg` in a loop: one autograd node per layer.

Both run the same kernels and give the same results; the first costs far
less host time per layer, which is what bounds an eager step on a GPU.
Device specifics live in two small runners with one interface
(``_CpuLayers``, ``_CudaLayers``).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable

import numpy as np
import torch

from fastmu import EPS
from fastmu.validation import check_eps, check_tensors_nonnegative_finite

__all__ = [
    "LearnedMUStep", "LearnedMUUnroll", "check_layer_inputs", "check_unroll_weights", "first_order_only",
    "learned_mu_step", "learned_mu_step_pg", "learned_mu_unroll",
]

_FLOATS = (torch.float32, torch.float64)


def first_order_only(what: str, alternative: str) -> Callable[[Callable], Callable]:
    """Decorate a handwritten ``backward`` so that a graph of it (a second derivative) raises.

    The engine runs a backward with grad mode on exactly when the caller asked for
    ``create_graph=True`` (``torch.autograd.grad(..., create_graph=True)``,
    ``torch.autograd.functional.hessian``, a gradient penalty). A handwritten
    backward's result has no graph, so the derivative of it would silently be
    zero; ``once_differentiable`` raises only when an incoming gradient itself
    requires grad, which a first ``create_graph`` backward's does not. So the
    check is grad mode, before any work.

    Parameters
    ----------
    what : str
        What the backward differentiates, for the message.
    alternative : str
        What to use instead for higher derivatives, for the message.
    """
    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def checked(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{what} has a handwritten backward that is not itself differentiable, so a second "
                    f"derivative through it (create_graph=True, a Hessian, a gradient penalty) would be "
                    f"silently wrong; use {alternative} for higher derivatives")
            return backward(ctx, *grads)

        return checked

    return wrap


def eager_under_compile(fn: Callable) -> Callable:
    """Run ``fn`` eagerly where ``torch.compile`` traces its caller (a graph break there).

    The fused layers and loss hand NumPy views of tensor memory to Numba or
    launch Numba CUDA kernels, which TorchDynamo cannot trace: a compiled
    model would otherwise fail on its first call. ``torch._dynamo`` is imported
    only under compilation (it takes about as long as torch itself to import;
    nothing can be compiling before it is imported).
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules and torch.compiler.is_compiling():
            from torch import _dynamo

            return _dynamo.disable(fn, recursive=True)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


_LAYER_ALTERNATIVE = ("the torch-op layers (fastmu.reference.mu_step_torch, or a model built with "
                      "fused=False)")


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def check_layer_inputs(
    X: Any, A: Any, S: Any, W: Any, *, check_w_values: bool = True, check_data: bool = True
) -> None:
    """Validate the inputs of one learned-MU layer.

    Parameters
    ----------
    X : Tensor (b, m, t)
    A : Tensor (b, m, n)
    S : Tensor (b, n, t)
    W : Tensor (m, n) or (b, m, n)
    check_w_values : bool, default True
        Also check that W is finite and non-negative (reads W's values: on a
        GPU, a synchronisation).
    check_data : bool, default True
        Also check that X, A and S are finite and non-negative
        (:func:`fastmu.validation.check_tensors_nonnegative_finite`).

    Raises
    ------
    TypeError
        A non-tensor argument, a dtype other than float32/float64, or mixed dtypes.
    ValueError
        Wrong number of dimensions, inconsistent shapes, tensors on different
        devices, or (when ``check_w_values``) a negative or non-finite W, or
        (when ``check_data``) a negative or non-finite X, A or S.
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
    # one read on the host for all of them (on a GPU, one synchronisation)
    values = dict(zip(names[:3], (X, A, S))) if check_data else {}
    if check_w_values:
        values["W"] = W
    check_tensors_nonnegative_finite(values)


# ---------------------------------------------------------------------------
# Kernel calls: one runner per device, the same interface
# ---------------------------------------------------------------------------


def _nthreads() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def _np(x: torch.Tensor):
    """Zero-copy NumPy view of a contiguous CPU tensor."""
    return x.detach().numpy() if x.requires_grad else x.numpy()  # detach costs ~0.4 µs


#: thread governors of the CPU stack forward, by (shape, dtype, threads): kept across calls,
#: so that one learns over many forwards
_UNROLL_GOVERNORS: dict[tuple, Any] = {}
_MAX_UNROLL_GOVERNORS = 16


class _CpuLayers:
    """The Numba CPU kernels on zero-copy NumPy views of CPU tensors."""

    zeroed_pg = False  # the CPU forward overwrites P, G: no need to zero them

    @staticmethod
    def governor(X: torch.Tensor, backward: bool = False):
        """The :class:`fastmu.cpu_threads.ThreadGovernor` of a stack's forward (or ``backward``) on
        ``X``'s shape, or None.

        Each layer opens its own parallel regions, whatever the kernels'
        schedule (a problem-major batch too: one region per layer, not per
        run), and where other work wants the cores a layer waits a scheduler
        time slice for a thread that was taken away (README, "On a machine
        busy with other work"): the stack's layers are the governor's
        iterations, in the forward and, with a governor of its own, in the
        backward. None on one thread or with ``FASTMU_ADAPTIVE_THREADS=0``.
        """
        from fastmu import cpu_threads

        most = cpu_threads.adjustable_threads()
        if not most:
            return None
        b, m, t = X.shape
        key = (b, m, t, X.dtype, most, backward)
        gov = _UNROLL_GOVERNORS.get(key)
        if gov is None:  # built once per shape, not per forward
            if len(_UNROLL_GOVERNORS) >= _MAX_UNROLL_GOVERNORS:
                _UNROLL_GOVERNORS.pop(next(iter(_UNROLL_GOVERNORS)))  # the oldest shape
            gov = _UNROLL_GOVERNORS[key] = cpu_threads.ThreadGovernor(most)
        return gov

    def begin(self, X: torch.Tensor, n: int, bw: int) -> contextlib.AbstractContextManager:
        """Ready to run layers of ``X``'s shape, rank ``n`` and W batch ``bw``; the
        context to run them in."""
        from fastmu import fork_safety

        return fork_safety.cpu_kernels()  # forward and backward both run in it

    def forward(self, X, A, S, W3, P, G, A_out, S_out, P_out, G_out, eps, pg_valid, want_pg) -> None:
        """``A_out, S_out`` (and ``P_out, G_out`` of ``S_out`` when ``want_pg``; P, G of S when
        not ``pg_valid``): the solver's fused iteration (kernels.cpu.mu_run), run once in
        place on the outputs. It picks the problem-major schedule for batches, which
        measured faster than a column-block-parallel layer forward. The copies are
        NumPy's: torch's run on torch's OpenMP threads, which no governor sets."""
        from fastmu.kernels import cpu as kf

        Xn, An, Sn, Wn, Pn, Gn = _np(X), _np(A), _np(S), _np(W3), _np(P), _np(G)
        if not pg_valid:  # P, G of the input S: the backward needs them too
            kf.mu_run(Xn, An, Sn, Wn, Pn, Gn, 0, float(eps), False, True, _nthreads())
        Aon, Son = _np(A_out), _np(S_out)
        Pwn = _np(P_out) if want_pg else np.empty_like(Pn)
        Gwn = _np(G_out) if want_pg else np.empty_like(Gn)
        np.copyto(Aon, An)
        np.copyto(Son, Sn)
        np.copyto(Pwn, Pn)
        np.copyto(Gwn, Gn)
        kf.mu_run(Xn, Aon, Son, Wn, Pwn, Gwn, 1, float(eps), True, bool(want_pg), _nthreads())

    def backward(self, X, A, S, W3, P, G, gAo, gSo, eps, has_gSo, need, gA, gS, gW, gX) -> None:
        """The handwritten backward into ``gA, gS, gW, gX`` (dummies where not ``need``-ed)."""
        from fastmu.kernels import cpu_backward as kb

        need_gX, need_gA, need_gS, need_gW = need
        kb.layer_backward(
            _np(X), _np(A), _np(S), _np(W3), _np(P), _np(G), _np(gAo), _np(gSo), float(eps), has_gSo,
            need_gA, need_gS, need_gW, need_gX, _np(gA), _np(gS), _np(gW), _np(gX), _nthreads(),
        )


class _CudaLayers:
    """The Numba CUDA kernels on torch CUDA tensors, queued on torch's current stream.

    One :class:`fastmu.kernels.cuda_backward.LayerPlan` serves every layer of
    a call (one shape, one stream), so a layer only launches. With the fast
    launch (:mod:`fastmu.kernels.cuda_launch`) the tensors go to the kernels
    as they are; otherwise each becomes a Numba view at its launch. Scratch
    arrays are torch tensors: they show in ``torch.cuda.max_memory_allocated``
    and are reused stream-ordered like any torch temporary.
    """

    zeroed_pg = True  # the forward accumulates P, G with atomics into zeroed arrays

    @staticmethod
    def governor(X: torch.Tensor, backward: bool = False) -> None:
        """No thread count to govern on a GPU."""
        return None

    def __init__(self) -> None:
        self._plan = None
        self._key: tuple | None = None

    def begin(self, X: torch.Tensor, n: int, bw: int) -> contextlib.AbstractContextManager:
        """Plan the launches for this shape on torch's current stream (once per forward or
        backward of a stack, not per layer); the context makes X's device current and is one
        launch session of the plan (no foreign code runs inside it)."""
        plan = self.plan(X, n, bw)
        stack = contextlib.ExitStack()
        stack.enter_context(self.device(X))
        stack.enter_context(plan.session())
        return stack

    def device(self, X: torch.Tensor) -> contextlib.AbstractContextManager:
        return torch.cuda.device(X.device)

    def stream(self, X: torch.Tensor) -> int:
        """torch's current stream on X's device (the caller has made that device current)."""
        return int(torch.cuda.current_stream(X.device).cuda_stream)

    def plan(self, X: torch.Tensor, n: int, bw: int):
        """The :class:`~fastmu.kernels.cuda_backward.LayerPlan` for this shape and stream
        (kept while they stay the same, with its scratch arrays)."""
        from fastmu.kernels.cuda_backward import LayerPlan

        b, m, t = X.shape
        stream = self.stream(X)
        key = (b, m, t, n, X.dtype, bw, stream)
        if key != self._key:
            dev, dt = X.device, X.dtype

            def alloc(shape, dtype):
                return torch.empty(tuple(int(v) for v in shape), dtype=dt, device=dev)

            self._plan = LayerPlan(b, m, t, n, str(dt).replace("torch.", ""), bw, stream, alloc)
            self._key = key
        return self._plan

    def forward(self, X, A, S, W3, P, G, A_out, S_out, P_out, G_out, eps, pg_valid, want_pg) -> None:
        self._plan.forward(X, A, S, W3, P, G, eps, pg_valid, want_pg, A_out, S_out, P_out, G_out)

    def backward(self, X, A, S, W3, P, G, gAo, gSo, eps, has_gSo, need, gA, gS, gW, gX) -> None:
        need_gX, need_gA, need_gS, need_gW = need
        self._plan.backward(
            X, A, S, W3, P, G, gAo, gSo, eps, has_gSo, need_gA, need_gS, need_gW, need_gX, gA, gS, gW, gX)


def _runner(X: torch.Tensor) -> _CpuLayers | _CudaLayers:
    if X.device.type == "cpu":
        return _CpuLayers()
    if X.device.type == "cuda":
        return _CudaLayers()
    raise ValueError(  # pragma: no cover - validated before
        f"no fused learned-MU kernel for device {X.device}; use fastmu.reference.mu_step_torch")


def _dummies(X: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholders for a backward's unused array arguments: any (1, 1, 1) array, and
    ``(1, n, 1)`` for a missing ``gS'`` (the kernels are typed on rank, not size)."""
    return (torch.empty((1, 1, 1), dtype=X.dtype, device=X.device),
            torch.empty((1, n, 1), dtype=X.dtype, device=X.device))


def _pg_buffers(run, X: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.zeros if run.zeroed_pg else torch.empty)(shape, dtype=X.dtype, device=X.device)


def _layer_backward(run, X, A, S, W3, P, G, gAo, gSo, eps, need, gA=None, gS=None, gW=None, dummies=None):
    """One layer's gradients; returns ``gX, gA, gS, gW3`` (None where not needed).

    ``gAo`` / ``gSo`` None mean zero upstream gradients; ``gA`` / ``gS`` /
    ``gW`` are where to write those gradients (fresh tensors when None);
    ``dummies`` (:func:`_dummies`) stand in for unused arguments.
    """
    need_gX, need_gA, need_gS, need_gW = need
    dummy, no_gS = dummies or _dummies(X, A.shape[2])
    has_gS = gSo is not None
    gAo = torch.zeros_like(A) if gAo is None else gAo.contiguous()
    gS_in = gSo.contiguous() if has_gS else no_gS
    gA = (torch.empty_like(A) if gA is None else gA) if need_gA else dummy
    gS = (torch.empty_like(S) if gS is None else gS) if need_gS else dummy
    gW = (torch.empty_like(W3) if gW is None else gW) if need_gW else dummy
    gX = torch.empty_like(X) if need_gX else dummy
    run.backward(X, A, S, W3, P, G, gAo, gS_in, eps, has_gS, need, gA, gS, gW, gX)
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
        b, m, t = X.shape
        n = A.shape[2]
        run = _runner(X)
        with run.begin(X, n, W3.shape[0]):
            if not pg_valid:
                P, G = _pg_buffers(run, X, (b, m, n)), _pg_buffers(run, X, (b, n, n))
            P_out = _pg_buffers(run, X, (b if want_pg else 0, m, n))
            G_out = _pg_buffers(run, X, (b if want_pg else 0, n, n))
            A_out, S_out = torch.empty_like(A), torch.empty_like(S)
            run.forward(X, A, S, W3, P, G, A_out, S_out, P_out, G_out, eps, pg_valid, want_pg)
        ctx.save_for_backward(X, A, S, W, P, G)
        ctx.eps = float(eps)
        ctx.mark_non_differentiable(P_out, G_out)
        # Missing upstream gradients stay None: a zero gS' lets the backward
        # skip its first pass over X.
        ctx.set_materialize_grads(False)
        return A_out, S_out, P_out, G_out

    @staticmethod
    @first_order_only("the fused learned-MU layer", _LAYER_ALTERNATIVE)
    def backward(ctx, gA_out, gS_out, _gP, _gG):  # type: ignore[override]
        X, A, S, W, P, G = ctx.saved_tensors
        need = tuple(bool(x) for x in ctx.needs_input_grad[:4])  # X, A, S, W
        if not any(need) or (gA_out is None and gS_out is None):
            return (None,) * 8
        W3 = W.unsqueeze(0) if W.dim() == 2 else W
        run = _runner(X)
        with run.begin(X, A.shape[2], W3.shape[0]):
            gX, gA, gS, gW = _layer_backward(run, X, A, S, W3, P, G, gA_out, gS_out, ctx.eps, need)
        if gW is not None and W.dim() == 2:
            gW = gW.reshape(W.shape)
        return gX, gA, gS, gW, None, None, None, None


class LearnedMUUnroll(torch.autograd.Function):
    """``L`` learned-MU layers as one autograd node: a fused forward loop and a reverse backward loop.

    ``LearnedMUUnroll.apply(X, A0, S0, Ws, eps, return_all, keep, run)``:
    ``Ws`` is ``(L, m, n)`` (one W per layer, shared by the batch) or ``(L, b,
    m, n)`` (per problem); returns ``(A_L, S_L)``, or with ``return_all``
    ``(A_1, ..., A_L, S_1, ..., S_L)``. ``keep``: save what the backward
    needs (else the layers' factors are dropped as the loop goes, as in a
    no-grad forward). ``run`` is the device's kernel runner.

    Why one node for the stack rather than one per layer: the same kernels
    run, but a step of an L-layer model then costs one autograd node, one
    launch plan, one allocation of the layers' ``P``, ``G``, one of the
    outputs of layers ``1..L-1`` (saved as two tensors) and two reused
    gradient buffers, instead of L of each. Those outputs, when returned,
    are views of that allocation: changing one in place raises (the
    backward needs it); the last layer's outputs are tensors of their own. On a GPU an eager step of the
    per-layer stack was bound by that host work. Use :func:`learned_mu_unroll`.
    """

    @staticmethod
    def forward(ctx, X, A0, S0, Ws, eps, return_all, keep, run):  # type: ignore[override]
        L = Ws.shape[0]
        b, m, t = X.shape
        n = A0.shape[2]
        shared = Ws.dim() == 3
        W3s = Ws.unsqueeze(1).unbind(0) if shared else Ws.unbind(0)  # each (1 or b, m, n)
        with run.begin(X, n, W3s[0].shape[0]):
            # P, G of every layer's input S: layer l writes those of layer l + 1
            Ps, Gs = _pg_buffers(run, X, (L, b, m, n)), _pg_buffers(run, X, (L, b, n, n))
            Pl, Gl = Ps.unbind(0), Gs.unbind(0)
            no_p, no_g = _pg_buffers(run, X, (0, m, n)), _pg_buffers(run, X, (0, n, n))
            # The outputs of layers 1..L-1 (the inputs of layers 2..L): one (L-1, ...) tensor each
            # for A and S when they are kept (saved for the backward, or returned), so that autograd
            # saves, checks and unpacks two tensors instead of 2(L-1); else two ping-pong buffers.
            # The last layer's outputs are tensors of their own: what a caller may modify in place.
            stack = keep or return_all
            k = L - 1 if stack else min(L - 1, 2)
            A_mid = A0.new_empty((k, b, m, n))
            S_mid = S0.new_empty((k, b, n, t))
            A_outs, S_outs = A_mid.unbind(0), S_mid.unbind(0)
            A, S = A0, S0
            l = 0

            def layers(k: int) -> None:  # the next k layers
                nonlocal A, S, l
                for _ in range(k):
                    last = l == L - 1
                    if last:
                        A_out, S_out = torch.empty_like(A0), torch.empty_like(S0)
                    else:
                        i = l if stack else l % 2
                        A_out, S_out = A_outs[i], S_outs[i]
                    P_out, G_out = (no_p, no_g) if last else (Pl[l + 1], Gl[l + 1])
                    run.forward(X, A, S, W3s[l], Pl[l], Gl[l], A_out, S_out, P_out, G_out, eps, l > 0, not last)
                    A, S = A_out, S_out
                    l += 1

            gov = run.governor(X)
            if gov is None:
                layers(L)
            else:  # the layers are its iterations; the results do not change
                gov.run(layers, L)
        ctx.L, ctx.eps, ctx.return_all, ctx.run, ctx.shared = L, float(eps), bool(return_all), run, shared
        if keep:
            ctx.save_for_backward(X, A0, S0, Ws, Ps, Gs, A_mid, S_mid)
        ctx.set_materialize_grads(False)  # unused outputs give None: their layers skip work
        return (*A_outs, A, *S_outs, S) if return_all else (A, S)

    @staticmethod
    @first_order_only("the fused learned-MU unroll", _LAYER_ALTERNATIVE)
    def backward(ctx, *grads):  # type: ignore[override]
        L, run = ctx.L, ctx.run
        X, A0, S0, Ws, Ps, Gs, A_mid, S_mid = ctx.saved_tensors
        As = (A0, *A_mid.unbind(0))  # each layer's inputs
        Ss = (S0, *S_mid.unbind(0))
        if ctx.return_all:
            gA_up, gS_up = grads[:L], grads[L:]
        else:
            gA_up = (None,) * (L - 1) + (grads[0],)
            gS_up = (None,) * (L - 1) + (grads[1],)
        need_X, need_A0, need_S0, need_W = (bool(v) for v in ctx.needs_input_grad[:4])
        W3s = Ws.unsqueeze(1).unbind(0) if ctx.shared else Ws.unbind(0)
        with run.begin(X, A0.shape[2], W3s[0].shape[0]):
            gWs = torch.zeros_like(Ws) if need_W else None
            gW3s = (gWs.unsqueeze(1).unbind(0) if ctx.shared else gWs.unbind(0)) if need_W else None
            gX = torch.zeros_like(X) if need_X else None
            Pl, Gl = Ps.unbind(0), Gs.unbind(0)
            # gradients w.r.t. a layer's inputs ping-pong between two buffers: layer l
            # reads layer l + 1's while writing its own
            bufA: list[torch.Tensor | None] = [None, None]
            bufS: list[torch.Tensor | None] = [None, None]
            dummies = _dummies(X, A0.shape[2])
            gA_c: torch.Tensor | None = None  # w.r.t. the output of layer l (its carry)
            gS_c: torch.Tensor | None = None
            l = L - 1

            def layers(k: int) -> None:  # the next k layers, from the last one down
                nonlocal l, gA_c, gS_c
                for _ in range(k):
                    gAo = _accumulate(gA_c, gA_up[l])
                    gSo = _accumulate(gS_c, gS_up[l])
                    need_gA, need_gS = (l > 0 or need_A0), (l > 0 or need_S0)
                    if (gAo is None and gSo is None) or not (need_gA or need_gS or need_W or need_X):
                        gA_c = gS_c = None  # nothing flows into this layer: all its gradients are 0
                        l -= 1
                        continue
                    i = l % 2
                    if need_gA and bufA[i] is None:
                        bufA[i] = torch.empty_like(A0)
                    if need_gS and bufS[i] is None:
                        bufS[i] = torch.empty_like(S0)
                    gXl, gA_c, gS_c, _ = _layer_backward(
                        run, X, As[l], Ss[l], W3s[l], Pl[l], Gl[l], gAo, gSo, ctx.eps,
                        (need_X, need_gA, need_gS, need_W), gA=bufA[i], gS=bufS[i],
                        gW=gW3s[l] if need_W else None, dummies=dummies)
                    if need_X:
                        gX.add_(gXl)
                    l -= 1

            gov = run.governor(X, backward=True)
            if gov is None:
                layers(L)
            else:  # as in the forward, the layers are its iterations; the gradients do not change
                gov.run(layers, L)
        gA0 = gA_c if need_A0 else None
        gS0 = gS_c if need_S0 else None
        return gX, gA0, gS0, gWs, None, None, None, None


def _accumulate(carry: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor | None:
    """``carry + up`` with None as zero; ``carry`` is the unroll's own buffer, so it is added into."""
    if up is None:
        return carry
    if carry is None:
        return up
    return carry.add_(up)


@eager_under_compile
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
    every input that requires one; the backward computes only those. First
    derivatives only: a backward with ``create_graph=True`` (a Hessian, a
    gradient penalty) raises a RuntimeError; use
    :func:`fastmu.reference.mu_step_torch` for those.

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
    eps = check_eps(eps, X.dtype)
    if X.device.type not in ("cpu", "cuda"):
        raise ValueError(f"no fused learned-MU kernel for device {X.device}; use fastmu.reference.mu_step_torch")
    A_out, S_out, _, _ = LearnedMUStep.apply(
        X.contiguous(), A.contiguous(), S.contiguous(), W.contiguous(), float(eps), None, None, False
    )
    return A_out, S_out


@eager_under_compile
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

    Parameters
    ----------
    X, A, S, W : Tensor
        As in :func:`learned_mu_step`.
    eps : float, default :data:`fastmu.EPS`
    pg : (Tensor (b, m, n), Tensor (b, n, n)), optional
        ``(X Sᵀ, S Sᵀ)`` of this S, from the previous layer.
    want_pg : bool, default True
        Accumulate ``(X S'ᵀ, S' S'ᵀ)`` for the next layer during the S update.

    Returns
    -------
    A_new, S_new : Tensor
    pg_new : (Tensor, Tensor) or None
        None unless ``want_pg``.
    """
    P, G = (None, None) if pg is None else pg
    A_out, S_out, P_out, G_out = LearnedMUStep.apply(X, A, S, W, float(eps), P, G, bool(want_pg))
    return A_out, S_out, ((P_out, G_out) if want_pg else None)


def check_unroll_weights(Ws: Any, X: torch.Tensor, n: int, *, check_values: bool = True) -> None:
    """Validate the stacked layer weights of :func:`learned_mu_unroll`.

    Parameters
    ----------
    Ws : Tensor (L, m, n) or (L, b, m, n)
    X : Tensor (b, m, t)
        The layers' input (gives b, m, dtype and device).
    n : int
        Rank.
    check_values : bool, default True
        Also check that Ws is finite and non-negative (on a GPU, a synchronisation).

    Raises
    ------
    TypeError
        ``Ws`` not a tensor, X not float32/float64, or ``Ws`` not of X's dtype.
    ValueError
        Not ``(L, m, n)`` or ``(L, b, m, n)`` with ``L ≥ 1``, not on X's device,
        or (when ``check_values``) negative or non-finite.
    """
    if not isinstance(Ws, torch.Tensor):
        raise TypeError(f"Ws must be a torch.Tensor, got {type(Ws).__name__}")
    if X.dtype not in _FLOATS:  # before comparing Ws with it: the fault is X's, not Ws's
        raise TypeError(f"X has dtype {X.dtype}; the learned layers compute in float32 or float64: convert X "
                        f"(e.g. X.to({Ws.dtype if Ws.dtype in _FLOATS else torch.float32}))")
    b, m, _ = X.shape
    if Ws.dim() not in (3, 4) or Ws.shape[0] < 1 or tuple(Ws.shape[1:]) not in ((m, n), (b, m, n)):
        raise ValueError(
            f"Ws must be (L, m, n) = (L, {m}, {n}) (one W per layer, shared by the batch) or "
            f"(L, b, m, n) = (L, {b}, {m}, {n}) (per problem), with L ≥ 1; got {tuple(Ws.shape)}"
        )
    if Ws.dtype != X.dtype:
        raise TypeError(f"Ws has dtype {Ws.dtype} but X has {X.dtype}; they must share one dtype")
    if Ws.device != X.device:
        raise ValueError(f"Ws is on {Ws.device} but X is on {X.device}; they must be on the same device")
    if check_values:
        check_tensors_nonnegative_finite({"Ws": Ws})


@eager_under_compile
def learned_mu_unroll(
    X: torch.Tensor,
    A: torch.Tensor,
    S: torch.Tensor,
    Ws: torch.Tensor,
    eps: float = EPS,
    return_all: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """``L`` differentiable learned-MU layers in a row, as one autograd node.

    The same result as ``L`` calls of :func:`learned_mu_step` (layer ``l``
    with ``Ws[l]``), computed by the same kernels; the stack is one
    ``torch.autograd.Function`` whose backward runs the layers' handwritten
    backward kernels in reverse, which spares the per-layer autograd and
    allocation work (see :class:`LearnedMUUnroll`). The NALMU and ALMU models
    run their layers through it.

    Parameters
    ----------
    X : Tensor (b, m, t)
        Non-negative data.
    A : Tensor (b, m, n)
    S : Tensor (b, n, t)
        Starting factors (positive).
    Ws : Tensor (L, m, n) or (L, b, m, n)
        Non-negative layer weights: one W per layer shared by the batch
        (NALMU), or one per layer and problem (ALMU).
    eps : float
        ε of every denominator (:data:`fastmu.EPS`).
    return_all : bool
        Return every layer's ``(A_l, S_l)``, ``l = 1..L`` (for the
        layer-weighted loss), instead of the last.

    Returns
    -------
    (A_L, S_L), or a list of ``L`` such pairs.

    Raises
    ------
    TypeError, ValueError
        See :func:`check_layer_inputs` and :func:`check_unroll_weights`.
    RuntimeError
        In a backward with ``create_graph=True``: the handwritten backward
        gives first derivatives only (:func:`first_order_only`).

    Examples
    --------
    >>> import torch
    >>> from fastmu.nn import learned_mu_unroll
    >>> X = torch.rand(2, 8, 32, dtype=torch.float64)
    >>> A = torch.full((2, 8, 3), 0.5, dtype=torch.float64)
    >>> S = torch.full((2, 3, 32), 0.5, dtype=torch.float64)
    >>> Ws = torch.ones(10, 8, 3, dtype=torch.float64, requires_grad=True)
    >>> outs = learned_mu_unroll(X, A, S, Ws, return_all=True)
    >>> len(outs), outs[-1][0].shape
    (10, torch.Size([2, 8, 3]))
    >>> sum(A_l.sum() for A_l, _ in outs).backward()
    >>> Ws.grad.shape
    torch.Size([10, 8, 3])
    """
    if not isinstance(Ws, torch.Tensor):
        raise TypeError(f"Ws must be a torch.Tensor, got {type(Ws).__name__}")
    if Ws.dim() not in (3, 4) or Ws.shape[0] < 1:
        raise ValueError(f"Ws must be (L, m, n) or (L, b, m, n) with L ≥ 1, got shape {tuple(Ws.shape)}")
    if isinstance(X, torch.Tensor) and isinstance(A, torch.Tensor) and X.dim() == 3 and A.dim() == 3:
        check_unroll_weights(Ws, X, A.shape[2], check_values=False)  # first: Ws's own messages, not those for one W
    check_layer_inputs(X, A, S, Ws[0], check_w_values=False, check_data=False)  # types, dtypes, devices, shapes
    check_tensors_nonnegative_finite({"X": X, "A": A, "S": S, "Ws": Ws})  # one read on the host for all
    eps = check_eps(eps, X.dtype)
    if X.device.type not in ("cpu", "cuda"):
        raise ValueError(f"no fused learned-MU kernel for device {X.device}; use fastmu.reference.mu_step_torch")
    return unroll_unchecked(X.contiguous(), A.contiguous(), S.contiguous(), Ws.contiguous(), eps, return_all)


@eager_under_compile
def unroll_unchecked(
    X: torch.Tensor, A: torch.Tensor, S: torch.Tensor, Ws: torch.Tensor, eps: float = EPS, return_all: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`learned_mu_unroll` for the models: inputs contiguous and valid by construction,
    so the checks (which synchronise a GPU) are skipped."""
    keep = torch.is_grad_enabled() and any(v.requires_grad for v in (X, A, S, Ws))
    out = LearnedMUUnroll.apply(X, A, S, Ws, float(eps), bool(return_all), keep, _runner(X))
    if return_all:
        L = Ws.shape[0]
        return list(zip(out[:L], out[L:]))
    return out[0], out[1]
