"""Audit fixes of the learned models: second derivatives refused, gradients w.r.t. X,
non-finite outputs reported, arguments checked. Tiny float64 problems throughout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmu
from fastmu.losses import layer_weights, mean_component_cosine, unrolled_loss
from fastmu.nn import ALMU, NALMU, constant_init, learned_mu_step, learned_mu_unroll
from fastmu.reference import mu_step_torch

D = torch.float64
SECOND = "not itself differentiable"


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(2, 4, 6, generator=g, dtype=D) + 0.1
    A = torch.rand(2, 4, 3, generator=g, dtype=D) + 0.1
    S = torch.rand(2, 3, 6, generator=g, dtype=D) + 0.1
    W = torch.rand(4, 3, generator=g, dtype=D) + 0.5
    return X, A, S, W


# --------------------------------------------------------------------------- second derivatives


def test_layer_second_derivative_raises_and_first_still_works():
    X, A, S, W = _problem()
    # the reference's Hessian is not zero: a fused one of zeros was silently wrong
    H = torch.autograd.functional.hessian(lambda w: mu_step_torch(X, A, S, w)[1].sum(), W)
    assert H.abs().sum() > 0
    with pytest.raises(RuntimeError, match=SECOND):
        torch.autograd.functional.hessian(lambda w: learned_mu_step(X, A, S, w)[1].sum(), W)
    Wr = W.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=SECOND + ".*mu_step_torch"):
        torch.autograd.grad(learned_mu_step(X, A, S, Wr)[1].sum(), Wr, create_graph=True)
    (g,) = torch.autograd.grad(learned_mu_step(X, A, S, Wr)[1].sum(), Wr)
    (ref,) = torch.autograd.grad(mu_step_torch(X, A, S, Wr)[1].sum(), Wr)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-14)


def test_unroll_and_nalmu_second_derivative_raise():
    X, A, S, W = _problem(1)
    Ws = W.expand(2, -1, -1).clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=SECOND):
        torch.autograd.grad(learned_mu_unroll(X, A, S, Ws)[1].sum(), Ws, create_graph=True)
    fused, plain = NALMU(2, 4, 3, dtype=D), NALMU(2, 4, 3, dtype=D, fused=False)
    with pytest.raises(RuntimeError, match=SECOND):
        torch.autograd.grad(fused(X)[1].sum(), fused.theta, create_graph=True)
    (g,) = torch.autograd.grad(plain(X)[1].sum(), plain.theta, create_graph=True)  # fused=False: allowed
    assert g.requires_grad
    fused(X)[1].sum().backward()  # a plain backward still works
    torch.testing.assert_close(fused.theta.grad, g.detach(), rtol=1e-10, atol=1e-14)


def test_loss_second_derivative_raises_fused_and_works_unfused():
    _, A_true, S_true, _ = _problem(2)
    A0 = A_true + 0.3

    def loss(a, fused):
        return unrolled_loss((a, S_true), A_true, S_true, fused=fused)

    with pytest.raises(RuntimeError, match=SECOND + ".*fused=False"):
        torch.autograd.functional.hessian(lambda a: loss(a, True), A0)
    assert torch.autograd.functional.hessian(lambda a: loss(a, False), A0).abs().sum() > 0


# --------------------------------------------------------------------------- gradients w.r.t. X


@pytest.mark.parametrize("fused", [True, False])
def test_nalmu_gradcheck_wrt_x(fused):
    X = _problem(3)[0].requires_grad_(True)
    model = NALMU(2, 4, 3, dtype=D, fused=fused)
    with torch.no_grad():
        model.theta.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda x: model(x), (X,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("frozen", [False, True])
def test_almu_gradcheck_wrt_x(frozen):
    X = _problem(4)[0].requires_grad_(True)
    torch.manual_seed(0)
    model = ALMU(1, 2, 4, 3, hidden=5, dtype=D)
    with torch.no_grad():  # make W depend on A_NALMU, so the path X → front → MLPs → W counts
        model.mlps.weights[-1].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.freeze_front(frozen)
    assert torch.autograd.gradcheck(lambda x: model(x), (X,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_constant_init_gradient_is_finite_for_an_all_zero_problem():
    X = _problem(5)[0]
    X[1] = 0.0
    X.requires_grad_(True)
    A0, S0 = constant_init(X, 3)
    assert float(A0[1, 0, 0].detach()) == 1.0  # the all-zero problem starts at 1
    (A0.sum() + S0.sum()).backward()
    assert bool(torch.isfinite(X.grad).all()) and float(X.grad[1].abs().sum()) == 0.0


# --------------------------------------------------------------------------- non-finite outputs


@pytest.mark.parametrize("Model", [NALMU, ALMU])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float64, 1e300)])
def test_x_too_large_for_the_dtype_raises(Model, dtype, scale):
    model = Model(1, 1, 6, 3, dtype=dtype) if Model is ALMU else Model(3, 6, 3, dtype=dtype)
    X = (torch.rand(2, 6, 16, generator=torch.Generator().manual_seed(0), dtype=dtype) + 0.05) * scale
    name = str(dtype).replace("torch.", "")
    with pytest.raises(FloatingPointError, match=f"{Model.__name__}'s output .*too large for {name}.*mean"):
        model(X)
    A, S = model(X / X.mean())  # the cure the message gives
    assert bool(torch.isfinite(A).all() and torch.isfinite(S).all())


def test_parameters_that_overflow_or_are_nan_raise():
    X = _problem(6)[0].float()
    model = NALMU(2, 4, 3)
    with torch.no_grad():
        model.theta[0, 0, 0] = 100.0  # exp overflows in float32
    with pytest.raises(FloatingPointError, match="far from float32's limit.*parameters"):
        model(X)
    with pytest.raises(FloatingPointError, match="far from float32's limit.*parameters"):
        model(X, return_all=True)
    with torch.no_grad():
        model.theta[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="parameter.*theta"):
        model(X)
    model.check_input = False  # the documented opt-out: no reads on the host at all
    assert not bool(torch.isfinite(model(X)[0]).all())
    almu = ALMU(1, 1, 4, 3)
    with torch.no_grad():
        almu.mlps.biases[-1][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"mlps\.biases"):
        almu(X)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("build", [lambda **k: NALMU(2, 4, 3, **k), lambda **k: ALMU(1, 1, 4, 3, **k)])
def test_model_dtype_and_device_are_checked(build):
    with pytest.raises(TypeError, match="float32 or float64.*int64"):
        build(dtype=torch.int64)
    with pytest.raises(ValueError, match="device must be a torch device"):
        build(device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            build(device="cuda")


def test_integer_x_is_blamed_on_x():
    X, A, S, W = _problem(7)
    with pytest.raises(TypeError, match=r"X has dtype torch.int64.*convert X \(e.g. X.to\(torch.float32\)\)"):
        NALMU(2, 4, 3)(X.long())
    with pytest.raises(TypeError, match="X has dtype torch.int64.*convert X"):
        learned_mu_unroll(X.long(), A, S, W.expand(2, -1, -1))


def test_almu_hidden_widths_are_validated():
    assert ALMU(1, 1, 4, 3, hidden=5).hidden == (5,)
    assert ALMU(1, 1, 4, 3, hidden=np.array([4, 3])).hidden == (4, 3)
    assert ALMU(1, 1, 4, 3, hidden=(np.int64(2),)).hidden == (2,)
    for bad, err in (("12", TypeError), (2.0, TypeError), (True, TypeError), ((2.7,), ValueError),
                     ((3, True), ValueError), ((0,), ValueError)):
        with pytest.raises(err, match="hidden"):
            ALMU(1, 1, 4, 3, hidden=bad)


def test_loss_arguments_are_validated():
    _, A, S, _ = _problem(8)
    with pytest.raises(TypeError, match="single tensor"):
        unrolled_loss(A, A, S)
    with pytest.raises(TypeError, match="sequence of 3 tensors"):
        unrolled_loss((A, S, A), A, S)
    with pytest.raises(TypeError, match=r"outputs\[1\] must be an \(A_l, S_l\) pair"):
        unrolled_loss([(A, S), (A, S, A)], A, S)
    with pytest.raises(TypeError, match="A_true has dtype torch.int64"):
        unrolled_loss((A, S), A.long(), S)
    for w in ([float("nan"), 1.0], [-1.0, 1.0]):
        with pytest.raises(ValueError, match="finite and non-negative"):
            unrolled_loss([(A, S), (A, S)], A, S, weights=w)
    with pytest.raises(TypeError, match="weights"):
        unrolled_loss([(A, S), (A, S)], A, S, weights="ab")


def test_cosine_accepts_numpy_and_layer_weights_numpy_integers():
    _, A, _, _ = _problem(9)
    torch.testing.assert_close(mean_component_cosine(A.numpy(), A.numpy(), -2), torch.ones(2, dtype=D))
    torch.testing.assert_close(mean_component_cosine(A.numpy(), A, -2), torch.ones(2, dtype=D))
    with pytest.raises(TypeError, match="NumPy array"):
        mean_component_cosine([1.0], A, -2)
    torch.testing.assert_close(layer_weights(np.int64(3)), layer_weights(3))
    for bad in (3.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            layer_weights(bad)
    assert fastmu.nn.NALMU is NALMU


def test_layer_weights_of_the_wrong_shape_are_refused_before_the_kernels():
    # the fused kernels index W by A's shape: a smaller replaced theta would be read past its end
    X = torch.rand(10, 50)
    for shape in [(3, 2, 3), (3, 100, 3), (3, 10, 5)]:
        model = NALMU(3, 10, 3)
        model.theta = torch.nn.Parameter(torch.zeros(shape))
        with pytest.raises(ValueError, match=r"layer weights have shape .*\(layers, 10, 3\)"):
            model(X)


@pytest.mark.parametrize("build", [lambda: NALMU(2, 8, 2), lambda: ALMU(2, 2, 8, 2),
                                   lambda: fastmu.baselines.SNMFNet(2, 8, 2, A_init=torch.rand(8, 2) + 0.1),
                                   lambda: fastmu.baselines.DNMF(2, 8, 2, A_init=torch.rand(8, 2) + 0.1)])
def test_sparse_x_is_refused_clearly(build):
    with pytest.raises(TypeError, match=r"sparse torch tensor.*X.to_dense\(\)"):
        build()(torch.rand(8, 30).to_sparse())


def test_default_eps_follows_the_dtype_and_a_given_one_must_fit_it():
    X = torch.rand(8, 30)
    X[3] = 0.0  # a zero channel: 0/0 in the A update unless eps > 0 in the working precision
    model = NALMU(2, 8, 2, fused=False).half()
    assert model.eps == float(torch.finfo(torch.float16).tiny)
    A, S = model(X.half())
    assert bool(torch.isfinite(A).all() and torch.isfinite(S).all())
    assert NALMU(2, 8, 2).eps == fastmu.EPS == ALMU(2, 2, 8, 2, dtype=torch.float64).front.eps
    with pytest.raises(ValueError, match="eps=1e-50 is below the smallest normal float32"):
        NALMU(2, 8, 2, eps=1e-50)
    with pytest.raises(ValueError, match="eps=1e-12 is below the smallest normal float16"):
        NALMU(2, 8, 2, fused=False, eps=1e-12).half()(X.half())
    with pytest.raises(ValueError, match="eps=1e-40 is below the smallest normal float32"):
        learned_mu_step(X[None], torch.ones(1, 8, 2), torch.ones(1, 2, 30), torch.ones(8, 2), eps=1e-40)


def test_torch_func_transforms_are_refused_by_name():
    # the kernels read tensor memory, which vmap's and grad's wrapped tensors do not have
    import fastmu

    X = torch.rand(3, 2, 8, 16, dtype=torch.float64)
    model = fastmu.NALMU(2, 8, 2).double()
    with pytest.raises(TypeError, match="torch.func"):
        torch.func.vmap(model)(X)
    with pytest.raises(TypeError, match="torch.func"):
        torch.func.vmap(lambda x: fastmu.mu(x, 2, n_iter=2, random_state=0)[0])(X[:, 0])
    with pytest.raises(TypeError, match="torch.func"):
        torch.func.grad(lambda x: model(x)[0].sum())(X[0])
