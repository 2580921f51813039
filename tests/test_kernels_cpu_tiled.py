"""The tiled rank-4 CPU kernel and its SIMD vocabulary, against the NumPy reference.

The kernel's results do not depend on the vector width (only its speed
does), so these run wherever Numba runs, whether or not the engine would
pick the tiled kernel on this CPU.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmu
from fastmu import EPS
from fastmu.dispatch import CPUEngine
from fastmu.kernels import cpu, cpu_tiled, simd
from fastmu.reference import mu_numpy, mu_step_numpy

from helpers import low_rank_problem, record_calls, run_tiled, schedule_shapes

NT = numba.config.NUMBA_NUM_THREADS
RTOL = {np.float32: 2e-4, np.float64: 1e-10}


def rel_err(x, ref):
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "b,m,t",
    [
        (1, 65, 700),  # last tile padded
        (3, 13, 300),  # batching
        (8, 7, 520),
        (4, 4, 33),  # t shorter than one tile
        (2, 65, 64),  # exactly one float32 tile, two float64 tiles
        (1, 1, 5),  # one row
    ],
)
def test_matches_numpy(rng, dtype, b, m, t):
    X, A0, S0 = low_rank_problem(rng, b, m, 4, t, dtype, noise=0.05)
    A, S, (_, _, P, G) = run_tiled(X, A0, S0, n_iter=6)
    Ar, Sr = mu_numpy(X.astype(np.float64), A0.astype(np.float64), S0.astype(np.float64), 6)
    assert A.dtype == dtype and S.dtype == dtype
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]
    assert rel_err(P, X.astype(np.float64) @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    assert rel_err(G, Sr @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", ["problem_major", "block_parallel"])
def test_each_schedule_matches_numpy(monkeypatch, rng, dtype, schedule):
    """Both schedules on any thread count (the shape sized to the threads, at least 8 tiles per
    thread for block-parallel; a spy checks which ran); the second call on the first's state."""
    if schedule == "block_parallel" and NT < 2:
        pytest.skip("with one thread every batch runs problem-major")
    b, t = schedule_shapes(NT, cpu_tiled.tile_width(np.dtype(dtype).itemsize), min_units=8)[schedule]
    calls = record_calls(monkeypatch, cpu_tiled, "_tiled_problem_major", "_tiled_block_parallel")
    X, A0, S0 = low_rank_problem(rng, b, 9, 4, t, dtype, noise=0.05)
    A, S, state = run_tiled(X, A0, S0, n_iter=3)
    A, S, (_, _, P, G) = run_tiled(X, A, S, n_iter=2, state=state)
    assert calls == [f"_tiled_{schedule}"] * 2
    Ar, Sr = mu_numpy(X.astype(np.float64), A0.astype(np.float64), S0.astype(np.float64), 5)
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]
    assert rel_err(P, X.astype(np.float64) @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_padding_stays_zero(rng, dtype):
    X, A0, S0 = low_rank_problem(rng, 2, 9, 4, 70, dtype)
    _, _, (Xt, Sp, _, _) = run_tiled(X, A0, S0, n_iter=4)
    assert Sp.shape[2] > 70
    assert not Sp[:, :, 70:].any()
    assert not Xt.reshape(2, -1, 9, Xt.shape[3])[:, -1, :, 70 - (Xt.shape[1] - 1) * Xt.shape[3]:].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shared", [True, False])
def test_learned_step_with_w(rng, dtype, shared):
    b, m, t = 3, 11, 300
    X, A0, S0 = low_rank_problem(rng, b, m, 4, t, dtype)
    W = (rng.random((1 if shared else b, m, 4)) * 2).astype(dtype)
    A, S, _ = run_tiled(X, A0, S0, W=W, n_iter=1)
    Ar, Sr = mu_step_numpy(*(a.astype(np.float64) for a in (X, A0, S0, W)))
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]


@pytest.mark.parametrize("b", [1, 4])
def test_state_carries_between_calls(rng, b):
    """3 + 4 iterations with the tiled state carried equal 7 in one call (bit for bit)."""
    X, A0, S0 = low_rank_problem(rng, b, 10, 4, 600)
    A7, S7, _ = run_tiled(X, A0, S0, n_iter=7)
    A3, _, state = run_tiled(X, A0, S0, n_iter=3)
    A, S, _ = run_tiled(X, A3, S0, n_iter=4, state=state)  # S0 only gives the output shape here
    np.testing.assert_array_equal(A, A7)
    np.testing.assert_array_equal(S, S7)


def test_zero_iterations_only_computes_pg(rng):
    X, A0, S0 = low_rank_problem(rng, 2, 6, 4, 100)
    A, S, (_, _, P, G) = run_tiled(X, A0, S0, n_iter=0)
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(S, S0)
    np.testing.assert_allclose(P, X @ S0.transpose(0, 2, 1), rtol=1e-12)
    np.testing.assert_allclose(G, S0 @ S0.transpose(0, 2, 1), rtol=1e-12)


def test_without_final_accumulation_factors_agree(rng):
    X, A0, S0 = low_rank_problem(rng, 3, 8, 4, 200)
    A1, S1, _ = run_tiled(X, A0, S0, n_iter=5)
    A2, S2, _ = run_tiled(X, A0, S0, n_iter=5, accumulate_last=False)
    np.testing.assert_array_equal(A1, A2)
    np.testing.assert_array_equal(S1, S2)


def test_deterministic_across_runs(rng):
    X, A0, S0 = low_rank_problem(rng, 1, 65, 4, 3000, np.float32)
    A1, S1, _ = run_tiled(X, A0, S0, n_iter=5)
    A2, S2, _ = run_tiled(X, A0, S0, n_iter=5)
    np.testing.assert_array_equal(A1, A2)
    np.testing.assert_array_equal(S1, S2)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    m=st.integers(1, 12),
    t=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_shape_matches_reference(b, m, t, seed):
    rng = np.random.default_rng(seed)
    X, A0, S0 = low_rank_problem(rng, b, m, 4, t)
    A, S, _ = run_tiled(X, A0, S0, n_iter=3)
    Ar, Sr = mu_numpy(X, A0, S0, 3)
    np.testing.assert_allclose(A, Ar, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(S, Sr, rtol=1e-9, atol=1e-12)
    assert (A >= 0).all() and (S >= 0).all()


def test_aligned_empty():
    for shape, dt in [((3, 5), np.float32), ((1000, 1001), np.float64), ((0,), np.float32)]:
        a = cpu_tiled.aligned_empty(shape, dt)
        assert a.shape == shape and a.dtype == dt and a.flags.c_contiguous
        assert a.size == 0 or a.ctypes.data % 64 == 0


# -- engine choice --------------------------------------------------------------------------


def test_engine_choice_and_switch(rng, monkeypatch):
    X, A0, S0 = low_rank_problem(rng, 2, 6, 4, 100, np.float32)
    eng = CPUEngine(X, A0.copy(), S0.copy(), None, EPS)
    assert eng.kernel == ("tiled" if simd.VECTOR_BYTES == 64 else "blocked")
    tiled = "tiled" if simd.VECTOR_BYTES == 64 else "blocked"
    for n in (1, 3):  # ranks below 4 are padded
        Xn, An, Sn = low_rank_problem(rng, 2, 6, n, 100, np.float32)
        assert CPUEngine(Xn, An, Sn, None, EPS).kernel == tiled
    X5, A5, S5 = low_rank_problem(rng, 2, 6, 5, 100, np.float32)
    assert CPUEngine(X5, A5, S5, None, EPS).kernel == "blocked"
    monkeypatch.setenv("FASTMU_CPU_TILED", "0")
    assert CPUEngine(X, A0.copy(), S0.copy(), None, EPS).kernel == "blocked"


def test_tall_x_runs_the_blocked_kernel_where_its_rows_are_shared_out(rng, monkeypatch):
    """The tiled kernel has no row-parallel schedule: a tall X with too few pixels to share
    out goes to the blocked kernel, even where the tiled one is available (forced here)."""
    import numba

    from fastmu.kernels import cpu

    monkeypatch.setattr(cpu_tiled, "available", lambda n: True)
    Xt, At, St = low_rank_problem(rng, 1, 700, 4, 60, np.float32)
    by_rows = cpu.row_chunks(1, 700, 60, 4, numba.config.NUMBA_NUM_THREADS) > 0
    assert CPUEngine(Xt, At, St, None, EPS).kernel == ("blocked" if by_rows else "tiled")
    Xw, Aw, Sw = low_rank_problem(rng, 2, 6, 4, 100, np.float32)
    assert CPUEngine(Xw, Aw, Sw, None, EPS).kernel == "tiled"
    # one answer for the engine fastmu.mu builds and for those who ask without an X (the
    # benchmark's peers): fastmu.mu runs this tall X on its transpose, a wide X for the kernels
    from fastmu.dispatch import cpu_kernel_for, new_engine

    eng = new_engine(CPUEngine, Xt, At.copy(), St.copy(), None, EPS)
    assert eng.transposed and eng.kernel == "tiled"
    assert cpu_kernel_for(Xt.shape, 4, Xt.dtype) == eng.kernel
    monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", "0")
    assert not new_engine(CPUEngine, Xt, At.copy(), St.copy(), None, EPS).transposed
    assert cpu_kernel_for(Xt.shape, 4, Xt.dtype) == CPUEngine(Xt, At, St, None, EPS).kernel
    assert cpu_kernel_for(Xw.shape, 4, Xw.dtype) == "tiled"


def test_the_benchmark_times_the_variants_only_where_fastmu_does_not_run_them_itself(monkeypatch):
    """The blocked kernel where fastmu's own is the tiled one; X as given where fastmu runs Xᵀ.
    Elsewhere a variant would time the same code as the "fastmu" line."""
    import numba

    from fastmu.benchmarks import mu_cpu
    from fastmu.kernels import cpu

    def listed(name):
        w = mu_cpu.WORKLOADS[name]
        X, A0, S0 = mu_cpu.make_problem(w["b"], w["m"], w["n"], w["t"])
        peers = mu_cpu._peers(X, A0, S0, 2, with_sklearn=False)
        return "fastmu-blocked" in peers, "fastmu-untransposed" in peers

    monkeypatch.setattr(cpu_tiled, "available", lambda n: True)
    assert mu_cpu.workload_transposed("tall") and not mu_cpu.workload_transposed("paper")
    assert mu_cpu.workload_kernel("tall") == "tiled"  # on Xᵀ, the paper's shape
    assert mu_cpu.workload_kernel("paper") == "tiled"
    assert listed("tall") == (True, True)
    assert listed("paper") == (True, False)
    monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", "0")  # the tall X as given: its rows shared out
    w = mu_cpu.WORKLOADS["tall"]
    by_rows = cpu.row_chunks(1, w["m"], w["t"], 4, numba.config.NUMBA_NUM_THREADS) > 0  # not on one thread
    assert mu_cpu.workload_kernel("tall") == ("blocked" if by_rows else "tiled")
    assert listed("tall") == (not by_rows, False)
    monkeypatch.setattr(cpu_tiled, "available", lambda n: False)
    monkeypatch.delenv("FASTMU_CPU_TRANSPOSE")
    assert listed("tall") == (False, True)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_padded_ranks_match_reference(rng, n):
    """Rank n < 4 through the rank-4 kernel: the zero components stay zero, the rest is rank-n MU."""
    X, A0, S0 = low_rank_problem(rng, 3, 10, n, 130, noise=0.05)
    W = rng.random((3, 10, n)) + 0.5
    A4, S4, W4 = cpu.pad_rank(A0, S0, W, 4)
    A, S, (_, _, P, G) = run_tiled(X, A4, S4, W=W4, n_iter=5)
    assert not A[:, :, n:].any() and not S[:, n:].any()
    assert not P[:, :, n:].any() and not G[:, n:].any() and not G[:, :, n:].any()
    Ar, Sr = A0, S0
    for _ in range(5):
        Ar, Sr = mu_step_numpy(X, Ar, Sr, W)
    np.testing.assert_allclose(A[:, :, :n], Ar, rtol=1e-10)
    np.testing.assert_allclose(S[:, :n], Sr, rtol=1e-10)


@pytest.mark.parametrize("tiled", ["1", "0"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_solver_tolerance_and_objective_every_rank(rng, monkeypatch, n, tiled):
    """The objective the tolerance test uses is right whichever kernel (and padding) runs."""
    from fastmu.reference import objective_numpy

    monkeypatch.setenv("FASTMU_CPU_TILED", tiled)
    X, A0, S0 = low_rank_problem(rng, 2, 12, n, 200, noise=0.1)
    eng = CPUEngine(X, A0.copy(), S0.copy(), None, EPS)
    eng.run(7)
    A, S = eng.factors()
    assert A.shape == A0.shape and S.shape == S0.shape and A.flags.c_contiguous
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, A, S), rtol=1e-8)
    A1, S1 = fastmu.mu(X, A0=A0, S0=S0, n_iter=500, tol=1e-5, check_every=10, backend="cpu")
    assert A1.shape == A0.shape and np.isfinite(A1).all() and np.isfinite(S1).all()


def test_padded_rank_policy():
    assert [cpu.padded_rank(n) for n in range(1, 14)] == [4, 4, 4, 4, 5, 8, 8, 8, 9, 12, 12, 12, 13]


@pytest.mark.parametrize("n", [2, 3, 6, 7])
def test_blocked_kernel_at_padded_rank_matches_reference(rng, n):
    X, A0, S0 = low_rank_problem(rng, 2, 11, n, 150, noise=0.05)
    W = rng.random((2, 11, n)) + 0.5
    Ak, Sk, Wk = cpu.pad_rank(A0, S0, W, cpu.padded_rank(n))
    P = np.empty((2, 11, Ak.shape[2]))
    G = np.empty((2, Ak.shape[2], Ak.shape[2]))
    cpu.mu_run(X, Ak, Sk, Wk, P, G, 4, EPS, False, True, NT)
    assert not Ak[:, :, n:].any() and not Sk[:, n:].any()
    Ar, Sr = A0, S0
    for _ in range(4):
        Ar, Sr = mu_step_numpy(X, Ar, Sr, W)
    np.testing.assert_allclose(Ak[:, :, :n], Ar, rtol=1e-10)
    np.testing.assert_allclose(Sk[:, :n], Sr, rtol=1e-10)


def test_engine_skips_copies_when_memory_is_short(rng, monkeypatch):
    """Where a copy of X would take more than half the available memory, run on X itself."""
    import fastmu.dispatch as dispatch

    X, A0, S0 = low_rank_problem(rng, 2, 9, 4, 160)
    buf = np.empty(X.nbytes + 64, np.uint8)
    off = (8 - buf.ctypes.data) % 64
    Xm = buf[off : off + X.nbytes].view(X.dtype).reshape(X.shape)
    Xm[...] = X
    monkeypatch.setattr(dispatch, "_available_memory", lambda: X.nbytes)
    eng = CPUEngine(Xm, A0.copy(), S0.copy(), None, EPS)
    assert eng.kernel == "blocked" and eng.X is Xm
    eng.run(3)
    np.testing.assert_allclose(eng.factors()[1], mu_numpy(X, A0, S0, 3)[1], rtol=1e-10)
    monkeypatch.setattr(dispatch, "_available_memory", lambda: None)  # unknown: copies allowed
    eng = CPUEngine(Xm, A0.copy(), S0.copy(), None, EPS)
    if simd.VECTOR_BYTES == 64:
        assert eng.kernel == "tiled"
    else:
        assert eng.kernel == "blocked" and eng.X is not Xm  # the aligned copy


def test_blocked_engine_aligns_x(rng, monkeypatch):
    """A misaligned X gets an aligned private copy; the caller's X is untouched; same answer."""
    monkeypatch.setenv("FASTMU_CPU_TILED", "0")
    X, A0, S0 = low_rank_problem(rng, 2, 9, 4, 160)
    buf = np.empty(X.nbytes + 64, np.uint8)
    off = (8 - buf.ctypes.data) % 64
    Xm = buf[off : off + X.nbytes].view(X.dtype).reshape(X.shape)
    Xm[...] = X
    eng = CPUEngine(Xm, A0.copy(), S0.copy(), None, EPS)
    assert eng.X.ctypes.data % 64 == 0 and eng.X is not Xm
    eng.run(4)
    A, S = eng.factors()
    Ar, Sr = mu_numpy(X, A0, S0, 4)
    np.testing.assert_allclose(A, Ar, rtol=1e-9)
    np.testing.assert_allclose(S, Sr, rtol=1e-9)
    np.testing.assert_array_equal(Xm, X)


@pytest.mark.parametrize("tiled", ["1", "0"])
def test_solver_same_answer_either_kernel(rng, monkeypatch, tiled):
    """fastmu.mu gives the reference answer through either kernel, with callbacks reading S mid-run."""
    monkeypatch.setenv("FASTMU_CPU_TILED", tiled)
    X, A0, S0 = low_rank_problem(rng, 3, 20, 4, 150)
    seen = []
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=10, backend="cpu", callback=lambda k, A, S: seen.append(S.copy()),
                     callback_every=5)
    Ar, Sr = mu_numpy(X, A0, S0, 10)
    np.testing.assert_allclose(A, Ar, rtol=1e-9)
    np.testing.assert_allclose(S, Sr, rtol=1e-9)
    np.testing.assert_allclose(seen[0], mu_numpy(X, A0, S0, 5)[1], rtol=1e-9)
    np.testing.assert_array_equal(seen[1], S)


# -- SIMD vocabulary ------------------------------------------------------------------------


@numba.njit
def _hsum_first(a):
    return simd.vhsum(simd.vload(a, 0))


@numba.njit
def _axpy_store(a, x, y, out):
    simd.vstore(out, 0, simd.vfma(simd.vsplat(a), simd.vload(x, 0), simd.vload(y, 0)))
    return simd.vlanes(out)


@numba.njit
def _div(x, y, out):
    simd.vstore(out, 0, simd.vdiv(simd.vmul(simd.vload(x, 0), simd.vload(y, 0)), simd.vadd(simd.vload(y, 0),
                                                                                          simd.vload(x, 0))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_simd_lane_ops(dtype):
    w = simd.lanes_for(np.dtype(dtype).itemsize)
    x = (np.arange(w) + 1.5).astype(dtype)
    y = (np.arange(w)[::-1] * 0.25 + 1).astype(dtype)
    out = np.zeros(w + 3, dtype)  # a tail the store must not touch
    assert _axpy_store(dtype(2.0), x, y, out) == w
    np.testing.assert_array_equal(out[:w], 2 * x + y)
    assert not out[w:].any()
    _div(x, y, out)
    np.testing.assert_array_equal(out[:w], (x * y) / (y + x))  # exact IEEE lane-wise


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_simd_hsum_is_pairwise_in_fixed_order(dtype):
    w = simd.lanes_for(np.dtype(dtype).itemsize)
    v = np.random.default_rng(1).standard_normal(w).astype(dtype) * 1e3
    ref = v.copy()
    while ref.size > 1:  # halves added lane-wise, as documented
        ref = ref[: ref.size // 2] + ref[ref.size // 2 :]
    assert _hsum_first(v) == ref[0]


def test_simd_rejects_bad_arrays():
    with pytest.raises(numba.TypingError, match="C-contiguous"):
        _hsum_first(np.ones(64)[::2])
    with pytest.raises(numba.TypingError, match="float32/float64"):
        _hsum_first(np.ones(64, np.int64))
