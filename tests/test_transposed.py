"""A tall X on the CPU runs on its transpose (fastmu.transposed): MU's iterates, not the transposed problem's."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmu
from fastmu.dispatch import CPUEngine, new_engine
from fastmu.penalty import Penalty
from fastmu.reference import mu_numpy, mu_step_numpy, objective_numpy
from fastmu.solver import EPS, solve
from fastmu.transposed import transposes
from tests.helpers import low_rank_problem

# relative to the largest entry, after a few tens of iterations (as tests/test_solver.py)
TOL = {np.float64: 1e-9, np.float32: 2e-4}
PEN = Penalty(0.01, 0.02, 0.03, 0.04)


def _close(got, want, tol):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def _engine(X, A0, S0, penalty=None):
    return new_engine(CPUEngine, X, A0.copy(), S0.copy(), None, EPS, penalty)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 300, 40, 4), (3, 97, 20, 3), (2, 260, 30, 6), (1, 64, 31, 1)])
@pytest.mark.parametrize("penalty", [None, PEN])
def test_tall_x_matches_the_reference_and_runs_transposed(rng, dtype, shape, penalty):
    b, m, t, n = shape
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, dtype, noise=0.05)
    assert _engine(X, A0, S0, penalty).transposed
    kw = {} if penalty is None else penalty._asdict()
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=30, **kw)
    assert A.dtype == S.dtype == dtype and A.shape == (b, m, n) and S.shape == (b, n, t)
    Ar, Sr = mu_numpy(*(a.astype(np.float64) for a in (X, A0, S0)), 30, penalty=penalty)
    _close(A, Ar, TOL[dtype])
    _close(S, Sr, TOL[dtype])


def test_the_first_iteration_updates_a_before_s(rng):
    """One iteration is MU's (A then S), not the transposed problem's (Sᵀ then Aᵀ)."""
    X, A0, S0 = low_rank_problem(rng, 1, 200, 3, 30, noise=0.1)
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=1)
    Ar, Sr = mu_step_numpy(X, A0, S0)
    _close(A, Ar, 1e-12)
    _close(S, Sr, 1e-12)
    St, At = mu_step_numpy(np.swapaxes(X, 1, 2), np.swapaxes(S0, 1, 2), np.swapaxes(A0, 1, 2))
    assert np.abs(A - np.swapaxes(At, 1, 2)).max() > 1e-3  # the other order is another iterate


def test_it_agrees_with_the_run_on_x_as_given(rng, monkeypatch):
    X, A0, S0 = low_rank_problem(rng, 2, 400, 4, 50, np.float32, noise=0.05)
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=200)
    monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", "0")
    assert not _engine(X, A0, S0).transposed
    A2, S2 = fastmu.mu(X, A0=A0, S0=S0, n_iter=200)
    _close(A, A2, 1e-3)
    _close(S, S2, 1e-3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_runs_in_slices_are_one_run_bit_for_bit(rng, dtype):
    X, A0, S0 = low_rank_problem(rng, 2, 300, 4, 40, dtype, noise=0.05)
    one = _engine(X, A0, S0)
    one.run(37)
    A1, S1 = (a.copy() for a in one.factors())
    sliced = _engine(X, A0, S0)
    sliced.run(0)
    for k in (1, 5, 0, 10, 21):
        sliced.run(k)
        sliced.factors()  # copying out between slices changes nothing
    A2, S2 = sliced.factors()
    np.testing.assert_array_equal(A1, A2)
    np.testing.assert_array_equal(S1, S2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_objective_is_measured_at_the_factors_returned(rng, dtype):
    X, A0, S0 = low_rank_problem(rng, 2, 300, 3, 40, dtype, noise=0.05)
    eng = _engine(X, A0, S0)
    rtol = 1e-9 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, A0, S0), rtol=rtol)
    for k in (1, 4, 15):
        eng.run(k)
        A, S = eng.factors()
        np.testing.assert_allclose(eng.objective(), objective_numpy(X, A, S), rtol=rtol)


def test_zero_iterations_return_the_start(rng):
    X, A0, S0 = low_rank_problem(rng, 1, 100, 2, 20)
    eng = _engine(X, A0, S0)
    eng.run(0)
    A, S = eng.factors()
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(S, S0)
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=0)
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(S, S0)


def test_tol_checks_and_callbacks_see_the_iterates_of_the_run_on_x_as_given(rng, monkeypatch):
    """The objective and the callbacks fall at (A_k, S_k), so tol stops where it does untransposed."""
    X, A0, S0 = low_rank_problem(rng, 1, 500, 4, 60, noise=0.02)
    seen = {}

    def run(flag):
        monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", flag)
        got = []
        A, S, done = solve(X, A0=A0, S0=S0, n_iter=5000, tol=1e-4, check_every=7,
                           callback=lambda k, A, S: got.append((k, objective_numpy(X, A, S))), callback_every=3)
        seen[flag] = got
        return A, S, done

    A, S, done = run("1")
    A2, S2, done2 = run("0")
    assert 7 < done == done2 < 5000
    assert [k for k, _ in seen["1"]] == [k for k, _ in seen["0"]]
    np.testing.assert_allclose([f for _, f in seen["1"]], [f for _, f in seen["0"]], rtol=1e-9)
    _close(A, A2, 1e-9)


def test_the_rule_and_its_switch(monkeypatch):
    assert transposes((1, 16384, 65)) and transposes((150, 1024, 65)) and transposes((1, 300, 120))
    assert transposes((1, 4096, 256)) and transposes((1, 2048, 512)) and transposes((1, 3072, 768))
    assert not transposes((1, 2048, 768))  # 768 columns want 4 rows each
    assert not transposes((1, 65, 16384))  # wide: the kernels' own orientation
    assert not transposes((1, 1024, 256)) and not transposes((1, 1024, 400))  # few rows: measured no gain
    assert not transposes((1, 8192, 1024)) and not transposes((1, 16384, 4096))  # many columns: none either
    assert not transposes((1, 16384, 65), learned=True)
    for off in ("0", "off", " False ", "NO"):
        monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", off)
        assert not transposes((1, 16384, 65))
    for on in ("1", "on", "true", "Yes"):
        monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", on)
        assert transposes((1, 1024, 400)) and not transposes((1, 400, 400))
        assert not transposes((1, 16384, 65), learned=True)
    for auto in ("auto", ""):
        monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", auto)
        assert transposes((1, 16384, 65)) and not transposes((1, 1024, 400))
    monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", "2")
    with pytest.warns(RuntimeWarning, match="FASTMU_CPU_TRANSPOSE='2' is not one of"):
        assert transposes((1, 16384, 65)) and not transposes((1, 1024, 400))


def test_learned_w_and_tight_memory_keep_x_as_given(rng, monkeypatch):
    from fastmu import dispatch

    X, A0, S0 = low_rank_problem(rng, 1, 300, 4, 40)
    W = np.ones((1, 300, 4))
    assert not new_engine(CPUEngine, X, A0.copy(), S0.copy(), W, EPS).transposed
    monkeypatch.setattr(dispatch, "_copy_affordable", lambda nbytes: False)
    assert not _engine(X, A0, S0).transposed
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=5)
    Ar, Sr = mu_numpy(X, A0, S0, 5)
    _close(A, Ar, 1e-10)


@pytest.mark.parametrize("n", [3, 4, 5])  # rank 4: the kernels' unrolled A update (_a_update4)
def test_half_step_kernels_match_numpy(rng, n):
    from fastmu.kernels import cpu_transposed

    X, A0, S0 = low_rank_problem(rng, 2, 700, n, 33, noise=0.1)  # several row runs of the parallel loop
    out = np.empty_like(A0)
    cpu_transposed.a_half_step(X, A0, S0, EPS, tuple(PEN), out)
    Ar, _ = mu_step_numpy(X, A0, S0, penalty=PEN)
    np.testing.assert_allclose(out, Ar, rtol=1e-12)
    # the A update from carried P, G, on a copy; W per problem
    P = X @ np.swapaxes(S0, 1, 2)
    G = S0 @ np.swapaxes(S0, 1, 2)
    W = rng.random((2, 700, n)) + 0.5
    before = A0.copy()
    cpu_transposed.a_update_from_pg(A0, W, P, G, EPS, tuple(PEN), out)
    np.testing.assert_array_equal(A0, before)
    want = A0 * W * P / (A0 @ (G + PEN.l2_A * np.eye(n)) + EPS + PEN.l1_A)
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_the_estimator_runs_a_tall_host_x_on_the_transposed_engine(monkeypatch):
    """NMF hands a tall host X to the solver as it is, and the CPU engine transposes it (the
    iteration counts alone would not show it: X as given gives scikit-learn's too)."""
    from fastmu import dispatch
    from fastmu.estimator import NMF

    made = []
    real = dispatch.new_engine

    def spy(*args, **kw):
        eng = real(*args, **kw)
        made.append(eng.transposed)
        return eng

    monkeypatch.setattr("fastmu.solver.new_engine", spy)
    rng = np.random.default_rng(2)
    X = rng.random((300, 3)) @ rng.random((3, 40))
    NMF(3, init="random", random_state=0, max_iter=20, tol=0).fit(X)
    NMF(3, init="random", random_state=0, max_iter=20, tol=0).fit(X.T)
    assert made == [True, False]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), t=st.integers(1, 40), ratio=st.integers(2, 9), n=st.integers(1, 6),
       n_iter=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_property_tall_runs_match_the_reference_and_never_raise_the_objective(b, t, ratio, n, n_iter, seed):
    rng = np.random.default_rng(seed)
    m = ratio * t
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, noise=0.1)
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=n_iter)
    Ar, Sr = mu_numpy(X, A0, S0, n_iter)
    _close(A, Ar, 1e-9)
    _close(S, Sr, 1e-9)
    assert np.all(A >= 0) and np.all(S >= 0)
    if n_iter:
        assert np.all(objective_numpy(X, A, S) <= objective_numpy(X, A0, S0) * (1 + 1e-12))
