"""Coordinate descent on a tall X runs on its transpose (fastmu.baselines.cd_transposed):
scikit-learn's iterates and violations, not the transposed problem's."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmu.baselines import cd
from fastmu.baselines.cd_transposed import KernelCD, TransposedCD, cd_transposes, new_cd_run
from fastmu.penalty import Penalty
from tests.helpers import low_rank_problem, record_calls, schedule_shapes

_nmf = pytest.importorskip("sklearn.decomposition._nmf")

NT = numba.config.NUMBA_NUM_THREADS
PEN = Penalty(0.01, 0.02, 0.03, 0.04)
# relative to the largest entry, after a few iterations (as tests/test_baselines_cd_penalty.py);
# scikit-learn sums float32 violations in float32, the kernels in float64
TOL = {np.float64: 1e-10, np.float32: 5e-5}
VTOL = {np.float64: 1e-10, np.float32: 1e-3}


@pytest.fixture(autouse=True)
def _default_rule(monkeypatch):
    """The rule's default (``auto``) whatever the environment says, so that these tests take the
    transposed run where they say they do."""
    monkeypatch.delenv("FASTMU_CPU_TRANSPOSE", raising=False)


def _close(got, want, tol):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def sk_iterations(X, A0, S0, pen, n_iter):
    """scikit-learn's CD iterations (W's sweep, then H's) on each problem: A, S and each
    iteration's violation (A's sweep's plus S's), ``(n_iter, b)``."""
    A, S, viol = A0.copy(), S0.copy(), np.zeros((n_iter, X.shape[0]))
    for p in range(X.shape[0]):
        W, Ht = A0[p].copy(), S0[p].T.copy()  # copies: sklearn updates them in place
        for it in range(n_iter):
            viol[it, p] = (_nmf._update_coordinate_descent(X[p], W, Ht, pen.l1_A, pen.l2_A, False, None)
                           + _nmf._update_coordinate_descent(X[p].T, Ht, W, pen.l1_S, pen.l2_S, False, None))
        A[p], S[p] = W, Ht.T
    return A, S, viol


def _run(cls, X, A0, S0, pen, calls):
    """``cls``'s run in calls of ``calls`` iterations: A, S and every iteration's violation."""
    A, S = A0.copy(), S0.copy()
    run = cls(X, A, S, tuple(pen), NT)
    viol = np.zeros((sum(calls), X.shape[0]))
    done = 0
    for k in calls:
        run.run(k, viol[done:done + k])
        done += k
    run.sync()
    return A, S, viol


def _problem(rng, b, m, n, t, dtype):
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, dtype, noise=0.05)
    S0[:, :, ::7] = 0  # coordinates at 0: the projected gradient's other branch
    return X, A0, S0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 300, 40, 4), (3, 97, 20, 3), (2, 260, 30, 5), (1, 64, 31, 1)])
@pytest.mark.parametrize("pen", [Penalty(), PEN], ids=["plain", "penalised"])
@pytest.mark.parametrize("calls", [(6,), (1, 2, 3)], ids=["one call", "three calls"])
def test_transposed_run_matches_scikit_learn_iterates_and_violations(rng, dtype, shape, pen, calls):
    b, m, t, n = shape
    X, A0, S0 = _problem(rng, b, m, n, t, dtype)
    Ar, Sr, vr = sk_iterations(X, A0, S0, pen, sum(calls))
    A, S, viol = _run(TransposedCD, X, A0, S0, pen, calls)
    _close(A, Ar, TOL[dtype])
    _close(S, Sr, TOL[dtype])
    _close(viol, vr, VTOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_runs_in_slices_are_one_run_bit_for_bit(rng, dtype):
    X, A0, S0 = _problem(rng, 2, 400, 4, 50, dtype)
    one = _run(TransposedCD, X, A0, S0, PEN, (10,))
    for calls in [(1,) * 10, (1, 4, 5), (3, 7)]:
        for got, want in zip(_run(TransposedCD, X, A0, S0, PEN, calls), one):
            np.testing.assert_array_equal(got, want)


def test_the_first_iteration_sweeps_a_before_s(rng):
    """One iteration is scikit-learn's (W, then H), not the transposed problem's."""
    X, A0, S0 = _problem(rng, 1, 200, 3, 30, np.float64)
    Ar, Sr, vr = sk_iterations(X, A0, S0, Penalty(), 1)
    A, S, viol = _run(TransposedCD, X, A0, S0, Penalty(), (1,))
    _close(A, Ar, 1e-12)
    _close(S, Sr, 1e-12)
    _close(viol, vr, 1e-12)
    XT, AT, ST = (np.ascontiguousarray(np.swapaxes(a, 1, 2)) for a in (X, S0, A0))
    _, At, _ = sk_iterations(XT, AT, ST, Penalty(), 1)  # Sᵀ swept first, then Aᵀ
    assert np.abs(A - np.swapaxes(At, 1, 2)).max() > 1e-3  # the other order is another iterate


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_it_agrees_with_the_kernel_on_x_as_given(rng, dtype):
    X, A0, S0 = _problem(rng, 2, 500, 4, 60, dtype)
    got = _run(TransposedCD, X, A0, S0, PEN, (2, 18))
    want = _run(KernelCD, X, A0, S0, PEN, (2, 18))
    for g, w, tol in zip(got, want, (TOL[dtype] * 10, TOL[dtype] * 10, VTOL[dtype])):
        _close(g, w, tol)


# the three schedules of the kernel on Xᵀ: its sweep on a copy is the kernel's own, bit for bit
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("schedule", ["problem_major", "block_parallel", "rows"])
def test_the_sweep_on_a_copy_is_the_kernels_next_sweep(rng, dtype, schedule):
    from fastmu.kernels import cpu, cpu_cd, cpu_cd_transposed

    if schedule == "rows":
        b, m, t, n = 1, 700, 60, 4
    else:
        if schedule == "block_parallel" and NT < 2:
            pytest.skip("with one thread every batch runs problem-major")
        m, n = 11, 3
        b, t = schedule_shapes(NT, cpu.block_length(m, np.dtype(dtype).itemsize))[schedule]
    X, A, S = _problem(rng, b, m, n, t, dtype)
    P, G = np.empty((b, m, n), dtype), np.empty((b, n, n), dtype)
    viol = np.zeros((3, b, 2))
    cpu_cd.cd_run(X, A, S, P, G, 2, False, viol[:2], NT, tuple(PEN))
    copy, vcopy = np.empty_like(A), np.zeros(b)
    cpu_cd_transposed.cd_sweep_from_pg(A, P, G, PEN.l1_A, PEN.l2_A, copy, vcopy, np.arange(n))
    assert cpu_cd.schedule(b, m, t, X.itemsize, NT) == schedule.replace("_", "-")
    cpu_cd.cd_run(X, A, S, P, G, 1, True, viol[2:], NT, tuple(PEN))  # A's sweep leaves A as the copy's
    np.testing.assert_array_equal(A, copy)
    _close(viol[2, :, 0], vcopy, 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_half_step_kernel_matches_scikit_learns_sweep(rng, dtype, n):
    """A's sweep alone on X (rows in several runs of HALF_STEP_ROWS), penalised."""
    from fastmu.kernels import cpu_cd_transposed

    b, m, t = 2, 2 * cpu_cd_transposed.HALF_STEP_ROWS + 37, 25
    X, A0, S0 = _problem(rng, b, m, n, t, dtype)
    A, viol = A0.copy(), np.zeros(b)
    cpu_cd_transposed.cd_a_half_step(X, A, S0, PEN.l1_A, PEN.l2_A, viol, np.arange(n))
    for p in range(b):
        W, Ht = A0[p].copy(), S0[p].T.copy()  # copies: sklearn updates them in place
        v = _nmf._update_coordinate_descent(X[p], W, Ht, PEN.l1_A, PEN.l2_A, False, None)
        _close(A[p], W, TOL[dtype])
        _close(viol[p], v, VTOL[dtype])


def test_cd_runs_a_tall_x_transposed_and_stops_where_scikit_learn_does(rng, monkeypatch):
    """Through fastmu.cd, with scikit-learn's tol rule checked on every iteration, penalised."""
    from fastmu.baselines import cd_transposed

    made = []
    real = cd_transposed.new_cd_run
    monkeypatch.setattr(cd_transposed, "new_cd_run", lambda *a: made.append(real(*a)) or made[-1])
    X, A0, S0 = low_rank_problem(rng, 1, 900, 4, 50, np.float64, noise=0.02)
    for tol in (1e-2, 1e-3):
        W, H, n_sk = _nmf._fit_coordinate_descent(X[0], A0[0].copy(), S0[0].copy(), tol=tol, max_iter=400,
                                                  l1_reg_W=PEN.l1_A, l2_reg_W=PEN.l2_A, l1_reg_H=PEN.l1_S,
                                                  l2_reg_H=PEN.l2_S, verbose=0, shuffle=False)
        A, S, n_it = cd(X[0], A0=A0[0], S0=S0[0], n_iter=400, tol=tol, return_n_iter=True, **PEN._asdict())
        assert made[-1].transposed
        assert 1 < n_it < 400 and n_it == n_sk
        _close(A, W, 1e-9)
        _close(S, H, 1e-9)


def test_callbacks_see_the_iterates_of_the_run_on_x_as_given(rng, monkeypatch):
    X, A0, S0 = low_rank_problem(rng, 2, 400, 3, 30, np.float64, noise=0.05)
    seen: dict[str, list] = {"T": [], "X": []}

    def fit(key):
        cb = lambda it, A, S: seen[key].append((it, A.copy(), S.copy()))  # noqa: E731
        return cd(X, A0=A0, S0=S0, n_iter=12, callback=cb, callback_every=5, progress=True)

    runs = record_calls(monkeypatch, TransposedCD, "run")
    got = fit("T")
    assert runs  # the transposed run served the first fit
    monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", "0")
    runs.clear()
    want = fit("X")
    assert not runs
    assert [s[0] for s in seen["T"]] == [s[0] for s in seen["X"]] == [5, 10]
    for (_, a, s), (_, a2, s2) in zip(seen["T"], seen["X"]):
        _close(a, a2, 1e-10)
        _close(s, s2, 1e-10)
    for g, w in zip(got, want):
        _close(g, w, 1e-10)


def test_a_callback_that_stops_gets_the_factors_returned(rng, monkeypatch):
    X, A0, S0 = low_rank_problem(rng, 1, 300, 3, 20, np.float64, noise=0.05)
    seen = []

    def cb(it, A, S):
        seen.append((A.copy(), S.copy()))
        return it == 3

    runs = record_calls(monkeypatch, TransposedCD, "run")
    A, S, n_it = cd(X, A0=A0, S0=S0, n_iter=50, callback=cb, return_n_iter=True)
    assert n_it == 3 and runs
    np.testing.assert_array_equal(seen[-1][0], A)
    np.testing.assert_array_equal(seen[-1][1], S)


def test_zero_iterations_return_the_start(rng):
    """No kernel runs at all (nothing to transpose), and the start comes back."""
    X, A0, S0 = low_rank_problem(rng, 1, 300, 3, 20, np.float32)
    A, S = cd(X, A0=A0, S0=S0, n_iter=0)
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(S, S0)


def test_the_rule_and_its_switch(monkeypatch, rng):
    assert cd_transposes((1, 16384, 65), np.float32)
    assert not cd_transposes((1, 65, 16384), np.float32)
    assert not cd_transposes((1, 300, 290), np.float32)
    # beyond 128 columns only with many rows (CD's rule, wider than MU's)
    assert cd_transposes((1, 4096, 2048), np.float32) and cd_transposes((1, 1600, 768), np.float32)
    assert not cd_transposes((1, 1024, 400), np.float32) and not cd_transposes((1, 3000, 1600), np.float32)
    X, A0, S0 = low_rank_problem(rng, 1, 300, 3, 20, np.float32)
    assert isinstance(new_cd_run(X, A0.copy(), S0.copy(), (0.0,) * 4, NT), TransposedCD)
    Xw = np.ascontiguousarray(np.swapaxes(X, 1, 2))
    assert isinstance(new_cd_run(Xw, np.ascontiguousarray(np.swapaxes(S0, 1, 2)),
                                 np.ascontiguousarray(np.swapaxes(A0, 1, 2)), (0.0,) * 4, NT), KernelCD)
    monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", "0")
    assert not cd_transposes((1, 16384, 65), np.float32)
    assert isinstance(new_cd_run(X, A0.copy(), S0.copy(), (0.0,) * 4, NT), KernelCD)
    monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", "1")
    assert cd_transposes((1, 300, 290), np.float32)


def test_tight_memory_keeps_x_as_given(monkeypatch):
    from fastmu import dispatch

    monkeypatch.setattr(dispatch, "_copy_affordable", lambda nbytes: False)
    assert not cd_transposes((1, 16384, 65), np.float32)


def test_the_estimator_fits_a_tall_x_on_the_transposed_run(monkeypatch):
    """NMF(solver="cd") on a tall host X: scikit-learn's n_iter_ and factors, through TransposedCD."""
    from sklearn.decomposition import NMF as SkNMF

    from fastmu import NMF
    from fastmu.baselines import cd_transposed

    calls = record_calls(monkeypatch, cd_transposed.TransposedCD, "run")
    rng = np.random.default_rng(3)
    X = rng.random((600, 4)) @ rng.random((4, 40)) + 0.01 * rng.random((600, 40))
    kw = dict(n_components=4, solver="cd", init="random", random_state=0, tol=3e-3, max_iter=500)
    ours, theirs = NMF(**kw), SkNMF(**kw)
    W, Wsk = ours.fit_transform(X), theirs.fit_transform(X)
    assert calls and ours.n_iter_ == theirs.n_iter_ < 500
    _close(W, Wsk, 1e-8)
    _close(ours.components_, theirs.components_, 1e-8)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), t=st.integers(2, 40), ratio=st.integers(2, 9), n=st.integers(1, 6),
       split=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_property_tall_runs_match_scikit_learn_and_never_raise_the_objective(b, t, ratio, n, split, seed):
    # rank at most t / 3: nearer t, some starts are ill-posed (a component whose curvature is 0 in
    # exact arithmetic, or one whose S grows to 1e13 as its A column vanishes), and rounding,
    # not the orientation, decides the iterates: the kernel on X as given departs from
    # scikit-learn there as much as on Xᵀ (600 draws agreed to 1e-8 with this bound)
    n = min(n, max(1, t // 3))
    m = ratio * t + 1
    X, A0, S0 = _problem(np.random.default_rng(seed), b, m, n, t, np.float64)
    Ar, Sr, vr = sk_iterations(X, A0, S0, Penalty(), 8)
    A, S, viol = _run(TransposedCD, X, A0, S0, Penalty(), (split, 8 - split))
    _close(A, Ar, 1e-8)
    _close(S, Sr, 1e-8)
    _close(viol, vr, 1e-8)
    before = np.linalg.norm(X - A0 @ S0, axis=(1, 2))
    after = np.linalg.norm(X - A @ S, axis=(1, 2))
    assert np.all(after <= before * (1 + 1e-12))


def test_an_interrupted_call_leaves_a_consistent_pair(rng, monkeypatch):
    """Ctrl-C between the kernel and the copy's sweep (a KeyboardInterrupt there): sync keeps the
    last pair written, (A₂, S₂), rather than the kernel's A₄ with the copy's S₃."""
    from fastmu.kernels import cpu_cd_transposed

    X, A0, S0 = _problem(rng, 1, 300, 3, 20, np.float64)
    A, S = A0.copy(), S0.copy()
    run = TransposedCD(X, A, S, (0.0,) * 4, NT)
    run.run(2, np.zeros((2, 1)))
    run.sync()
    A2, S2 = A.copy(), S.copy()
    run.run(1, np.zeros((1, 1)))  # (A₃, S₃) in the state, not yet written

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cpu_cd_transposed, "cd_sweep_from_pg", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.run(1, np.zeros((1, 1)))  # the kernel has swept A₄ when the interrupt comes
    run.sync()
    np.testing.assert_array_equal(A, A2)
    np.testing.assert_array_equal(S, S2)


def sk_shuffled(X, A0, S0, pen, n_iter, seed):
    """scikit-learn's iterations with shuffle=True (a permutation per sweep from one RandomState,
    W's before H's), and each iteration's violation."""
    A, S, viol = A0.copy(), S0.copy(), np.zeros((n_iter, X.shape[0]))
    rs = np.random.RandomState(seed)
    for p in range(X.shape[0]):
        W, Ht = A0[p].copy(), S0[p].T.copy()
        for it in range(n_iter):
            viol[it, p] = (_nmf._update_coordinate_descent(X[p], W, Ht, pen.l1_A, pen.l2_A, True, rs)
                           + _nmf._update_coordinate_descent(X[p].T, Ht, W, pen.l1_S, pen.l2_S, True, rs))
        A[p], S[p] = W, Ht.T
    return A, S, viol


@pytest.mark.parametrize("cls", [TransposedCD, KernelCD])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("calls", [(6,), (1, 2, 3), (2, 1, 1, 2)])
def test_permuted_sweeps_are_scikit_learns_shuffle(rng, cls, dtype, calls):
    """``order``: each iteration's permutations (A's, S's), as scikit-learn draws them; on Xᵀ
    the kernel's iterations pair S's permutation with the next A's, across calls too."""
    n = 5
    X, A0, S0 = _problem(rng, 1, 400, n, 40, dtype)
    Ar, Sr, vr = sk_shuffled(X, A0, S0, PEN, sum(calls), seed=3)
    rs = np.random.RandomState(3)
    order = np.array([[rs.permutation(n), rs.permutation(n)] for _ in range(sum(calls))])
    assert (order != np.arange(n)).any()  # not the natural order
    A, S = A0.copy(), S0.copy()
    run = cls(X, A, S, tuple(PEN), NT)
    viol = np.zeros((sum(calls), 1))
    done = 0
    for k in calls:
        run.run(k, viol[done:done + k], order[done:done + k])
        done += k
    run.sync()
    _close(A, Ar, TOL[dtype])
    _close(S, Sr, TOL[dtype])
    _close(viol, vr, VTOL[dtype])


@pytest.mark.parametrize("shape", [(300, 20), (20, 300)])  # tall (on Xᵀ) and wide
def test_shuffle_runs_in_the_fused_kernel_and_follows_scikit_learn(monkeypatch, shape):
    from sklearn.decomposition import NMF as SkNMF

    from fastmu import NMF
    from fastmu.kernels import cpu_cd

    calls = record_calls(monkeypatch, cpu_cd, "cd_run", "cd_sweeps")
    rng = np.random.default_rng(5)
    X = rng.random((shape[0], 3)) @ rng.random((3, shape[1])) + 0.01 * rng.random(shape)
    kw = dict(n_components=3, solver="cd", shuffle=True, init="random", random_state=7, tol=1e-3, max_iter=500)
    ours, theirs = NMF(**kw), SkNMF(**kw)
    W, Wsk = ours.fit_transform(X), theirs.fit_transform(X)
    assert "cd_run" in calls and 1 < theirs.n_iter_ < 500 and ours.n_iter_ == theirs.n_iter_
    _close(W, Wsk, 1e-8)
    calls.clear()
    _close(ours.transform(X), theirs.transform(X), 1e-8)
    assert calls == ["cd_sweeps"] * len(calls) and calls
