"""DNMF and SNMF-Net: interface, untrained == the plain algorithm, gradients, ranges, learning, bad input.

The loss is evaluated with ``fused=False`` (torch ops, same value): the fused
cosine kernels would be JIT-compiled on first use, which alone takes longer
than this whole file is allowed to.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastmu import EPS
from fastmu.baselines import DNMF, SNMFNet
from fastmu.baselines.dnmf import ridge_nnls_step
from fastmu.baselines.snmf_net import lp_threshold
from fastmu.losses import layer_weights, unrolled_loss
from fastmu.nn.models import constant_init

M, N, T = 12, 3, 64
KINDS = {"dnmf": DNMF, "snmf_net": SNMFNet}


def _problems(b, seed, dtype=torch.float64):
    """Deterministic X = A S + noise, A per problem: three shifted, widened bumps (a shared structure)."""
    g = torch.Generator().manual_seed(seed)
    ch = torch.arange(M, dtype=torch.float64)
    centres = torch.tensor([2.0, 6.0, 9.5], dtype=torch.float64)
    widths = torch.tensor([2.5, 1.5, 1.0], dtype=torch.float64)
    c = centres + 0.6 * torch.randn(b, 1, N, generator=g, dtype=torch.float64)
    w = widths * (1 + 0.2 * torch.rand(b, 1, N, generator=g, dtype=torch.float64))
    A = torch.exp(-0.5 * ((ch[None, :, None] - c) / w) ** 2) + 0.02
    A = A / A.norm(dim=1, keepdim=True)
    S = torch.rand(b, N, T, generator=g, dtype=torch.float64) ** 3
    S = S / S.amax(dim=2, keepdim=True)
    X = A @ S + 0.01 * torch.rand(b, M, T, generator=g, dtype=torch.float64)
    return X.to(dtype), A.to(dtype), S.to(dtype)


def _A_init():
    """The mean spectra of a reference draw (strictly positive, distinct columns)."""
    return _problems(64, 99)[1].mean(0)


def _model(kind, dtype=torch.float64, **kw):
    kw.setdefault("n_layers", 10 if kind == "dnmf" else 9)
    return KINDS[kind](m=M, n=N, A_init=_A_init(), dtype=dtype, **kw)


def _loss(model, X, A, S):
    return unrolled_loss(model(X, return_all=True), A, S, fused=False)


# ---------------------------------------------------------------------------
# interface
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes_dtypes_and_return_all(kind, dtype):
    X, _, _ = _problems(3, 0, dtype)
    model = _model(kind, dtype, n_layers=4)
    with torch.no_grad():
        A, S = model(X)
        outs = model(X, return_all=True)
    assert A.shape == (3, M, N) and S.shape == (3, N, T)
    assert A.dtype == S.dtype == dtype
    assert len(outs) == 4
    for Al, Sl in outs:
        assert Al.shape == (3, M, N) and Sl.shape == (3, N, T)
        assert bool(torch.isfinite(Al).all() and torch.isfinite(Sl).all())
        assert bool((Al >= 0).all() and (Sl >= 0).all())
    torch.testing.assert_close(outs[-1][0], A, rtol=0, atol=0)
    torch.testing.assert_close(outs[-1][1], S, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_unbatched_input_gives_unbatched_output(kind):
    X, _, _ = _problems(2, 1)
    model = _model(kind, n_layers=3)
    with torch.no_grad():
        A, S = model(X)
        a, s = model(X[1])
        outs = model(X[1], return_all=True)
    assert a.shape == (M, N) and s.shape == (N, T)
    torch.testing.assert_close(a, A[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s, S[1], rtol=1e-12, atol=1e-14)
    assert len(outs) == 3 and all(Al.shape == (M, N) and Sl.shape == (N, T) for Al, Sl in outs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_scale_equivariant(kind):
    # model(c X) = (A, c S), like MU: the steps, thresholds and ridges are all relative
    X, _, _ = _problems(2, 2)
    model = _model(kind, n_layers=5)
    with torch.no_grad():
        A, S = model(X)
        A2, S2 = model(1e3 * X)
    torch.testing.assert_close(A2, A, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(S2, 1e3 * S, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", list(KINDS))
def test_default_dtype_parameters(kind):
    # A_init given in float64 must not make float64 parameters when dtype is not given
    model = KINDS[kind](n_layers=2, m=M, n=N, A_init=_A_init())
    assert all(prm.dtype == torch.get_default_dtype() for prm in model.parameters())
    assert all(buf.dtype == torch.get_default_dtype() for buf in model.buffers())
    A, S = model(_problems(1, 0, torch.get_default_dtype())[0])
    assert A.dtype == S.dtype == torch.get_default_dtype()


def test_lazy_export():
    import fastmu.baselines as fb

    assert fb.DNMF is DNMF and fb.SNMFNet is SNMFNet


# ---------------------------------------------------------------------------
# untrained models == the plain algorithms
# ---------------------------------------------------------------------------


def test_untrained_dnmf_is_mu_on_S_with_A_fixed():
    X, _, _ = _problems(3, 3)
    L = 10
    model = _model("dnmf", n_layers=L)
    with torch.no_grad():
        outs = model(X, return_all=True)
    A0 = _A_init()
    A0 = A0 / A0.norm(dim=0)
    _, S = constant_init(X, N)
    for l in range(L):
        S = S * (A0.T @ X) / ((A0.T @ A0) @ S + EPS)
        torch.testing.assert_close(outs[l][1], S, rtol=1e-10, atol=0)
        # the read-out: ridge least squares, written with an explicit inverse here
        G = S @ S.transpose(-1, -2)
        delta = 1e-6 * torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / N
        A_ls = X @ S.transpose(-1, -2) @ torch.linalg.inv(G + delta[:, None, None] * torch.eye(N, dtype=G.dtype))
        floor = torch.finfo(X.dtype).eps * A_ls.amax(dim=(1, 2), keepdim=True)
        torch.testing.assert_close(outs[l][0], torch.maximum(A_ls, floor), rtol=1e-8, atol=0)
    # the comparison above covers both branches of the read-out's floor; the last layer must mostly be
    # the plain least squares (whether a few entries are projected varies with the machine: all 108
    # were above the floor on an AMD EPYC, 100 of 108 on an Intel Xeon, both with torch 2.13.0)
    assert float((outs[-1][0] > floor).double().mean()) > 0.8


def test_ridge_nnls_step_projects_and_keeps_columns_nonzero():
    g = torch.Generator().manual_seed(4)
    S = torch.rand(2, 3, 40, generator=g, dtype=torch.float64)
    A_true = torch.rand(2, 7, 3, generator=g, dtype=torch.float64)
    A_true[0, :, 1] = -1.0  # a column the projection zeroes out
    X = A_true @ S
    A = ridge_nnls_step(X, S, ridge=0.0)
    torch.testing.assert_close(A[1], A_true[1], rtol=1e-9, atol=1e-12)
    assert bool((A > 0).all())
    assert float(A[0, :, 1].max()) <= 1e-15 * float(A[0].max())


def _tau_paper(p, theta):
    u = 2 * theta * (1 - p)
    return u ** (1 / (2 - p)) + p * theta * u ** ((p - 1) / (2 - p))


def test_untrained_snmf_net_is_the_plain_algorithm():
    X, _, _ = _problems(2, 5)
    L = 4
    model = _model("snmf_net", n_layers=L)
    with torch.no_grad():
        outs = model(X, return_all=True)
    A0 = _A_init()
    A0 = A0 / A0.norm(dim=0)  # the start of every problem, and every layer's B
    alpha = 1.0 / float(torch.linalg.eigvalsh(A0.T @ A0).max())
    theta, p = 0.01 * alpha, 0.5
    tau = _tau_paper(p, theta)
    G = A0.T @ A0
    S = torch.relu(torch.linalg.inv(G + 1e-6 * torch.trace(G) / N * torch.eye(N, dtype=G.dtype)) @ A0.T @ X)
    A = A0.expand(2, M, N)
    s = X.amax(dim=(1, 2), keepdim=True)
    for k in range(L):
        Z = (S - alpha * A0.T @ (A @ S - X)) / s
        P = torch.zeros_like(Z)  # the thresholding, the paper's way: masked assignment
        big = Z > tau
        P[big] = Z[big] - p * theta * Z[big] ** (p - 1)
        S = P * s
        St = S.transpose(-1, -2)
        A = torch.relu(A - (A @ S - X) @ St / torch.linalg.matrix_norm(S @ St)[:, None, None])
        torch.testing.assert_close(outs[k][1], S, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(outs[k][0], A, rtol=1e-10, atol=1e-13)
    assert 0.05 < float((outs[-1][1] == 0).double().mean()) < 0.9  # the thresholding does act


def test_lp_threshold_matches_the_paper_formula():
    x = torch.linspace(-0.5, 2.0, 501, dtype=torch.float64)
    for p in (0.1, 0.5, 0.9):
        for theta in (1e-3, 0.05, 0.3):
            tau = _tau_paper(p, theta)
            ref = torch.where(x > tau, x - p * theta * x.clamp_min(1e-300) ** (p - 1), torch.zeros_like(x))
            got = lp_threshold(x, p, theta)
            # the two forms of τ may differ in the last bit: skip a grid point on the jump itself
            off = (x - tau).abs() > 1e-12
            torch.testing.assert_close(got[off], ref[off], rtol=1e-12, atol=1e-15)
            assert bool((got >= 0).all())
    # p = 1 is soft thresholding at θ
    torch.testing.assert_close(lp_threshold(x, 1.0, 0.2), torch.relu(x - 0.2), rtol=1e-12, atol=1e-15)


def test_lp_threshold_gradients_finite_at_the_edges():
    x = torch.tensor([0.0, 1e-300, 1e-8, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    for rho in (-40.0, 0.0, 40.0):  # p = sigmoid(ρ): ~0, 0.5, exactly 1.0 in float64
        for log_theta in (-700.0, -5.0, 3.0):
            r = torch.tensor(rho, dtype=torch.float64, requires_grad=True)
            lt = torch.tensor(log_theta, dtype=torch.float64, requires_grad=True)
            y = lp_threshold(x, torch.sigmoid(r), torch.exp(lt))
            grads = torch.autograd.grad(y.sum(), (x, r, lt))
            assert bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(gr).all()) for gr in grads)


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


def _layer_slices(kind, model):
    if kind == "dnmf":
        return {"theta_U": model.theta_U, "theta_V": model.theta_V}
    return {"B": model.B, "log_alpha": model.log_alpha, "log_beta": model.log_beta, "rho": model.rho,
            "log_theta": model.log_theta}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_reach_every_parameter(kind, dtype):
    X, A, S = _problems(4, 6, dtype)
    model = _model(kind, dtype, n_layers=5)
    _loss(model, X, A, S).backward()
    for name, prm in model.named_parameters():
        assert prm.grad is not None, name
        assert bool(torch.isfinite(prm.grad).all()), name
        assert bool((prm.grad != 0).any()), name
    for name, prm in _layer_slices(kind, model).items():  # every layer's own slice, not just the tensor
        per_layer = prm.grad.reshape(prm.shape[0], -1).abs().amax(dim=1)
        assert bool((per_layer > 0).all()), (name, per_layer)


def _in_range(kind, model):
    if kind == "dnmf":
        A_ref = model.reference_spectra()
        U, V = model.layer_matrices()
        assert bool((A_ref > 0).all() and (U > 0).all() and (V > 0).all())
        assert bool(torch.isfinite(U).all() and torch.isfinite(V).all())
        torch.testing.assert_close(A_ref.norm(dim=0), torch.ones(N, dtype=A_ref.dtype))
    else:
        prm = model.layer_parameters()
        assert all(bool(torch.isfinite(v).all()) for v in prm.values())
        assert bool((prm["alpha"] > 0).all() and (prm["beta"] > 0).all() and (prm["theta"] >= 0).all())
        assert bool((prm["p"] > 0).all() and (prm["p"] <= 1).all())
        assert bool(torch.isfinite(model.B).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(KINDS))
def test_parameters_stay_in_range_with_a_large_learning_rate(kind, dtype):
    X, A, S = _problems(8, 7, dtype)
    model = _model(kind, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1.0)  # ~100x a usual rate: every parameter moves a lot
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(6):
        loss = _loss(model, X, A, S)
        assert bool(torch.isfinite(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
        _in_range(kind, model)
    assert all(float((v.detach() - start[k]).abs().max()) > 1.0 for k, v in model.named_parameters())
    with torch.no_grad():
        Ao, So = model(X)
    assert bool(torch.isfinite(Ao).all() and torch.isfinite(So).all())
    assert bool((Ao >= 0).all() and (So >= 0).all())


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_lowers_the_held_out_loss(kind):
    torch.manual_seed(0)
    X, A, S = _problems(32, 10)
    Xv, Av, Sv = _problems(32, 11)  # held-out problems (other spectra, other maps)
    model = _model(kind)
    best = -2.0 * float(layer_weights(model.n_layers).sum())  # every cosine equal to 1
    with torch.no_grad():
        before = float(_loss(model, Xv, Av, Sv))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):
        loss = _loss(model, X, A, S)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(_loss(model, Xv, Av, Sv))
    # The untrained models are already fair here (mean cosine ≈ 0.99), so ask
    # for at least half of the remaining gap to the optimum to close (it is ~80%).
    assert after - best < 0.5 * (before - best), (before, after, best)


def test_save_and_load_roundtrip(tmp_path):
    from fastmu.training import build_model, load_model, save_model

    X, _, _ = _problems(2, 12, torch.float32)
    for kind in KINDS:
        model = build_model(kind, n_layers=3, m=M, n=N, A_init=_A_init().numpy(), dtype=torch.float32)
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(0.01 * torch.randn_like(prm))
            ref = model(X)
        loaded, _ = load_model(save_model(model, tmp_path / f"{kind}.pt"))
        with torch.no_grad():
            got = loaded(X)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_raises(kind):
    cls = KINDS[kind]
    model = _model(kind, n_layers=2)
    X, _, _ = _problems(2, 13)
    with pytest.raises(ValueError, match="channels"):
        model(X[:, :-1])
    with pytest.raises(ValueError, match="non-negative"):
        model(X - 1.0)
    with pytest.raises(ValueError, match="NaN"):
        model(torch.where(X > 0.5, torch.nan, X))
    with pytest.raises(ValueError, match="shape"):
        model(X[None])
    with pytest.raises(TypeError, match="dtype"):
        model(X.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(X.numpy())
    good = _A_init().numpy()
    with pytest.raises(ValueError, match="needs A_init"):
        cls(m=M, n=N)
    with pytest.raises(ValueError, match=r"shape \(m, n\)"):
        cls(m=M, n=N, A_init=good[:, :2])
    with pytest.raises(ValueError, match=r"shape \(m, n\)"):
        cls(m=M + 1, n=N, A_init=good)
    with pytest.raises(ValueError, match="non-negative"):
        cls(m=M, n=N, A_init=good - 0.5)
    with pytest.raises(ValueError, match="NaN"):
        cls(m=M, n=N, A_init=np.where(good > 0.3, np.nan, good))
    zero = good.copy()
    zero[:, 1] = 0
    with pytest.raises(ValueError, match="all-zero"):
        cls(m=M, n=N, A_init=zero)
    parallel = good.copy()
    parallel[:, 2] = 3 * parallel[:, 0]
    with pytest.raises(ValueError, match="parallel"):
        cls(m=M, n=N, A_init=parallel)
    with pytest.raises(TypeError, match="numeric"):
        cls(m=M, n=N, A_init="spectra")
    with pytest.raises(ValueError, match="n_layers"):
        cls(n_layers=0, m=M, n=N, A_init=good)


def test_dnmf_accepts_zeros_in_A_init():
    # mean Fe-line spectra are exactly 0 far from the line: raised to a small floor for the log
    A0 = _A_init().clone()
    A0[-3:, 0] = 0.0
    model = DNMF(n_layers=3, m=M, n=N, A_init=A0, dtype=torch.float64)
    A_ref = model.reference_spectra().detach()
    assert bool((A_ref > 0).all())
    assert math.isclose(float(A_ref[-1, 0] / A_ref[:, 0].max()), 1e-6, rel_tol=1e-9)
    with torch.no_grad():
        A, S = model(_problems(2, 14)[0])
    assert bool(torch.isfinite(A).all() and torch.isfinite(S).all())


@pytest.mark.parametrize("kind", list(KINDS))
def test_arguments_checked_at_construction(kind):
    cls, good = KINDS[kind], _A_init()
    model = cls(n_layers=np.int64(2), m=np.int32(M), n=N, A_init=good)  # NumPy integers are integers
    assert (model.n_layers, model.m) == (2, M) and type(model.n_layers) is int
    for bad in (2.0, True):
        with pytest.raises(ValueError, match="n_layers must be a positive integer"):
            cls(n_layers=bad, m=M, n=N, A_init=good)
    for dtype in (torch.int64, torch.float16):
        with pytest.raises(TypeError, match="float32 or float64"):
            cls(n_layers=2, m=M, n=N, A_init=good, dtype=dtype)
    with pytest.raises(ValueError, match="device must be a torch device"):
        cls(n_layers=2, m=M, n=N, A_init=good, device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            cls(n_layers=2, m=M, n=N, A_init=good, device="cuda")


def test_dnmf_eps_must_be_positive():
    # with eps = 0 a zero pixel gave 0/0 = NaN
    for eps in (0.0, -1e-12, float("nan")):
        with pytest.raises(ValueError, match="eps must be finite and > 0"):
            _model("dnmf", n_layers=2, eps=eps)
    X = _problems(2, 15)[0]
    X[:, :, 0] = 0.0
    A, S = _model("dnmf", n_layers=2)(X)
    assert bool(torch.isfinite(A).all() and torch.isfinite(S).all())


@pytest.mark.parametrize("kind", list(KINDS))
def test_non_finite_output_raises(kind):
    model = _model(kind, dtype=torch.float32, n_layers=2)
    X = _problems(2, 16, torch.float32)[0] * 1e20
    with pytest.raises(FloatingPointError, match="too large for float32.*mean"):
        model(X)
    with pytest.raises(FloatingPointError, match="too large for float32"):
        model(X, return_all=True)
    first = next(model.named_parameters())
    with torch.no_grad():
        first[1].view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"parameter.*{first[0]}"):
        model(X / 1e20)
