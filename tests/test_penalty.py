"""L1/L2 penalties through the public API: fastmu.mu (every CPU backend) against the NumPy
reference, the penalised objective never increasing, fastmu.NMF's alpha_W / alpha_H /
l1_ratio against scikit-learn's regularised NMF (both solvers, both orientations,
transform), and bad weights."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmu
from fastmu import NMF
from fastmu.penalty import NONE, Penalty, check_penalty, from_sklearn
from fastmu.reference import mu_numpy, mu_step_numpy, objective_numpy

from helpers import low_rank_problem

WEIGHTS = {
    "l1_A": Penalty(l1_A=0.05),
    "l2_A": Penalty(l2_A=0.3),
    "l1_S": Penalty(l1_S=0.05),
    "l2_S": Penalty(l2_S=0.3),
    "all": Penalty(0.02, 0.1, 0.03, 0.2),
}


def _kw(pen: Penalty) -> dict:
    return pen._asdict()


def _start(X, n, seed=3):
    return fastmu.mu(X, n, n_iter=0, random_state=seed)


def penalised_objective(X, A, S, pen: Penalty) -> np.ndarray:
    """``½‖X − AS‖² + l1_A‖A‖₁ + ½l2_A‖A‖² + l1_S‖S‖₁ + ½l2_S‖S‖²`` per problem, float64."""
    A, S = A.astype(np.float64), S.astype(np.float64)
    f = objective_numpy(X, A, S)
    for F, l1, l2 in ((A, pen.l1_A, pen.l2_A), (S, pen.l1_S, pen.l2_S)):
        f = f + l1 * F.sum(axis=(-2, -1)) + 0.5 * l2 * (F * F).sum(axis=(-2, -1))
    return f


@pytest.fixture
def one_torch_thread():
    """solver="cd" with a penalty runs tiny torch products on the transform path: a second
    torch thread only adds synchronisation on these problems."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the Penalty type ------------------------------------------------------------------------


def test_from_sklearn_is_scikit_learns_compute_regularization():
    sk = pytest.importorskip("sklearn.decomposition")
    X = np.ones((7, 11))
    for alpha_W, alpha_H, l1_ratio in ((0.1, 0.1, 0.0), (0.2, 0.05, 0.4), (0.3, 0.0, 1.0)):
        model = sk.NMF(alpha_W=alpha_W, alpha_H=alpha_H, l1_ratio=l1_ratio)
        l1_W, l1_H, l2_W, l2_H = model._compute_regularization(X)
        pen = from_sklearn(alpha_W, alpha_H, l1_ratio, *X.shape)
        assert pen == pytest.approx((l1_W, l2_W, l1_H, l2_H), rel=1e-15)
    assert Penalty(1, 2, 3, 4).transposed() == Penalty(3, 4, 1, 2)
    assert not NONE.active and Penalty(l2_S=1e-9).active


@pytest.mark.parametrize("name", ["l1_A", "l2_A", "l1_S", "l2_S"])
@pytest.mark.parametrize("bad, exc, msg", [
    (-0.1, ValueError, "must be a finite number >= 0, got -0.1"),
    (float("nan"), ValueError, "must be a finite number >= 0"),
    (float("inf"), ValueError, "must be a finite number >= 0"),
    ("0.1", TypeError, "must be a real number, got str"),
    (True, TypeError, "must be a real number, got bool"),
    (None, TypeError, "must be a real number, got NoneType"),
])
def test_bad_weights_are_named(name, bad, exc, msg):
    X = np.random.default_rng(0).random((6, 20))
    with pytest.raises(exc, match=f"{name} {msg}"):
        fastmu.mu(X, 2, n_iter=1, **{name: bad})
    with pytest.raises(exc, match=f"{name} {msg}"):
        check_penalty(**{name: bad})


# -- fastmu.mu ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", list(WEIGHTS))
def test_mu_matches_the_penalised_reference(backend, dtype, which):
    pen = WEIGHTS[which]
    X = low_rank_problem(np.random.default_rng(1), 3, 12, 3, 150, noise=0.01)[0]
    A0, S0 = _start(X, 3)
    Ar, Sr = mu_numpy(X, A0, S0, 30, penalty=pen)
    Xin, A0in, S0in = (a.astype(dtype) for a in (X, A0, S0))
    if backend == "torch":
        Xin, A0in, S0in = (torch.from_numpy(a) for a in (Xin, A0in, S0in))
    A, S = fastmu.mu(Xin, A0=A0in, S0=S0in, n_iter=30, backend=backend, **_kw(pen))
    A, S = np.asarray(A), np.asarray(S)
    assert A.dtype == dtype
    tol = 2e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(A, Ar, rtol=tol, atol=tol * np.abs(Ar).max())
    np.testing.assert_allclose(S, Sr, rtol=tol, atol=tol * np.abs(Sr).max())
    # the penalty did something: the plain run ends elsewhere
    Ap, _ = mu_numpy(X, A0, S0, 30)
    assert np.abs(Ap - Ar).max() > 100 * tol * np.abs(Ar).max()


def test_zero_weights_are_plain_mu_bit_for_bit():
    X = low_rank_problem(np.random.default_rng(2), 2, 10, 4, 300)[0].astype(np.float32)
    A0, S0 = _start(X, 4)
    plain = fastmu.mu(X, A0=A0, S0=S0, n_iter=20)
    zero = fastmu.mu(X, A0=A0, S0=S0, n_iter=20, l1_A=0, l2_A=0.0, l1_S=0, l2_S=0.0)
    for a, b in zip(plain, zero):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), l1=st.floats(0, 0.5), l2=st.floats(0, 2.0), on_A=st.booleans(),
       n=st.integers(1, 5))
def test_penalised_objective_never_increases(seed, l1, l2, on_A, n):
    """Each penalised update minimises a majoriser of the penalised objective: it never goes up."""
    rng = np.random.default_rng(seed)
    X = rng.random((2, 8, 40))
    pen = Penalty(l1, l2, 0.0, 0.0) if on_A else Penalty(0.0, 0.0, l1, l2)
    A, S = _start(X, n, seed)
    f_prev = penalised_objective(X, A, S, pen)
    for _ in range(6):
        A, S = fastmu.mu(X, A0=A, S0=S, n_iter=5, **_kw(pen))
        f = penalised_objective(X, A, S, pen)
        assert np.all(f <= f_prev * (1 + 1e-12) + 1e-12)
        f_prev = f


def test_l1_weight_makes_factors_sparser_and_l2_smaller():
    X = low_rank_problem(np.random.default_rng(4), 1, 20, 4, 400, noise=0.02)[0]
    A0, S0 = _start(X, 4)
    _, S_plain = fastmu.mu(X, A0=A0, S0=S0, n_iter=300)
    _, S_l1 = fastmu.mu(X, A0=A0, S0=S0, n_iter=300, l1_S=0.05)
    _, S_l2 = fastmu.mu(X, A0=A0, S0=S0, n_iter=300, l2_S=1.0)
    small = 1e-3 * S_plain.max()
    assert (S_l1 < small).mean() > (S_plain < small).mean()
    assert np.linalg.norm(S_l2) < np.linalg.norm(S_plain)


def test_tol_measures_the_data_term():
    """With a penalty the stopping rule still reads ½‖X − AS‖² (scikit-learn's rule): a run
    that stops at k iterations has the data term's relative decrease over its last check below
    tol, and the penalised run agrees with the reference run to that count."""
    X = low_rank_problem(np.random.default_rng(5), 1, 15, 3, 200, noise=0.01)[0]
    A0, S0 = _start(X, 3)
    pen = Penalty(0.01, 0.05, 0.01, 0.05)
    A, S, k = fastmu.mu(X, A0=A0, S0=S0, n_iter=5000, tol=1e-4, return_n_iter=True, **_kw(pen))
    assert 10 <= k < 5000 and k % 10 == 0
    f0 = objective_numpy(X, A0, S0)
    Aa, Sa = mu_numpy(X, A0, S0, k - 10, penalty=pen)
    Ab, Sb = mu_numpy(X, Aa, Sa, 10, penalty=pen)
    assert (objective_numpy(X, Aa, Sa) - objective_numpy(X, Ab, Sb)) / f0 < 1e-4
    np.testing.assert_allclose(S, Sb, rtol=1e-8, atol=1e-10)


def test_one_reference_step_is_the_written_formula():
    rng = np.random.default_rng(6)
    X, A, S = rng.random((1, 5, 9)), rng.random((1, 5, 2)), rng.random((1, 2, 9))
    pen, eps = Penalty(0.1, 0.2, 0.3, 0.4), 1e-12
    A1, S1 = mu_step_numpy(X, A, S, None, eps, pen)
    A_ = A * (X @ S.mT) / (A @ (S @ S.mT) + pen.l2_A * A + pen.l1_A + eps)
    S_ = S * (A_.mT @ X) / ((A_.mT @ A_) @ S + pen.l2_S * S + pen.l1_S + eps)
    np.testing.assert_allclose(A1, A_, rtol=1e-14)
    np.testing.assert_allclose(S1, S_, rtol=1e-14)


# -- fastmu.NMF against scikit-learn ---------------------------------------------------------

sk_decomposition = pytest.importorskip("sklearn.decomposition")


def _data(n_samples, n_features, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n_samples, 3)) @ rng.random((3, n_features)) + 0.01 * rng.random((n_samples, n_features))
    return X.astype(dtype)


def _tall_mu_stop(X, kw, sk_model) -> int:
    """Where fastmu's tall-X path off the CPU engine stops (a slow NumPy oracle): scikit-learn's penalised
    updates from its own start, the ``tol`` check every 10 solver iterations on Xᵀ, at
    ``(W_{j+1}, H_j)`` instead of scikit-learn's ``(W_j, H_j)``. With a penalty the
    unpenalised error scikit-learn checks flattens slowly, so half an iteration moves the
    stop by several checks (421 against scikit-learn's 470 for an L1 weight on H)."""
    from sklearn.decomposition._nmf import _initialize_nmf
    l1_W, l1_H, l2_W, l2_H = sk_model._compute_regularization(X)
    W, H = _initialize_nmf(X, kw["n_components"], init=kw["init"], random_state=kw["random_state"])
    eps = np.finfo(X.dtype).eps
    err0 = prev = np.linalg.norm(X - W @ H)
    W = W * (X @ H.T) / (W @ (H @ H.T) + l2_W * W + l1_W + eps)
    for j in range(1, kw["max_iter"]):
        H = H * (W.T @ X) / ((W.T @ W) @ H + l2_H * H + l1_H + eps)
        W = W * (X @ H.T) / (W @ (H @ H.T) + l2_W * W + l1_W + eps)
        if j % 10 == 0:
            err = np.linalg.norm(X - W @ H)
            if (prev - err) / err0 < kw["tol"]:
                return j + 1
            prev = err
    return kw["max_iter"]


REGS = [dict(alpha_W=0.01, alpha_H="same", l1_ratio=0.0), dict(alpha_W=0.005, alpha_H=0.02, l1_ratio=0.5),
        dict(alpha_W=0.0, alpha_H=0.01, l1_ratio=1.0)]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("reg", range(len(REGS)))
@pytest.mark.parametrize("solver", ["mu", "cd"])
@pytest.mark.parametrize("shape", [(30, 120), (120, 30)])
def test_nmf_matches_scikit_learns_regularised_nmf(shape, solver, reg):
    """Fixed iteration counts from the same start: W, H, the error and transform agree; with
    tol, the same iteration count (on the CPU engine also for a tall X: fastmu.transposed)."""
    X, X_new = _data(*shape), _data(*shape, seed=1)
    base = dict(n_components=3, init="random", random_state=0, solver=solver, **REGS[reg])
    for tol, max_iter in ((0, 40), (1e-4, 3000)):
        kw = dict(base, tol=tol, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning, both
            ours, theirs = NMF(**kw), sk_decomposition.NMF(**kw)
            W, W_sk = ours.fit_transform(X), theirs.fit_transform(X)
        if tol:  # (CD with only H's L1 weight runs all 3000 on the wide X, both: then the counts agree too)
            assert ours.n_iter_ == theirs.n_iter_
        rtol = 1e-6
        np.testing.assert_allclose(W, W_sk, rtol=rtol, atol=rtol * np.abs(W_sk).max())
        np.testing.assert_allclose(ours.components_, theirs.components_, rtol=rtol,
                                   atol=rtol * np.abs(theirs.components_).max())
        assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_, rel=1e-8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            T, T_sk = ours.transform(X_new), theirs.transform(X_new)
        np.testing.assert_allclose(T, T_sk, rtol=1e-5, atol=1e-5 * np.abs(T_sk).max())
    # and the penalty changed the answer
    plain = NMF(**dict(base, alpha_W=0.0, alpha_H=0.0, tol=0, max_iter=40)).fit(X).components_
    assert np.abs(plain - ours.components_).max() > 1e-4 * np.abs(plain).max()


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("reg", range(len(REGS)))
def test_tall_x_off_the_cpu_engine_stops_where_the_half_shifted_oracle_does(reg):
    """The torch engine gets a tall X as Xᵀ from the estimator (NMF._fit_tall), its checks
    half an iteration later than scikit-learn's: with a penalty that can move the stop by
    several checks, so the stop is checked against a NumPy oracle of that rule."""
    X = _data(120, 30)
    kw = dict(n_components=3, init="random", random_state=0, solver="mu", tol=1e-4, max_iter=3000, **REGS[reg])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning, both
        ours = NMF(backend="torch", **kw).fit(X)
        theirs = sk_decomposition.NMF(**kw).fit(X)
    assert ours.n_iter_ == _tall_mu_stop(X, kw, theirs)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_nmf_penalty_on_torch_float32(solver):
    X = _data(20, 60, np.float32)
    kw = dict(n_components=3, init="random", random_state=0, solver=solver, tol=0, max_iter=30,
              alpha_W=0.01, alpha_H=0.02, l1_ratio=0.3)
    W = NMF(**kw).fit_transform(torch.from_numpy(X))
    W_np = NMF(**kw).fit_transform(X)
    assert isinstance(W, torch.Tensor) and W.dtype == torch.float32
    np.testing.assert_allclose(W.numpy(), W_np, rtol=1e-4, atol=1e-5 * np.abs(W_np).max())


@pytest.mark.parametrize("bad, msg", [
    (dict(alpha_W=-1.0), r"alpha_W must be a finite number >= 0, got -1.0"),
    (dict(alpha_W=float("nan")), "alpha_W must be a finite number >= 0"),
    (dict(alpha_W=float("inf")), "alpha_W must be a finite number >= 0"),
    (dict(alpha_W=True), "alpha_W must be a finite number >= 0"),
    (dict(alpha_H="both"), "alpha_H must be a finite number >= 0 or 'same', got 'both'"),
    (dict(alpha_H=-0.5), "alpha_H must be a finite number >= 0 or 'same'"),
    (dict(l1_ratio=1.5), r"l1_ratio must be a number in \[0, 1\], got 1.5"),
    (dict(l1_ratio="half"), r"l1_ratio must be a number in \[0, 1\]"),
])
@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_nmf_bad_regularisation_is_named(bad, msg, solver):
    X = _data(10, 20)
    with pytest.raises(ValueError, match=msg):
        NMF(n_components=2, solver=solver, **bad).fit(X)
