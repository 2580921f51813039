"""A tall X too large for the CUDA kernels runs on its transpose (fastmu.transposed), in the simulator.

Run with the CUDA simulator::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/test_cuda_sim_transposed.py

The kernels' shared-memory budget is lowered so that a few hundred rows do
not fit as given (the simulator runs every thread in Python: real limits
need thousands of rows, minutes here).
"""
from __future__ import annotations

import pytest

from helpers import TINY_CUDA_BLOCKS, require_cudasim

pytestmark = pytest.mark.cudasim

require_cudasim()

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

import fastmu  # noqa: E402
from fastmu.penalty import Penalty  # noqa: E402
from fastmu.reference import mu_numpy, mu_step_numpy, objective_numpy  # noqa: E402

kc = pytest.importorskip("fastmu.kernels.cuda")
kt = pytest.importorskip("fastmu.kernels.cuda_transposed")

TOL = {np.float32: 2e-4, np.float64: 1e-11}
PEN = Penalty(0.01, 0.02, 0.03, 0.04)
#: shared-memory budgets (bytes) in which 128 rows at rank 3 do not fit with 32 threads, and 10 do
SMALL_SHARED = {np.float64: 10 * 1024, np.float32: 6 * 1024}


@pytest.fixture(autouse=True)
def _tiny_blocks_and_shared_memory(monkeypatch):
    saved = kc.get_config()
    kc.set_config(**TINY_CUDA_BLOCKS)
    monkeypatch.setattr(kc, "_SHARED_LIMIT", SMALL_SHARED[np.float64])
    yield
    kc.set_config(**saved)


def _budget(monkeypatch, dtype):
    monkeypatch.setattr(kc, "_SHARED_LIMIT", SMALL_SHARED[dtype])


def _close(got, want, dtype):
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def _problem(dtype, b=1, m=128, t=10, n=3, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.random((b, m, n)) @ rng.random((b, n, t)) + 0.05 * rng.random((b, m, t))).astype(dtype)
    A0 = (rng.random((b, m, n)) + 0.1).astype(dtype)
    S0 = (rng.random((b, n, t)) + 0.1).astype(dtype)
    return X, A0, S0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("penalty", [None, PEN])
def test_a_tall_x_that_does_not_fit_runs_on_its_transpose_with_mus_iterates(monkeypatch, dtype, penalty):
    from fastmu.transposed import cuda_transposes

    _budget(monkeypatch, dtype)
    X, A0, S0 = _problem(dtype, b=2 if penalty is None else 1)
    with pytest.raises(ValueError, match="shared memory"):
        kc.choose_staging(dtype, 128, 3)  # as given it would not run
    assert cuda_transposes(X.shape, 3, dtype)
    kw = {} if penalty is None else penalty._asdict()
    A, S, done = fastmu.mu(X, A0=A0, S0=S0, n_iter=4, backend="cuda", return_n_iter=True, **kw)
    assert done == 4 and A.dtype == S.dtype == dtype
    Ar, Sr = mu_numpy(*(a.astype(np.float64) for a in (X, A0, S0)), 4, penalty=penalty)
    _close(A, Ar, dtype)
    _close(S, Sr, dtype)


def test_slices_tol_and_callbacks_see_mus_iterates():
    X, A0, S0 = _problem(np.float64)
    seen = []
    A, S, done = fastmu.mu(X, A0=A0, S0=S0, n_iter=6, backend="cuda", return_n_iter=True, tol=1e-300,
                           check_every=2, callback=lambda k, A, S: seen.append((k, objective_numpy(X, A, S))),
                           callback_every=3)
    assert done == 6 and [k for k, _ in seen] == [3, 6]
    A_i, S_i = A0.astype(np.float64), S0.astype(np.float64)
    want = []
    for k in range(1, 7):
        A_i, S_i = mu_step_numpy(X, A_i, S_i)
        if k % 3 == 0:
            want.append(objective_numpy(X, A_i, S_i))
    np.testing.assert_allclose([f for _, f in seen], want, rtol=1e-10)
    _close(A, A_i, np.float64)
    _close(S, S_i, np.float64)


def test_objective_is_measured_at_the_factors_returned(monkeypatch):
    from fastmu.cuda_engine import CUDAEngine
    from fastmu.dispatch import new_engine

    _budget(monkeypatch, np.float32)
    X, A0, S0 = _problem(np.float32)
    d = cuda.to_device
    eng = new_engine(CUDAEngine, d(X), d(A0), d(S0), None, 1e-12)
    assert eng.transposed
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, A0, S0), rtol=1e-5)
    for k in (0, 1, 2):
        eng.run(k)
        A, S = (a.copy_to_host() for a in eng.factors())
        np.testing.assert_allclose(eng.objective(), objective_numpy(X, A, S), rtol=1e-5)


def test_what_fits_as_given_is_not_transposed_and_the_switch_turns_it_off(monkeypatch):
    from fastmu.transposed import cuda_transposes

    assert not cuda_transposes((1, 10, 5), 3, np.float64)  # fits as given
    assert cuda_transposes((1, 128, 10), 3, np.float64)
    assert not cuda_transposes((1, 128, 10), 3, np.float64, learned=True)
    assert not cuda_transposes((1, 400, 256), 3, np.float64)  # neither orientation fits
    monkeypatch.setenv("FASTMU_CPU_TRANSPOSE", "0")
    assert not cuda_transposes((1, 128, 10), 3, np.float64)
    X, A0, S0 = _problem(np.float64)
    with pytest.raises(ValueError, match="factorise Xᵀ"):
        fastmu.mu(X, A0=A0, S0=S0, n_iter=1, backend="cuda")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_half_step_kernels_match_numpy(dtype):
    X, A0, S0 = _problem(dtype, b=2, m=40, t=9, n=5)
    d = cuda.to_device
    out = cuda.device_array(A0.shape, dtype)
    kt.a_half_step(d(X), d(A0), d(S0), 1e-12, tuple(PEN), out)
    Ar, _ = mu_step_numpy(*(a.astype(np.float64) for a in (X, A0, S0)), penalty=PEN)
    _close(out.copy_to_host(), Ar, dtype)
    P = (X.astype(np.float64) @ S0.transpose(0, 2, 1)).astype(dtype)
    G = (S0.astype(np.float64) @ S0.transpose(0, 2, 1)).astype(dtype)
    kt.a_update_from_pg(d(A0), d(P), d(G), 1e-12, tuple(PEN), out)
    A64 = A0.astype(np.float64)
    want = A64 * P / (A64 @ (G + PEN.l2_A * np.eye(5)) + 1e-12 + PEN.l1_A)
    _close(out.copy_to_host(), want, dtype)
    Y = cuda.device_array((2, 9, 40), dtype)
    kt.transpose(d(X), Y)
    np.testing.assert_array_equal(Y.copy_to_host(), X.transpose(0, 2, 1))
