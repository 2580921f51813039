"""NALMU / ALMU: untrained == MU, fused == plain autograd, shapes, freezing, bad input, learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmu
from fastmu.losses import unrolled_loss
from fastmu.nn import ALMU, NALMU, constant_init
from fastmu.reference import mu_step_torch


def _data(b=3, m=12, t=80, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, m, t, generator=g, dtype=dtype) * 3.0


def _mu_reference(X, n, L):
    A, S = constant_init(X, n)
    for _ in range(L):
        A, S = mu_step_torch(X, A, S, None)
    return A, S


@pytest.mark.parametrize("fused", [True, False])
def test_untrained_nalmu_is_mu(fused):
    X = _data()
    model = NALMU(n_layers=7, m=12, n=3, fused=fused, dtype=torch.float64)
    A, S = model(X)
    rA, rS = _mu_reference(X, 3, 7)
    torch.testing.assert_close(A, rA, rtol=1e-12, atol=0)
    torch.testing.assert_close(S, rS, rtol=1e-12, atol=0)


def test_untrained_nalmu_matches_fastmu_mu_constant_init():
    X = _data(b=2, m=10, t=64, seed=1)
    model = NALMU(n_layers=9, m=10, n=3, dtype=torch.float64)
    with torch.no_grad():
        A, S = model(X)
    mA, mS = fastmu.mu(X, 3, n_iter=9, init="constant", tol=None, backend="cpu")
    torch.testing.assert_close(A, torch.as_tensor(mA), rtol=1e-10, atol=0)
    torch.testing.assert_close(S, torch.as_tensor(mS), rtol=1e-10, atol=0)


def test_w_parametrisation_positive_and_exact_one():
    model = NALMU(n_layers=3, m=4, n=2)
    assert torch.equal(model.weights(), torch.ones(3, 4, 2))
    with torch.no_grad():
        model.theta.fill_(-200.0)
    assert bool((model.weights() >= 0).all())


@pytest.mark.parametrize("per_layer", [False, True])
def test_fused_nalmu_matches_plain_autograd(per_layer):
    X = _data(b=2, m=9, t=300, seed=2)
    g = torch.Generator().manual_seed(0)
    theta = 0.2 * torch.randn(6, 9, 3, generator=g, dtype=torch.float64)
    A_true = torch.rand(2, 9, 3, generator=g, dtype=torch.float64)
    S_true = torch.rand(2, 3, 300, generator=g, dtype=torch.float64)
    res = []
    for fused in (True, False):
        model = NALMU(6, 9, 3, fused=fused, dtype=torch.float64)
        with torch.no_grad():
            model.theta.copy_(theta)
        outs = model(X, return_all=True)
        assert len(outs) == 6
        loss = unrolled_loss(outs if per_layer else outs[-1], A_true, S_true)
        loss.backward()
        res.append((loss.detach(), outs[-1][0].detach(), model.theta.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_nalmu_float32_and_unbatched_input():
    model = NALMU(4, 8, 2)
    X = torch.rand(8, 50)
    A, S = model(X)
    assert A.shape == (8, 2) and S.shape == (2, 50) and A.dtype == torch.float32
    outs = model(X, return_all=True)
    assert len(outs) == 4 and outs[-1][1].shape == (2, 50)
    torch.testing.assert_close(outs[-1][0], A)


def test_model_bad_input():
    model = NALMU(2, 8, 2)
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(2, 7, 30))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.rand(2, 8, 30, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(np.random.rand(2, 8, 30))
    with pytest.raises(ValueError, match="shape"):
        model(torch.rand(1, 2, 8, 30))
    with pytest.raises(ValueError, match="positive integer"):
        NALMU(0, 8, 2)


@pytest.mark.parametrize("Model", [NALMU, ALMU])
def test_model_refuses_data_it_would_turn_into_nan_or_negative_factors(Model):
    # unchecked, NaN X gave all-NaN factors and negative X negative ones
    model = Model(2, 2, 8, 2) if Model is ALMU else Model(2, 8, 2)
    X = torch.rand(2, 8, 30)
    for bad, match in ((float("nan"), "NaN"), (float("inf"), "infinite"), (-0.5, r"non-negative.*-0.5 .*clamp_min\(0\)")):
        Xb = X.clone()
        Xb[1, 3, 7] = bad
        with pytest.raises(ValueError, match=match):
            model(Xb)
    for shape in ((0, 8, 30), (2, 8, 0)):
        with pytest.raises(ValueError, match="at least one problem and one pixel"):
            model(torch.rand(*shape))


@pytest.mark.parametrize("Model", [NALMU, ALMU])
def test_input_check_can_be_turned_off_for_checked_data(Model, monkeypatch):
    import fastmu.nn.models as models

    model = Model(2, 2, 8, 2) if Model is ALMU else Model(2, 8, 2)
    X = torch.rand(2, 8, 30)
    calls = []
    monkeypatch.setattr(models, "check_tensors_nonnegative_finite", lambda *a, **k: calls.append(a))
    model(X)
    assert len(calls) == 1
    model.check_input = False
    out = model(X)
    assert len(calls) == 1  # no pass over X, no read on the host
    built = Model(2, 2, 8, 2, check_input=False) if Model is ALMU else Model(2, 8, 2, check_input=False)
    built(X)
    assert len(calls) == 1
    torch.testing.assert_close(out, model(X))


def test_half_precision_is_refused_only_where_the_fused_kernels_run():
    NALMU(2, 8, 2, dtype=torch.float16, device="meta")  # other devices run torch ops whatever fused says
    with pytest.raises(TypeError, match="float32 or float64"):
        NALMU(2, 8, 2, dtype=torch.float16, device="cpu")


def test_model_arguments_checked_at_construction():
    with pytest.raises(TypeError, match="float32 or float64.*fused=False"):
        NALMU(2, 8, 2, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32 or float64"):
        ALMU(2, 2, 8, 2, dtype=torch.bfloat16)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            NALMU(2, 8, 2, eps=eps)
    with pytest.raises(ValueError, match="in_features=5.*m·n = 16"):
        ALMU(2, 2, 8, 2, in_features=5)
    model = NALMU(np.int64(2), np.int64(8), np.int32(2))  # NumPy integers are integers
    assert (model.n_layers, model.m, model.n) == (2, 8, 2) and type(model.m) is int


def test_half_precision_runs_unfused_and_is_refused_fused_after_conversion():
    X = torch.rand(1, 8, 30)
    A, S = NALMU(2, 8, 2, fused=False).half()(X.half())
    assert A.dtype == torch.float16 and bool(torch.isfinite(S).all())
    with pytest.raises(TypeError, match="float32 or float64"):
        NALMU(2, 8, 2).half()(X.half())


def test_almu_features_of_the_wrong_width_name_the_mismatch():
    class Summed(ALMU):
        def features(self, A):
            return A.sum(dim=1)  # (b, n): n values, not the declared in_features

    model = Summed(2, 2, 8, 2, in_features=5)
    with pytest.raises(ValueError, match=r"take \(b, 5\) features.*\(3, 2\)"):
        model(torch.rand(3, 8, 30))


def test_almu_shapes_untrained_is_mu_and_freeze():
    X = _data(b=3, m=10, t=70, seed=4)
    model = ALMU(nalmu_layers=3, almu_layers=4, m=10, n=3, dtype=torch.float64)
    assert len(model.mlps) == 4
    W = model.predict_weights(torch.rand(3, 10, 3, dtype=torch.float64))
    assert W.shape == (4, 3, 10, 3)
    torch.testing.assert_close(W, torch.ones_like(W), rtol=1e-15, atol=1e-15)  # W = 1 at init
    assert [tuple(w.shape) for w in model.mlps.weights] == [(4, 30, 130), (4, 130, 75), (4, 75, 30)]
    A, S = model(X)
    rA, rS = _mu_reference(X, 3, 7)
    torch.testing.assert_close(A, rA, rtol=1e-12, atol=0)
    torch.testing.assert_close(S, rS, rtol=1e-12, atol=0)
    outs = model(X, return_all=True)
    assert len(outs) == 7

    # stage 2: frozen front gets no gradient, the MLPs do
    model.freeze_front()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make W depend on the input so every MLP layer gets a gradient
        model.mlps.weights[-1].normal_(0, 0.1, generator=g)
    A_true = torch.rand(3, 10, 3, dtype=torch.float64, generator=g)
    S_true = torch.rand(3, 3, 70, dtype=torch.float64, generator=g)
    loss = unrolled_loss(model(X, return_all=True)[3:], A_true, S_true)
    loss.backward()
    assert model.front.theta.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mlps.parameters())
    model.freeze_front(False)
    model.zero_grad()
    unrolled_loss(model(X), A_true, S_true).backward()
    assert model.front.theta.grad is not None and model.front.theta.grad.abs().sum() > 0


def test_almu_fused_matches_plain_and_custom_widths():
    X = _data(b=2, m=8, t=260, seed=6)
    g = torch.Generator().manual_seed(3)
    A_true = torch.rand(2, 8, 2, generator=g, dtype=torch.float64)
    S_true = torch.rand(2, 2, 260, generator=g, dtype=torch.float64)
    res = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = ALMU(2, 3, m=8, n=2, hidden=(20, 10), fused=fused, dtype=torch.float64)
        with torch.no_grad():
            model.front.theta.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
            model.mlps.weights[-1].normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
        loss = unrolled_loss(model(X, return_all=True), A_true, S_true)
        loss.backward()
        res.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    assert [tuple(w.shape) for w in model.mlps.weights] == [(3, 16, 20), (3, 20, 10), (3, 10, 16)]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


# --------------------------------------------------------------------------- learning


def _structured_problems(b, m, n, t, g, A_base):
    """Mixtures of the fixed spectra ``A_base`` (jittered per problem) with random sparse maps."""
    A = A_base * (1 + 0.1 * torch.rand(b, m, n, generator=g))
    A = A / A.norm(dim=1, keepdim=True)
    S = torch.rand(b, n, t, generator=g) ** 3
    X = A @ S + 0.001 * torch.rand(b, m, t, generator=g)
    return X, A, S


def test_training_learns():
    """A few hundred Adam steps make NALMU beat untrained NALMU (= MU) on held-out problems."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m, n, t, L = 16, 3, 64, 12
    ch = torch.arange(m, dtype=torch.float32)[:, None]
    centers = torch.tensor([3.0, 7.0, 11.0])
    A_base = torch.exp(-0.5 * ((ch - centers) / 2.5) ** 2) + 0.05
    model = NALMU(L, m, n)
    X_test, A_test, S_test = _structured_problems(64, m, n, t, g, A_base)

    def sad(model):
        with torch.no_grad():
            A, S = model(X_test)
        return float(fastmu.metrics.mean_cosine(A.numpy(), A_test.numpy(), axis=-2).mean()), float(
            fastmu.metrics.mean_cosine(S.numpy(), S_test.numpy(), axis=-1).mean()
        )

    sad_a0, sad_s0 = sad(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        X, A_true, S_true = _structured_problems(16, m, n, t, g, A_base)
        loss = unrolled_loss(model(X, return_all=True), A_true, S_true)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sad_a1, sad_s1 = sad(model)
    assert sad_a1 > sad_a0 + 0.1, (sad_a0, sad_a1)
    assert sad_s1 > sad_s0 + 0.1, (sad_s0, sad_s1)
    assert sad_a1 > 0.95, sad_a1  # measured 0.80 -> 0.998 (S: 0.79 -> 0.994)


def test_stacked_mlps_equal_separate_mlps_and_cost_no_ops_per_layer():
    """WeightMLPs runs its L MLPs as batched products: the same outputs and gradients as L
    separate Linear–ReLU–…–softplus MLPs with the same parameters, and a number of torch
    ops that does not grow with L."""
    from fastmu.benchmarks.opcount import AtenOpCounter
    from fastmu.nn.models import WeightMLPs

    g = torch.Generator().manual_seed(11)
    mlps = WeightMLPs(5, 12, (7, 6), 9, dtype=torch.float64)
    with torch.no_grad():
        for w in mlps.weights:
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64))
    z = torch.rand(3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    out = mlps(z)
    assert out.shape == (5, 3, 9)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, [z, *mlps.weights, *mlps.biases], up)
    ref_out = []
    leaves = [(w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
              for w, b in zip(mlps.weights, mlps.biases)]
    for l in range(5):
        h = z
        for k, (w, b) in enumerate(leaves):
            h = torch.nn.functional.linear(h, w[l].T, b[l])
            h = torch.relu(h) if k < len(leaves) - 1 else torch.nn.functional.softplus(h)
        ref_out.append(h)
    ref_out = torch.stack(ref_out)
    ref = torch.autograd.grad(ref_out, [z, *(w for w, _ in leaves), *(b for _, b in leaves)], up)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # nn.Linear's initialisation bounds, and W = 1 at init through the zero last layer
    fresh = WeightMLPs(4, 30, (20,), 8)
    top = float(fresh.weights[0].detach().abs().max())
    assert 0 < top <= 1 / 30 ** 0.5
    torch.testing.assert_close(fresh(torch.rand(2, 30)), torch.ones(4, 2, 8))
    counts = []
    for L in (2, 20):
        m = WeightMLPs(L, 12, (7, 6), 9)
        with AtenOpCounter() as c:
            m(torch.rand(3, 12)).sum().backward()
        counts.append(c.ops)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("which", ["nalmu", "almu"])
def test_torch_compile_runs_the_fused_layers_eagerly(which):
    # TorchDynamo cannot trace the kernels' NumPy views: they run outside the graph, and the
    # compiled model's outputs, loss and gradients are the eager model's
    import fastmu

    torch.manual_seed(0)
    model = fastmu.NALMU(3, 10, 2) if which == "nalmu" else fastmu.ALMU(2, 2, 10, 2)
    X = torch.rand(2, 10, 40)
    At, St = torch.rand(2, 10, 2), torch.rand(2, 2, 40)

    def loss_of(fn):
        model.zero_grad()
        loss = fastmu.losses.unrolled_loss([fn(X)], At, St)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    compiled = torch.compile(model, backend="eager")
    assert all(torch.equal(a, b) for a, b in zip(model(X), compiled(X)))
    (l_e, g_e), (l_c, g_c) = loss_of(model), loss_of(compiled)
    assert torch.equal(l_e, l_c) and len(g_e) == len(g_c) > 0
    assert all(torch.equal(a, b) for a, b in zip(g_e, g_c))
