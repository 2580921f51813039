"""The stacked learned-MU layers as one autograd node (``learned_mu_unroll``), on CPU.

The same kernels as the per-layer Function run inside; what is new is the
bookkeeping: P/G handed from layer to layer, the layers' factors saved for
the backward, upstream gradients on any subset of the layers' outputs added
to the carried ones, and the two gradient buffers reused in turn. The CUDA
runner of the same Function is checked in the simulator (test_nn_cudasim.py).
"""
from __future__ import annotations

import pytest
import torch

from fastmu.nn import learned_mu_step, learned_mu_unroll
from fastmu.nn.functional import LearnedMUUnroll
from fastmu.reference import mu_step_torch
from helpers import learned_layer_inputs


def _stack(L, per_problem, dtype=torch.float64, shape=(3, 7, 3, 50), seed=0):
    X, A, S, W = learned_layer_inputs(*shape, dtype=dtype, per_problem=per_problem, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    Ws = torch.rand((L, *W.shape), generator=g, dtype=dtype) + 0.5
    return X, A, S, Ws


def _chain(X, A, S, Ws, step):
    outs = []
    for W in Ws.unbind(0):
        A, S = step(X, A, S, W)
        outs.append((A, S))
    return outs


@pytest.mark.parametrize("per_problem", [False, True])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_every_layer_matches_the_reference(per_problem, dtype, rtol):
    X, A, S, Ws = _stack(5, per_problem, dtype)
    outs = learned_mu_unroll(X, A, S, Ws, return_all=True)
    ref = _chain(X.double(), A.double(), S.double(), Ws.double(), mu_step_torch)
    assert len(outs) == 5
    for (A1, S1), (rA, rS) in zip(outs, ref):
        assert A1.dtype == dtype and S1.dtype == dtype
        torch.testing.assert_close(A1.double(), rA, rtol=rtol, atol=0)
        torch.testing.assert_close(S1.double(), rS, rtol=rtol, atol=0)
    A_last, S_last = learned_mu_unroll(X, A, S, Ws)
    assert torch.equal(A_last, outs[-1][0]) and torch.equal(S_last, outs[-1][1])


@pytest.mark.parametrize("per_problem", [False, True])
@pytest.mark.parametrize("return_all", [False, True])
def test_gradcheck_all_inputs(per_problem, return_all):
    X, A, S, Ws = _stack(3, per_problem, shape=(2, 5, 3, 37), seed=1)
    ins = [v.requires_grad_(True) for v in (X, A, S, Ws)]

    def f(X, A, S, Ws):
        out = learned_mu_unroll(X, A, S, Ws, return_all=return_all)
        return [v for pair in out for v in pair] if return_all else out

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7, rtol=1e-5)


# which layers' outputs carry an upstream gradient: all, the last only, a middle one only,
# A's only (no gS' anywhere: the backward's first pass over X is skipped), S of layer 0 only
@pytest.mark.parametrize("upstream", ["all", "last", "middle", "A_only", "first_S"])
@pytest.mark.parametrize("wanted", [("W",), ("X", "A", "S", "W"), ("A",), ("S", "X")])
def test_gradients_match_chained_layers(upstream, wanted):
    """Gradients w.r.t. any subset of X, A, S, Ws equal those of L chained per-layer Functions."""
    L = 4
    X, A, S, Ws = _stack(L, per_problem=False, seed=2)
    g = torch.Generator().manual_seed(5)
    cA = [torch.randn(A.shape, generator=g, dtype=A.dtype) for _ in range(L)]
    cS = [torch.randn(S.shape, generator=g, dtype=S.dtype) for _ in range(L)]
    on = {
        "all": [(l, "AS") for l in range(L)], "last": [(L - 1, "AS")], "middle": [(1, "AS")],
        "A_only": [(l, "A") for l in range(L)], "first_S": [(0, "S")],
    }[upstream]
    grads = []
    for run in ("unroll", "chain"):
        ins = [v.clone().requires_grad_(name in wanted) for v, name in zip((X, A, S, Ws), "XASW")]
        if run == "unroll":
            outs = learned_mu_unroll(*ins, return_all=True)
        else:
            outs = _chain(*ins, learned_mu_step)
        loss = sum((outs[l][0] * cA[l]).sum() * ("A" in which) + (outs[l][1] * cS[l]).sum() * ("S" in which)
                   for l, which in on)
        wrt = [v for v in ins if v.requires_grad]
        grads.append(torch.autograd.grad(loss, wrt, allow_unused=True))
    for mine, ref in zip(*grads):
        if ref is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, ref, rtol=1e-11, atol=1e-13 * float(ref.abs().max()))


def test_no_graph_without_grad_and_same_values():
    X, A, S, Ws = _stack(3, per_problem=False)
    Ws.requires_grad_(True)
    with torch.no_grad():
        A0, S0 = learned_mu_unroll(X, A, S, Ws)
    assert A0.grad_fn is None and not A0.requires_grad
    A1, S1 = learned_mu_unroll(X, A, S, Ws)
    assert A1.grad_fn is not None
    assert torch.equal(A0, A1) and torch.equal(S0, S1)


def test_inplace_change_of_an_output_is_caught():
    """The layers' outputs are saved for the backward: changing one in place must raise, not
    silently give wrong gradients. The last layer's outputs are not saved: they may be changed."""
    X, A, S, Ws = _stack(3, per_problem=False)
    Ws.requires_grad_(True)
    outs = learned_mu_unroll(X, A, S, Ws, return_all=True)
    with pytest.raises(RuntimeError, match="modified inplace"):
        outs[0][1].mul_(2.0)
    outs[0][1].detach().mul_(2.0)  # around autograd's view check: the saved tensor's version catches it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        outs[-1][0].sum().backward()
    A3, S3 = learned_mu_unroll(X, A, S, Ws)
    A3.mul_(2.0)
    (A3.sum() + S3.sum()).backward()
    assert torch.isfinite(Ws.grad).all()


def test_outputs_do_not_depend_on_keeping_them():
    """With and without grad, returned or not, the layers' outputs are the same: the kept
    stack and the inference ping-pong buffers run the same kernels on the same inputs."""
    X, A, S, Ws = _stack(4, per_problem=True)
    with torch.no_grad():
        last = learned_mu_unroll(X, A, S, Ws)
        every = learned_mu_unroll(X, A, S, Ws, return_all=True)
    kept = learned_mu_unroll(X, A, S, Ws.clone().requires_grad_(True), return_all=True)
    for (a, s), (a2, s2) in zip(every, kept):
        assert torch.equal(a, a2) and torch.equal(s, s2)
    assert torch.equal(last[0], every[-1][0]) and torch.equal(last[1], every[-1][1])
    # earlier layers' outputs stay intact after later layers ran (no buffer reused under them)
    chained = (A, S)
    for l in range(Ws.shape[0]):
        chained = learned_mu_step(X, *chained, Ws[l])
        assert torch.equal(chained[0], every[l][0]) and torch.equal(chained[1], every[l][1])


def test_single_layer_equals_learned_mu_step():
    X, A, S, Ws = _stack(1, per_problem=True)
    A1, S1 = learned_mu_unroll(X, A, S, Ws)
    A2, S2 = learned_mu_step(X, A, S, Ws[0])
    assert torch.equal(A1, A2) and torch.equal(S1, S2)


def test_bad_weights():
    X, A, S, Ws = _stack(3, per_problem=False)
    b, m, t = X.shape
    n = A.shape[2]
    with pytest.raises(TypeError, match="torch.Tensor"):
        learned_mu_unroll(X, A, S, Ws.numpy())
    for bad in (Ws[0], Ws[:0], torch.ones(3, m + 1, n, dtype=X.dtype), torch.ones(3, b + 1, m, n, dtype=X.dtype),
                torch.ones(3, 1, 1, m, n, dtype=X.dtype)):
        with pytest.raises(ValueError, match="Ws must be"):
            learned_mu_unroll(X, A, S, bad)
    neg = Ws.clone()
    neg[1, 0, 0] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        learned_mu_unroll(X, A, S, neg)
    nan = Ws.clone()
    nan[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        learned_mu_unroll(X, A, S, nan)
    with pytest.raises(TypeError, match="dtype"):
        learned_mu_unroll(X, A, S, Ws.float())
    with pytest.raises(ValueError, match="same device"):
        learned_mu_unroll(X, A, S, Ws.to("meta"))
    with pytest.raises(ValueError, match="same device"):
        learned_mu_unroll(X, A.to("meta"), S, Ws)
    with pytest.raises(ValueError, match="S must have shape"):
        learned_mu_unroll(X, A, S[:, :, :10], Ws)


def test_direct_function_without_keep_saves_nothing():
    """keep=False (a no-grad call) drops the layers' factors as the loop goes."""
    from fastmu.nn.functional import _CpuLayers

    X, A, S, Ws = _stack(4, per_problem=False)
    A1, S1 = LearnedMUUnroll.apply(X, A, S, Ws, 1e-12, False, False, _CpuLayers())
    ref = _chain(X, A, S, Ws, mu_step_torch)[-1]
    torch.testing.assert_close(A1, ref[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(S1, ref[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("stack", [True, False])
def test_second_derivative_is_refused(stack):
    """The backward kernels are not themselves differentiable: asking for a second derivative
    raises instead of returning a silently wrong one."""
    X, A, S, Ws = _stack(2, per_problem=False)
    Ws.requires_grad_(True)
    A1, _ = learned_mu_unroll(X, A, S, Ws) if stack else learned_mu_step(X, A, S, Ws[0])
    # it raises when the graph of the first derivative is asked for (create_graph=True), which
    # otherwise came back without one: a silently zero second derivative
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        (g,) = torch.autograd.grad(A1.square().sum(), Ws, create_graph=True)
        g.sum().backward()
