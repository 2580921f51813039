"""L1/L2 penalties in the fused CPU MU kernels, against the NumPy reference.

The penalties of :mod:`fastmu.penalty` join the kernels' denominators as
scalars (``ε + l1`` per factor, ``l2`` on the diagonals of the Gram matrices
the updates read): every schedule of :mod:`fastmu.kernels.cpu` and
:mod:`fastmu.kernels.cpu_tiled` is checked against
:func:`fastmu.reference.mu_step_numpy` with each weight alone and all four
together, at native and padded ranks, across calls on carried ``P``, ``G``,
and through the engines. The weights are sized to the problem (a fraction of
the denominators they join), so that each one moves the result far more than
the tolerance: a weight that got lost would fail.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmu import EPS
from fastmu.dispatch import CPUEngine, TorchEngine
from fastmu.kernels import cpu, cpu_tiled
from fastmu.penalty import Penalty
from fastmu.reference import mu_numpy, mu_step_numpy, objective_numpy

from helpers import low_rank_problem, record_calls, run_tiled, schedule_shapes

NT = numba.config.NUMBA_NUM_THREADS
# As in test_kernels_cpu.py: float32 rounding grows a little with each iteration.
RTOL = {np.float32: 2e-4, np.float64: 1e-10}
WEIGHTS = ["l1_A", "l2_A", "l1_S", "l2_S", "all"]
BLOCKED_SCHEDULES = ["problem_major", "block_parallel", "rows"]
TILED_SCHEDULES = ["problem_major", "block_parallel"]
TILED = cpu_tiled.available(4)
needs_tiled = pytest.mark.skipif(
    not TILED, reason="the tiled kernel needs 512-bit vectors (AVX-512) and FASTMU_CPU_TILED != 0"
)


def rel_err(x, ref):
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def sized_penalty(X, A, S, which="all", frac=0.3):
    """A :class:`Penalty` with ``which`` weight(s) at ``frac`` of the scale of the denominator
    term each joins (mean of ``X Sᵀ``, of diag ``S Sᵀ``, of ``AᵀX``, of diag ``AᵀA``)."""
    X, A, S = (np.asarray(a, np.float64) for a in (X, A, S))
    At = np.swapaxes(A, -1, -2)
    scale = Penalty(
        float((X @ np.swapaxes(S, -1, -2)).mean()),
        float(np.einsum("...kj,...kj->...k", S, S).mean()),
        float((At @ X).mean()),
        float(np.einsum("...ik,...ik->...k", A, A).mean()),
    )
    return Penalty(*(frac * v if which in ("all", name) else 0.0 for name, v in zip(Penalty._fields, scale)))


def reference(X, A, S, W, n_iter, penalty):
    """``n_iter`` penalised (learned) MU steps in float64."""
    A, S = A.astype(np.float64), S.astype(np.float64)
    X = X.astype(np.float64)
    W = None if W is None else W.astype(np.float64)
    for _ in range(n_iter):
        A, S = mu_step_numpy(X, A, S, W, EPS, penalty)
    return A, S


def run_blocked(X, A, S, W, n_iter, penalty=None, pg=None, nthreads=NT, accumulate_last=True):
    """``cpu.mu_run`` on copies of A, S; ``penalty`` None: the argument left out."""
    b, m, t = X.shape
    n = A.shape[2]
    A, S = A.copy(), S.copy()
    W = np.ones((1, m, n), X.dtype) if W is None else W
    P, G = (np.empty((b, m, n), X.dtype), np.empty((b, n, n), X.dtype)) if pg is None else pg
    args = (X, A, S, W, P, G, n_iter, EPS, pg is not None, accumulate_last, nthreads)
    if penalty is None:
        cpu.mu_run(*args)
    else:
        cpu.mu_run(*args, penalty)
    return A, S, P, G


def blocked_shape(schedule, dtype, n):
    """``(b, m, t, nthreads)`` that :func:`cpu.mu_run` runs with ``schedule``."""
    itemsize = np.dtype(dtype).itemsize
    if schedule == "rows":
        b, m, t, nthreads = 1, 700, 60, max(2, NT)  # nthreads may exceed the real count: it sizes scratch
        assert cpu.row_chunks(b, m, t, itemsize, nthreads) >= 2
        return b, m, t, nthreads
    if schedule == "block_parallel" and NT < 2:
        pytest.skip("with one thread every batch runs problem-major")
    m = 13
    b, t = schedule_shapes(NT, cpu.block_length(m, itemsize))[schedule]
    return b, m, t, NT


def spy_blocked(monkeypatch):
    return record_calls(monkeypatch, cpu, "_mu_problem_major", "_mu_block_parallel", "_mu_rows")


# -- the blocked kernel ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", BLOCKED_SCHEDULES)
@pytest.mark.parametrize("which", WEIGHTS)
def test_blocked_each_weight_every_schedule(monkeypatch, rng, dtype, schedule, which):
    """Rank 4, learned W: two calls (3 + 2 iterations, the second on the first's P, G); P and G
    come back as ``X Sᵀ`` and ``S Sᵀ``, without the penalty."""
    b, m, t, nthreads = blocked_shape(schedule, dtype, 4)
    X, A0, S0 = low_rank_problem(rng, b, m, 4, t, dtype, noise=0.05)
    W = (0.5 + rng.random((b, m, 4))).astype(dtype)
    pen = sized_penalty(X, A0, S0, which)
    calls = spy_blocked(monkeypatch)
    A, S, P, G = run_blocked(X, A0, S0, W, 3, pen, nthreads=nthreads)
    A, S, P, G = run_blocked(X, A, S, W, 2, pen, pg=(P, G), nthreads=nthreads)
    assert calls == [f"_mu_{schedule}"] * 2
    Ar, Sr = reference(X, A0, S0, W, 5, pen)
    assert A.dtype == dtype and S.dtype == dtype
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]
    Xd = X.astype(np.float64)
    assert rel_err(P, Xd @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    assert rel_err(G, Sr @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    # the weight did enter: the unpenalised run is far away
    Au, Su = reference(X, A0, S0, W, 5, None)
    assert max(rel_err(Au, Ar), rel_err(Su, Sr)) > 100 * RTOL[np.float32]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", BLOCKED_SCHEDULES)
@pytest.mark.parametrize("n", [3, 5])
def test_blocked_any_rank_every_schedule(monkeypatch, rng, dtype, schedule, n):
    """Ranks off the rank-4 fast paths, unpadded (the any-rank A and S updates): all four weights."""
    b, m, t, nthreads = blocked_shape(schedule, dtype, n)
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, dtype, noise=0.05)
    pen = sized_penalty(X, A0, S0)
    calls = spy_blocked(monkeypatch)
    A, S, P, G = run_blocked(X, A0, S0, None, 4, pen, nthreads=nthreads)
    assert calls == [f"_mu_{schedule}"]
    Ar, Sr = reference(X, A0, S0, None, 4, pen)
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]
    assert rel_err(G, Sr @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]


@pytest.mark.parametrize(
    "schedule,n",
    [("problem_major", 1), ("problem_major", 2), ("problem_major", 3), ("problem_major", 6),
     ("problem_major", 7), ("block_parallel", 3), ("block_parallel", 6), ("rows", 2), ("rows", 7)],
)
def test_blocked_padded_rank_stays_zero(rng, schedule, n):
    """At the padded rank (zero components appended) with every weight: the padding stays exactly
    zero in A, S, P and G, and the first n components follow the rank-n penalised iteration."""
    b, m, t, nthreads = blocked_shape(schedule, np.float64, n)
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, noise=0.05)
    W = rng.random((b, m, n)) + 0.5
    pen = sized_penalty(X, A0, S0)
    k = cpu.padded_rank(n)
    assert k > n
    Ak, Sk, Wk = cpu.pad_rank(A0, S0, W, k)
    A, S, P, G = run_blocked(X, Ak, Sk, Wk, 5, pen, nthreads=nthreads)
    assert not A[:, :, n:].any() and not S[:, n:].any()
    assert not P[:, :, n:].any() and not G[:, n:].any() and not G[:, :, n:].any()
    Ar, Sr = reference(X, A0, S0, W, 5, pen)
    np.testing.assert_allclose(A[:, :, :n], Ar, rtol=1e-10)
    np.testing.assert_allclose(S[:, :n], Sr, rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", BLOCKED_SCHEDULES)
@pytest.mark.parametrize("n", [4, 5])
def test_blocked_slices_equal_one_run(rng, dtype, schedule, n):
    """Penalised: 3 + 4 iterations with P, G carried equal 7 in one call, bit for bit (also
    when that call skips the last accumulation)."""
    b, m, t, nthreads = blocked_shape(schedule, dtype, n)
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, dtype, noise=0.05)
    pen = sized_penalty(X, A0, S0)
    A7, S7, _, _ = run_blocked(X, A0, S0, None, 7, pen, nthreads=nthreads, accumulate_last=False)
    A, S, P, G = run_blocked(X, A0, S0, None, 3, pen, nthreads=nthreads)
    A, S, _, _ = run_blocked(X, A, S, None, 4, pen, pg=(P, G), nthreads=nthreads)
    np.testing.assert_array_equal(A, A7)
    np.testing.assert_array_equal(S, S7)


def test_penalty_may_change_between_calls(rng):
    """P, G carried between calls hold no penalty: a run may change its weights between calls."""
    X, A0, S0 = low_rank_problem(rng, 4, 13, 5, 300, noise=0.05)
    p1, p2 = sized_penalty(X, A0, S0, "l2_A"), sized_penalty(X, A0, S0, "l1_S")
    A, S, P, G = run_blocked(X, A0, S0, None, 3, p1)
    A, S, _, _ = run_blocked(X, A, S, None, 2, p2, pg=(P, G))
    Ar, Sr = reference(X, A0, S0, None, 3, p1)
    Ar, Sr = reference(X, Ar, Sr, None, 2, p2)
    np.testing.assert_allclose(A, Ar, rtol=1e-10)
    np.testing.assert_allclose(S, Sr, rtol=1e-10)


@pytest.mark.parametrize("schedule", BLOCKED_SCHEDULES)
@pytest.mark.parametrize("n", [4, 5])
def test_blocked_zero_penalty_is_no_penalty(rng, schedule, n):
    """Zero weights, however passed, give the unpenalised run bit for bit."""
    b, m, t, nthreads = blocked_shape(schedule, np.float32, n)
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, np.float32, noise=0.05)
    W = (0.5 + rng.random((1, m, n))).astype(np.float32)
    ref = run_blocked(X, A0, S0, W, 4, None, nthreads=nthreads)
    for zero in [(0.0, 0.0, 0.0, 0.0), Penalty(), np.zeros(4), (0, 0, 0, 0)]:
        out = run_blocked(X, A0, S0, W, 4, zero, nthreads=nthreads)
        for got, want in zip(out, ref):
            np.testing.assert_array_equal(got, want)


def test_penalty_forms_agree(rng):
    """A Penalty, a tuple and an array of the same weights run the same compiled code."""
    X, A0, S0 = low_rank_problem(rng, 2, 9, 4, 200, noise=0.05)
    pen = sized_penalty(X, A0, S0)
    ref = run_blocked(X, A0, S0, None, 3, pen)
    for form in (tuple(pen), np.array(pen), list(pen)):
        for got, want in zip(run_blocked(X, A0, S0, None, 3, form), ref):
            np.testing.assert_array_equal(got, want)
    assert cpu.penalty_tuple(pen) == tuple(pen) and type(cpu.penalty_tuple(pen)) is tuple
    assert cpu.penalty_tuple(None) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        cpu.penalty_tuple((1.0, 2.0))


# -- the tiled kernel ------------------------------------------------------------------------


@needs_tiled
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", TILED_SCHEDULES)
@pytest.mark.parametrize("which", WEIGHTS)
def test_tiled_each_weight_every_schedule(monkeypatch, rng, dtype, schedule, which):
    if schedule == "block_parallel" and NT < 2:
        pytest.skip("with one thread every batch runs problem-major")
    b, t = schedule_shapes(NT, cpu_tiled.tile_width(np.dtype(dtype).itemsize), min_units=8)[schedule]
    X, A0, S0 = low_rank_problem(rng, b, 9, 4, t, dtype, noise=0.05)
    W = (0.5 + rng.random((b, 9, 4))).astype(dtype)
    pen = sized_penalty(X, A0, S0, which)
    calls = record_calls(monkeypatch, cpu_tiled, "_tiled_problem_major", "_tiled_block_parallel")
    A, S, state = run_tiled(X, A0, S0, W, 3, pen)
    A, S, (_, _, P, G) = run_tiled(X, A, S, W, 2, pen, state=state)
    assert calls == [f"_tiled_{schedule}"] * 2
    Ar, Sr = reference(X, A0, S0, W, 5, pen)
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]
    assert rel_err(P, X.astype(np.float64) @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    assert rel_err(G, Sr @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    Au, Su = reference(X, A0, S0, W, 5, None)
    assert max(rel_err(Au, Ar), rel_err(Su, Sr)) > 100 * RTOL[np.float32]


@needs_tiled
@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiled_padded_rank_stays_zero(rng, n):
    X, A0, S0 = low_rank_problem(rng, 3, 10, n, 130, noise=0.05)
    W = rng.random((3, 10, n)) + 0.5
    pen = sized_penalty(X, A0, S0)
    A4, S4, W4 = cpu.pad_rank(A0, S0, W, 4)
    A, S, (_, Sp, P, G) = run_tiled(X, A4, S4, W4, 5, pen)
    assert not A[:, :, n:].any() and not S[:, n:].any() and not Sp[:, n:].any()
    assert not Sp[:, :, 130:].any()  # the padded pixels too
    assert not P[:, :, n:].any() and not G[:, n:].any() and not G[:, :, n:].any()
    Ar, Sr = reference(X, A0, S0, W, 5, pen)
    np.testing.assert_allclose(A[:, :, :n], Ar, rtol=1e-10)
    np.testing.assert_allclose(S[:, :n], Sr, rtol=1e-10)


@needs_tiled
@pytest.mark.parametrize("schedule", TILED_SCHEDULES)
def test_tiled_slices_and_zero_penalty(rng, schedule):
    """Penalised 3 + 4 iterations on the carried state equal 7 in one call; zero weights equal
    no penalty argument (bit for bit)."""
    if schedule == "block_parallel" and NT < 2:
        pytest.skip("with one thread every batch runs problem-major")
    b, t = schedule_shapes(NT, cpu_tiled.tile_width(4), min_units=8)[schedule]
    X, A0, S0 = low_rank_problem(rng, b, 9, 4, t, np.float32, noise=0.05)
    pen = sized_penalty(X, A0, S0)
    A7, S7, _ = run_tiled(X, A0, S0, None, 7, pen, accumulate_last=False)
    A3, _, state = run_tiled(X, A0, S0, None, 3, pen)
    A, S, _ = run_tiled(X, A3, S0, None, 4, pen, state=state)
    np.testing.assert_array_equal(A, A7)
    np.testing.assert_array_equal(S, S7)
    An, Sn, (_, _, Pn, Gn) = run_tiled(X, A0, S0, None, 4)
    Az, Sz, (_, _, Pz, Gz) = run_tiled(X, A0, S0, None, 4, Penalty())
    for got, want in [(Az, An), (Sz, Sn), (Pz, Pn), (Gz, Gn)]:
        np.testing.assert_array_equal(got, want)


# -- engines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tiled", ["1", "0"])
@pytest.mark.parametrize("n", [3, 4, 5])
def test_cpu_engine_with_penalty(rng, monkeypatch, tiled, n):
    """CPUEngine (either kernel, padded or not) runs the penalised update, in slices too;
    objective() stays the data term 0.5‖X − AS‖²."""
    monkeypatch.setenv("FASTMU_CPU_TILED", tiled)
    X, A0, S0 = low_rank_problem(rng, 2, 12, n, 200, noise=0.1)
    pen = sized_penalty(X, A0, S0)
    eng = CPUEngine(X, A0.copy(), S0.copy(), None, EPS, penalty=pen)
    eng.run(3)
    eng.run(4)
    A, S = eng.factors()
    Ar, Sr = mu_numpy(X, A0, S0, 7, EPS, pen)
    np.testing.assert_allclose(A, Ar, rtol=1e-9)
    np.testing.assert_allclose(S, Sr, rtol=1e-9)
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, A, S), rtol=1e-8)
    # None: the unpenalised engine, as before
    e0 = CPUEngine(X, A0.copy(), S0.copy(), None, EPS)
    e1 = CPUEngine(X, A0.copy(), S0.copy(), None, EPS, penalty=None)
    for e in (e0, e1):
        e.run(5)
    np.testing.assert_array_equal(e0.factors()[0], e1.factors()[0])
    np.testing.assert_allclose(e1.factors()[1], mu_numpy(X, A0, S0, 5)[1], rtol=1e-9)


def test_cpu_engine_float32_with_penalty(rng):
    X, A0, S0 = low_rank_problem(rng, 3, 20, 4, 300, np.float32, noise=0.1)
    pen = sized_penalty(X, A0, S0)
    eng = CPUEngine(X, A0.copy(), S0.copy(), None, EPS, penalty=pen)
    eng.run(6)
    A, S = eng.factors()
    Ar, Sr = mu_numpy(*(a.astype(np.float64) for a in (X, A0, S0)), 6, EPS, pen)
    assert rel_err(A, Ar) < RTOL[np.float32] and rel_err(S, Sr) < RTOL[np.float32]
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, A, S), rtol=1e-4)


def test_torch_engine_with_penalty(rng):
    torch = pytest.importorskip("torch")
    X, A0, S0 = low_rank_problem(rng, 2, 12, 4, 200, noise=0.1)
    pen = sized_penalty(X, A0, S0)
    eng = TorchEngine(torch.from_numpy(X), torch.from_numpy(A0.copy()), torch.from_numpy(S0.copy()), None, EPS,
                      penalty=pen)
    eng.run(5)
    A, S = (x.numpy() for x in eng.factors())
    Ar, Sr = mu_numpy(X, A0, S0, 5, EPS, pen)
    np.testing.assert_allclose(A, Ar, rtol=1e-10)
    np.testing.assert_allclose(S, Sr, rtol=1e-10)
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, A, S), rtol=1e-10)
    plain = TorchEngine(torch.from_numpy(X), torch.from_numpy(A0.copy()), torch.from_numpy(S0.copy()), None, EPS)
    plain.run(5)
    np.testing.assert_allclose(plain.factors()[1].numpy(), mu_numpy(X, A0, S0, 5)[1], rtol=1e-10)


# -- properties ------------------------------------------------------------------------------


def penalised_objective(X, A, S, pen):
    """``½‖X − AS‖² + l1_A‖A‖₁ + ½l2_A‖A‖² + l1_S‖S‖₁ + ½l2_S‖S‖²`` per problem (float64)."""
    l1a, l2a, l1s, l2s = pen
    return (objective_numpy(X, A, S) + l1a * A.sum((1, 2)) + 0.5 * l2a * (A * A).sum((1, 2))
            + l1s * S.sum((1, 2)) + 0.5 * l2s * (S * S).sum((1, 2)))


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 3),
    m=st.integers(2, 12),
    n=st.integers(1, 6),
    t=st.integers(2, 300),
    frac=st.sampled_from([0.01, 0.3, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_penalised_objective_never_increases(b, m, n, t, frac, seed):
    """MU with these denominators majorises the penalised objective: one iteration per call
    (P, G carried), float64, it never goes up (up to rounding)."""
    rng = np.random.default_rng(seed)
    X, A, S = low_rank_problem(rng, b, m, n, t, noise=0.1)
    pen = Penalty(*(frac * w * rng.random() for w in sized_penalty(X, A, S, frac=1.0)))
    f = penalised_objective(X, A, S, pen)
    P, G = np.empty((b, m, n)), np.empty((b, n, n))
    valid = False
    for _ in range(15):
        cpu.mu_run(X, A, S, np.ones((1, m, n)), P, G, 1, EPS, valid, True, NT, pen)
        valid = True
        f_new = penalised_objective(X, A, S, pen)
        assert (f_new <= f + 1e-11 * np.abs(f)).all(), (f, f_new)
        f = f_new


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_l2_shrinks_the_factors(seed):
    """With l2 on both factors at the size of X's largest singular value (where the penalised
    minimiser is 0) the factors shrink, far below the unpenalised run's."""
    rng = np.random.default_rng(seed)
    X, A0, S0 = low_rank_problem(rng, 2, 10, 3, 120, noise=0.05)
    sigma = float(np.linalg.norm(X, 2, axis=(1, 2)).max())
    pen = Penalty(0.0, sigma, 0.0, sigma)
    A, S, _, _ = run_blocked(X, A0, S0, None, 30, pen)
    Au, Su, _, _ = run_blocked(X, A0, S0, None, 30)
    for x, x0, xu in [(A, A0, Au), (S, S0, Su)]:
        norm = np.linalg.norm(x, axis=(1, 2))
        assert (norm < 0.5 * np.linalg.norm(x0, axis=(1, 2))).all()
        assert (norm < 0.5 * np.linalg.norm(xu, axis=(1, 2))).all()
    # and the penalised objective went down all the way
    assert (penalised_objective(X, A, S, pen) < penalised_objective(X, A0, S0, pen)).all()
