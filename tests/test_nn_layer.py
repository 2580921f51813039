"""The fused learned-MU layer: forward agreement, gradcheck, needs_input_grad, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmu.nn import learned_mu_step, learned_mu_unroll
from fastmu.nn.functional import LearnedMUStep, learned_mu_step_pg
from fastmu.reference import mu_step_torch
from helpers import learned_layer_inputs, record_calls


_inputs = learned_layer_inputs


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("per_problem", [False, True])
@pytest.mark.parametrize("shape", [(3, 13, 5, 300), (2, 65, 4, 600), (1, 7, 1, 1)])
def test_forward_matches_reference(dtype, rtol, per_problem, shape):
    X, A, S, W = _inputs(*shape, dtype=dtype, per_problem=per_problem)
    A1, S1 = learned_mu_step(X, A, S, W)
    rA, rS = mu_step_torch(X.double(), A.double(), S.double(), W.double())
    assert A1.dtype == dtype and S1.dtype == dtype
    torch.testing.assert_close(A1.double(), rA, rtol=rtol, atol=0)
    torch.testing.assert_close(S1.double(), rS, rtol=rtol, atol=0)
    # inputs untouched (the kernel writes fresh outputs)
    X2, A2, S2, W2 = _inputs(*shape, dtype=dtype, per_problem=per_problem)
    assert torch.equal(A, A2) and torch.equal(S, S2) and torch.equal(X, X2) and torch.equal(W, W2)


@pytest.mark.parametrize("per_problem", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 3, 37), (2, 9, 4, 300)])  # t > one 256-pixel block
def test_gradcheck_all_inputs(per_problem, shape):
    X, A, S, W = _inputs(*shape, per_problem=per_problem)
    for v in (X, A, S, W):
        v.requires_grad_(True)
    assert torch.autograd.gradcheck(learned_mu_step, (X, A, S, W), eps=1e-6, atol=1e-7, rtol=1e-5)


def _grads_match_reference(X, A, S, W):
    g = torch.Generator().manual_seed(7)
    gA = torch.randn(A.shape, generator=g, dtype=A.dtype)
    gS = torch.randn(S.shape, generator=g, dtype=S.dtype)
    grads = []
    for f in (learned_mu_step, mu_step_torch):
        ins = [v.clone().requires_grad_(True) for v in (X, A, S, W)]
        A1, S1 = f(*ins)
        ((A1 * gA).sum() + (S1 * gS).sum()).backward()
        grads.append([v.grad for v in ins])
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("per_problem", [False, True])
def test_gradients_match_autograd_reference(per_problem):
    """Same gradients as autograd through the pure-torch reference, for a random upstream."""
    _grads_match_reference(*_inputs(3, 65, 4, 700, per_problem=per_problem, seed=3))


@pytest.mark.parametrize("per_problem", [False, True])
@pytest.mark.parametrize("schedule", ["problem_major", "block_parallel"])
def test_each_backward_schedule_matches_autograd(monkeypatch, schedule, per_problem):
    """Both compiled schedules of the CPU backward on any thread count: the batch sized to the
    threads (kernels.cpu_backward.layer_backward's rule), a spy checks which one ran."""
    import numba

    from fastmu.kernels import cpu_backward

    nt = numba.config.NUMBA_NUM_THREADS
    if schedule == "block_parallel" and nt < 2:
        pytest.skip("with one thread every batch runs problem-major")
    calls = record_calls(monkeypatch, cpu_backward, "_backward_problem_major", "_backward_block_parallel")
    b = 2 * nt if schedule == "problem_major" else nt + 1
    _grads_match_reference(*_inputs(b, 9, 3, 300, per_problem=per_problem, seed=5))
    assert calls == [f"_backward_{schedule}"]


@pytest.mark.parametrize(
    "wanted",
    [("W",), ("A",), ("S",), ("X",), ("A", "W"), ("S", "X"), ("X", "A", "S", "W")],
)
@pytest.mark.parametrize("upstream", ["both", "A_only", "S_only"])
def test_needs_input_grad_subsets(wanted, upstream):
    """Only the requested gradients are produced, and they equal the reference ones."""
    X, A, S, W = _inputs(2, 9, 3, 270, seed=5)
    res = {}
    for f in (learned_mu_step, mu_step_torch):
        ins = dict(X=X.clone(), A=A.clone(), S=S.clone(), W=W.clone())
        for k in wanted:
            ins[k].requires_grad_(True)
        A1, S1 = f(ins["X"], ins["A"], ins["S"], ins["W"])
        loss = 0
        if upstream in ("both", "A_only"):
            loss = loss + (A1 ** 2).sum()
        if upstream in ("both", "S_only"):
            loss = loss + (S1.sin()).sum()
        loss.backward()
        res[f] = ins
    for k in "XASW":
        mine, ref = res[learned_mu_step][k].grad, res[mu_step_torch][k].grad
        if k in wanted:
            torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-13)
        else:
            assert mine is None


def test_float32_gradients_close_to_float64():
    X, A, S, W = _inputs(2, 65, 4, 600, seed=11)
    grads = {}
    for dt in (torch.float32, torch.float64):
        ins = [v.to(dt).requires_grad_(True) for v in (X, A, S, W)]
        A1, S1 = learned_mu_step(*ins)
        (A1.sum() + (S1 * S1).sum()).backward()
        grads[dt] = [v.grad.double() for v in ins]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        torch.testing.assert_close(g32, g64, rtol=1e-3, atol=1e-4 * float(g64.abs().max()))


def test_deterministic():
    X, A, S, W = _inputs(3, 65, 4, 1000, dtype=torch.float32, seed=2)
    outs = []
    for _ in range(2):
        W1 = W.clone().requires_grad_(True)
        S0 = S.clone().requires_grad_(True)
        A1, S1 = learned_mu_step(X, A, S0, W1)
        (A1.sum() + S1.square().sum()).backward()
        outs.append((A1, S1, W1.grad, S0.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_chained_pg_matches_unchained():
    """Handing P, G on between layers (the models' path) changes nothing."""
    X, A, S, W = _inputs(2, 11, 3, 400, seed=9)
    Ws = [(W * (1 + 0.1 * k)).requires_grad_(True) for k in range(3)]
    res = []
    for chained in (True, False):
        a, s, pg = A, S, None
        for k, w in enumerate(Ws):
            if chained:
                a, s, pg = learned_mu_step_pg(X, a, s, w, pg=pg, want_pg=k < 2)
            else:
                a, s = learned_mu_step(X, a, s, w)
        (a.sum() + s.sum()).backward()
        res.append((a.detach(), s.detach(), [w.grad.clone() for w in Ws]))
        for w in Ws:
            w.grad = None
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-13, atol=0)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-13, atol=0)
    for g1, g2 in zip(res[0][2], res[1][2]):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=0)


def test_chained_pg_values():
    X, A, S, W = _inputs(2, 11, 3, 300, seed=4)
    _, S1, (P, G) = learned_mu_step_pg(X, A, S, W, want_pg=True)
    torch.testing.assert_close(P, X @ S1.transpose(1, 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(G, S1 @ S1.transpose(1, 2), rtol=1e-12, atol=0)
    assert not P.requires_grad


def test_non_contiguous_inputs():
    X, A, S, W = _inputs(2, 6, 3, 50, seed=1)
    Xt = X.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    Wt = W.t().contiguous().t()
    A1, S1 = learned_mu_step(Xt, A, S, Wt)
    rA, rS = mu_step_torch(X, A, S, W)
    torch.testing.assert_close(A1, rA)
    torch.testing.assert_close(S1, rS)


# --------------------------------------------------------------------------- bad input


def test_bad_w_shape():
    X, A, S, W = _inputs(2, 6, 3, 20)
    with pytest.raises(ValueError, match="W must have shape"):
        learned_mu_step(X, A, S, W.t())
    with pytest.raises(ValueError, match="W must have shape"):
        learned_mu_step(X, A, S, torch.ones(3, 6, 3, dtype=X.dtype))
    with pytest.raises(ValueError, match="W must have shape"):
        learned_mu_step(X, A, S, torch.ones(6, dtype=X.dtype))


def test_negative_or_nan_w():
    X, A, S, W = _inputs(2, 6, 3, 20)
    W = W.clone()
    W[1, 2] = -0.5
    with pytest.raises(ValueError, match="non-negative.*-0.5"):
        learned_mu_step(X, A, S, W)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        learned_mu_step(X, A, S, W)


@pytest.mark.parametrize("which", ["X", "A", "S"])
def test_negative_or_nan_data_or_factors(which):
    X, A, S, W = _inputs(2, 6, 3, 20)
    args = dict(X=X.clone(), A=A.clone(), S=S.clone())
    args[which][1, 2, 0] = -0.25
    with pytest.raises(ValueError, match=f"{which} must be non-negative.*-0.25"):
        learned_mu_step(args["X"], args["A"], args["S"], W)
    args[which][1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match=f"{which} contains NaN or infinite"):
        learned_mu_step(args["X"], args["A"], args["S"], W)
    with pytest.raises(ValueError, match=f"{which} contains NaN"):
        learned_mu_unroll(args["X"], args["A"], args["S"], W.expand(3, -1, -1))


@pytest.mark.parametrize("eps", [0.0, -1e-12, float("nan"), float("inf")])
def test_bad_eps(eps):
    X, A, S, W = _inputs(2, 6, 3, 20)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        learned_mu_step(X, A, S, W, eps=eps)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        learned_mu_unroll(X, A, S, W.expand(2, -1, -1), eps=eps)


def test_mixed_dtypes():
    X, A, S, W = _inputs(2, 6, 3, 20)
    with pytest.raises(TypeError, match="share one dtype"):
        learned_mu_step(X, A.float(), S, W)
    with pytest.raises(TypeError, match="float32 or float64"):
        learned_mu_step(X.half(), A.half(), S.half(), W.half())
    with pytest.raises(TypeError, match="torch.Tensor"):
        learned_mu_step(X.numpy(), A, S, W)


def test_mixed_devices():
    X, A, S, W = _inputs(2, 6, 3, 20)
    with pytest.raises(ValueError, match="same device"):
        learned_mu_step(X, A.to("meta"), S, W)


def test_wrong_ndim_and_shapes():
    X, A, S, W = _inputs(2, 6, 3, 20)
    with pytest.raises(ValueError, match="3-D"):
        learned_mu_step(X[0], A[0], S[0], W)
    with pytest.raises(ValueError, match="S must have shape"):
        learned_mu_step(X, A, S[:, :, :10], W)
    with pytest.raises(ValueError, match="A must have shape"):
        learned_mu_step(X, A[:1], S, W)


def test_direct_function_returns_empty_pg_when_not_wanted():
    X, A, S, W = _inputs(1, 4, 2, 10)
    A1, S1, P, G = LearnedMUStep.apply(X, A, S, W, 1e-12, None, None, False)
    assert P.numel() == 0 and G.numel() == 0
    np.testing.assert_allclose(A1.numpy(), mu_step_torch(X, A, S, W)[0].numpy(), rtol=1e-12)
