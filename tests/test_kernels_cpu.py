"""The fused Numba CPU kernels against the plain NumPy reference."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmu import EPS
from fastmu.kernels import cpu
from fastmu.reference import mu_numpy, mu_step_numpy, objective_numpy

from helpers import low_rank_problem, record_calls, schedule_shapes

NT = numba.config.NUMBA_NUM_THREADS
# Relative tolerance after a few iterations: float32 rounding grows a little
# with each iteration, float64 stays near machine precision.
RTOL = {np.float32: 2e-4, np.float64: 1e-10}


def run(X, A, S, W=None, n_iter=1, pg=None):
    b, m, t = X.shape
    n = A.shape[2]
    A, S = A.copy(), S.copy()
    W = np.ones((1, m, n), X.dtype) if W is None else W
    P = np.empty((b, m, n), X.dtype) if pg is None else pg[0]
    G = np.empty((b, n, n), X.dtype) if pg is None else pg[1]
    cpu.mu_run(X, A, S, W, P, G, n_iter, EPS, pg is not None, True, NT)
    return A, S, P, G


def rel_err(x, ref):
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "b,m,n,t",
    [
        (1, 65, 4, 700),  # t not a multiple of the block
        (3, 13, 4, 300),  # batching, m off the 4-row tiles
        (8, 7, 3, 520),  # m, n off the 4×4 register blocks
        (2, 9, 5, 256),  # n past one 4-block
        (4, 4, 1, 33),  # rank one, t shorter than a block
    ],
)
def test_mu_run_matches_numpy(rng, dtype, b, m, n, t):
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, dtype, noise=0.05)
    A, S, P, G = run(X, A0, S0, n_iter=6)
    Ar, Sr = mu_numpy(X.astype(np.float64), A0.astype(np.float64), S0.astype(np.float64), 6)
    assert A.dtype == dtype and S.dtype == dtype
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]
    # P and G are returned for the final S.
    assert rel_err(P, X.astype(np.float64) @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    assert rel_err(G, Sr @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", ["problem_major", "block_parallel"])
def test_each_column_schedule_matches_numpy(monkeypatch, rng, dtype, schedule):
    """Both column schedules on any thread count: the shape is sized to the threads, a spy
    checks which compiled schedule ran; two calls, the second on the first's P, G."""
    if schedule == "block_parallel" and NT < 2:
        pytest.skip("with one thread every batch runs problem-major")
    m, n = 13, 4
    b, t = schedule_shapes(NT, cpu.block_length(m, np.dtype(dtype).itemsize))[schedule]
    calls = record_calls(monkeypatch, cpu, "_mu_problem_major", "_mu_block_parallel")
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, dtype, noise=0.05)
    A, S, P, G = run(X, A0, S0, n_iter=3)
    A, S, P, G = run(X, A, S, n_iter=2, pg=(P, G))
    assert calls == [f"_mu_{schedule}"] * 2
    Ar, Sr = mu_numpy(X.astype(np.float64), A0.astype(np.float64), S0.astype(np.float64), 5)
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]
    assert rel_err(P, X.astype(np.float64) @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    assert rel_err(G, Sr @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]


def test_block_length_keeps_a_block_in_l2():
    assert cpu.block_length(65, 4) == 1024  # the paper's shape: 266 kB
    assert cpu.block_length(65, 8) == 1024
    assert cpu.block_length(300, 8) == 256  # 614 kB
    assert cpu.block_length(100_000, 8) == 64  # never below 64 pixels


@pytest.mark.parametrize("b", [3, 4])
def test_tall_x_uses_short_blocks(rng, b):
    """m = 300 float64: 256-pixel blocks, t = 700 spans three (the last one short); problem-major
    (b = 4) and, on two threads, block-parallel (b = 3; with more threads its rows are shared out)."""
    X, A0, S0 = low_rank_problem(rng, b, 300, 3, 700, np.float64, noise=0.05)
    A, S, P, G = run(X, A0, S0, n_iter=4)
    Ar, Sr = mu_numpy(X, A0, S0, 4)
    assert rel_err(A, Ar) < RTOL[np.float64]
    assert rel_err(S, Sr) < RTOL[np.float64]
    assert rel_err(P, X @ Sr.transpose(0, 2, 1)) < 10 * RTOL[np.float64]


# Tall problems (many rows, few pixels): the rows are shared out (cpu.row_chunks). nthreads is
# at least the real thread count (it sizes per-thread scratch), and four times it.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# (1, 400, 4, 600): three pixel units of the S half; (1, 128, 4, 3000): two chunks (the 64-row
# minimum) of three column blocks each
@pytest.mark.parametrize("b,m,n,t", [(1, 700, 4, 60), (3, 900, 5, 40), (1, 650, 1, 130), (1, 400, 4, 600),
                                     (1, 128, 4, 3000)])
@pytest.mark.parametrize("scale", [1, 4])
def test_tall_x_shares_out_rows(rng, dtype, b, m, n, t, scale):
    nthreads = scale * max(2, NT)
    assert cpu.row_chunks(b, m, t, np.dtype(dtype).itemsize, nthreads) >= 2  # the schedule under test
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, dtype, noise=0.05)
    W = (0.5 + rng.random((b, m, n))).astype(dtype)
    Ar, Sr = A0.astype(np.float64), S0.astype(np.float64)
    for _ in range(6):  # the learned step (W): the A update scaled
        Ar, Sr = mu_step_numpy(X.astype(np.float64), Ar, Sr, W.astype(np.float64))

    def call(A, S, P, G, k, pg_valid, acc_last=True):
        cpu.mu_run(X, A, S, W, P, G, k, EPS, pg_valid, acc_last, nthreads)

    A, S = A0.copy(), S0.copy()
    P, G = np.empty((b, m, n), dtype), np.empty((b, n, n), dtype)
    call(A, S, P, G, 0, False)  # no iteration: P, G of the start
    np.testing.assert_array_equal(A, A0)
    assert rel_err(P, X.astype(np.float64) @ S0.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    call(A, S, P, G, 2, True)
    call(A, S, P, G, 4, True)  # P, G carried: the same run as 6 in one call, bit for bit
    A6, S6 = A0.copy(), S0.copy()
    call(A6, S6, np.empty_like(P), np.empty_like(G), 6, False, acc_last=False)
    np.testing.assert_array_equal(A, A6)
    np.testing.assert_array_equal(S, S6)
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]
    assert rel_err(P, X.astype(np.float64) @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]
    assert rel_err(G, Sr @ Sr.transpose(0, 2, 1)) < 10 * RTOL[dtype]


def test_row_chunks_leaves_wide_batched_and_tiny_problems_to_the_column_schedules():
    assert cpu.row_chunks(1, 16384, 65, 4, 2) == 10  # 4.3 MB of X: ten 426 kB chunks
    assert cpu.row_chunks(1, 16384, 65, 4, 8) == 16  # two per thread
    assert cpu.row_chunks(1, 65, 16384, 4, 2) == 0  # wide: column blocks
    assert cpu.row_chunks(4, 16384, 65, 4, 2) == 0  # a multiple of the threads: problem-major
    assert cpu.row_chunks(1, 200, 100, 4, 2) == 0  # too little work
    assert cpu.row_chunks(1, 16384, 65, 4, 1) == 0  # one thread


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shared", [True, False])
def test_learned_step_with_w(rng, dtype, shared):
    b, m, n, t = 3, 11, 4, 300
    X, A0, S0 = low_rank_problem(rng, b, m, n, t, dtype)
    W = (rng.random((1 if shared else b, m, n)) * 2).astype(dtype)
    A, S, _, _ = run(X, A0, S0, W=W, n_iter=1)
    Ar, Sr = mu_step_numpy(*(a.astype(np.float64) for a in (X, A0, S0, W)))
    assert rel_err(A, Ar) < RTOL[dtype]
    assert rel_err(S, Sr) < RTOL[dtype]


@pytest.mark.parametrize("b", [1, 4])
def test_pg_carry_between_calls(rng, b):
    """3 + 4 iterations with P, G carried equal 7 in one call (bit for bit)."""
    X, A0, S0 = low_rank_problem(rng, b, 10, 4, 600)
    A7, S7, _, _ = run(X, A0, S0, n_iter=7)
    A3, S3, P, G = run(X, A0, S0, n_iter=3)
    A, S, _, _ = run(X, A3, S3, n_iter=4, pg=(P, G))
    np.testing.assert_array_equal(A, A7)
    np.testing.assert_array_equal(S, S7)


def test_zero_iterations_only_computes_pg(rng):
    X, A0, S0 = low_rank_problem(rng, 2, 6, 3, 100)
    A, S, P, G = run(X, A0, S0, n_iter=0)
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(S, S0)
    np.testing.assert_allclose(P, X @ S0.transpose(0, 2, 1), rtol=1e-12)


def test_objective_from_pg(rng):
    X, A0, S0 = low_rank_problem(rng, 3, 12, 4, 400, noise=0.1)
    A, S, P, G = run(X, A0, S0, n_iter=5)
    out = np.empty(3)
    cpu.objective_from_pg(np.einsum("bij,bij->b", X, X), A, P, G, out)
    np.testing.assert_allclose(out, objective_numpy(X, A, S), rtol=1e-8)


def test_deterministic_across_runs(rng):
    X, A0, S0 = low_rank_problem(rng, 1, 65, 4, 3000, np.float32)
    A1, S1, _, _ = run(X, A0, S0, n_iter=5)
    A2, S2, _, _ = run(X, A0, S0, n_iter=5)
    np.testing.assert_array_equal(A1, A2)
    np.testing.assert_array_equal(S1, S2)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    m=st.integers(1, 12),
    n=st.integers(1, 6),
    t=st.integers(1, 600),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_shape_matches_reference(b, m, n, t, seed):
    rng = np.random.default_rng(seed)
    X, A0, S0 = low_rank_problem(rng, b, m, n, t)
    A, S, _, _ = run(X, A0, S0, n_iter=3)
    Ar, Sr = mu_numpy(X, A0, S0, 3)
    np.testing.assert_allclose(A, Ar, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(S, Sr, rtol=1e-9, atol=1e-12)
    assert (A >= 0).all() and (S >= 0).all()


def _zmm_status_in_subprocess(env_extra):
    import json
    import os
    import subprocess
    import sys

    code = ("import json, numba.core.config as c, fastmu.kernels.cpu\n"
            "from fastmu.kernels.cpu_target import status\n"
            "print(json.dumps([status(), c.CPU_FEATURES]))")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMU_CPU_ZMM", "NUMBA_CPU_FEATURES")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_512bit_vector_preference_rules():
    import llvmlite.binding as ll

    st, feats = _zmm_status_in_subprocess({})
    if ll.get_host_cpu_features().get("avx512f", False):
        assert st["active"] is True and feats.endswith(",-prefer-256-bit")
    else:
        assert st["active"] is False and "AVX-512" in st["reason"] and feats is None
    st, feats = _zmm_status_in_subprocess({"FASTMU_CPU_ZMM": "0"})
    assert st["active"] is False and "FASTMU_CPU_ZMM" in st["reason"] and feats is None
    st, feats = _zmm_status_in_subprocess({"NUMBA_CPU_FEATURES": "+avx2"})
    assert st["active"] is False and feats == "+avx2"  # the user's choice is kept


def test_512bit_preference_skipped_after_numba_compiled_something():
    import subprocess
    import sys

    code = ("import numba\n@numba.njit\ndef f(x):\n    return x + 1\nf(1)\n"
            "import fastmu.kernels.cpu\nfrom fastmu.kernels.cpu_target import status\nprint(status()['reason'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "already" in out.stdout or "AVX-512" in out.stdout
