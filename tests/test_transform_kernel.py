"""``NMF(solver="mu").transform`` on host arrays: the W-only update kernels
(kernels/cpu_transform.py) against the generic loop in NumPy operations, the oracle."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastmu.estimator import _solve_w, _solve_w_generic
from fastmu.penalty import Penalty

PEN = Penalty(0.05, 0.1, 0.0, 0.0)
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _close(got, want, dtype):
    tol = TOL[np.dtype(dtype).type]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def oracle(X, H, max_iter, tol, eps, pen):
    """The generic loop (NumPy operations; what GPU arrays run): W and the updates run."""
    return _solve_w_generic(X, H, max_iter, tol, eps, pen)


def _problem(seed, m, n, f, dtype):
    rng = np.random.default_rng(seed)
    H = rng.random((n, f)) + 0.05
    X = rng.random((m, n)) @ H + 0.05 * rng.random((m, f))
    return X.astype(dtype), H.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,n", [(1300, 4), (700, 1), (1100, 6), (3, 3)])  # 1300: three blocks of ROWS rows
@pytest.mark.parametrize("pen", [Penalty(), PEN], ids=["plain", "penalised"])
def test_kernel_updates_match_the_numpy_loop(dtype, m, n, pen):
    from fastmu.kernels import cpu_transform

    X, H = _problem(m + n, m, n, 40, dtype)
    XHt, HHt = X @ H.T, H @ H.T
    W0 = (np.random.default_rng(1).random((m, n)) + 0.1).astype(dtype)
    W = W0.copy()
    X64, H64 = X.astype(np.float64), H.astype(np.float64)
    XHt64, HHt64 = X64 @ H64.T, H64 @ H64.T
    Wt = np.ascontiguousarray(W.T)
    wx, ww = cpu_transform.mu_w_run(Wt, np.ascontiguousarray(XHt.T), HHt, 1e-9, pen.l1_A, pen.l2_A, 7,
                                    np.ascontiguousarray(XHt64.T), HHt64, True)
    W = Wt.T
    Wr = W0.copy()
    for _ in range(7):
        Wr = Wr * (XHt / (Wr @ HHt + dtype(1e-9) + dtype(pen.l1_A) + dtype(pen.l2_A) * Wr))
    _close(W, Wr, dtype)
    W64 = W.astype(np.float64)
    np.testing.assert_allclose(wx, (W64 * XHt64).sum(), rtol=1e-12)
    np.testing.assert_allclose(ww, ((W64.T @ W64) * HHt64).sum(), rtol=1e-12)
    assert cpu_transform.mu_w_run(Wt, XHt.T.copy(), HHt, 1e-9, 0.0, 0.0, 0, XHt64, HHt64, False) == (0.0, 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("max_iter,tol", [(0, 1e-4), (7, 1e-4), (500, 1e-4), (500, 1e-2), (23, 0.0), (500, 1e-3)])
@pytest.mark.parametrize("pen", [Penalty(), PEN], ids=["plain", "penalised"])
def test_solve_w_stops_where_the_numpy_loop_does(dtype, max_iter, tol, pen):
    X, H = _problem(3, 900, 4, 50, dtype)
    W, it = _solve_w(X, H, max_iter, tol, 1e-9, pen)
    Wr, it_r = oracle(X, H, max_iter, tol, 1e-9, pen)
    assert isinstance(W, np.ndarray) and W.dtype == dtype and W.shape == (900, 4)
    assert it == it_r
    if tol and max_iter == 500:
        assert 10 < it < 500  # the rule stopped it
    _close(W, Wr, dtype)


def test_torch_cpu_tensors_go_through_the_kernel_and_come_back_as_tensors(monkeypatch):
    from fastmu.kernels import cpu_transform
    from tests.helpers import record_calls

    calls = record_calls(monkeypatch, cpu_transform, "mu_w_run")
    X, H = _problem(4, 300, 3, 20, np.float64)
    W, it = _solve_w(torch.from_numpy(X), torch.from_numpy(H), 200, 1e-4, 1e-9, Penalty())
    Wr, it_r = oracle(X, H, 200, 1e-4, 1e-9, Penalty())
    assert calls and isinstance(W, torch.Tensor) and it == it_r
    _close(W.numpy(), Wr, np.float64)


def test_estimator_transform_matches_scikit_learn_and_runs_the_kernel(monkeypatch):
    sk = pytest.importorskip("sklearn.decomposition")
    from sklearn.exceptions import ConvergenceWarning

    from fastmu import NMF
    from fastmu.kernels import cpu_transform
    from tests.helpers import record_calls

    X, _ = _problem(5, 200, 4, 30, np.float64)
    X_new, _ = _problem(6, 150, 4, 30, np.float64)
    kw = dict(n_components=4, solver="mu", init="random", random_state=0, tol=1e-2, max_iter=300)
    ours, theirs = NMF(**kw).fit(X), sk.NMF(**kw).fit(X)
    ours.components_ = theirs.components_.copy()  # the same H: transform alone compared
    for m in (ours, theirs):
        m.set_params(tol=1e-4, max_iter=5000)
    calls = record_calls(monkeypatch, cpu_transform, "mu_w_run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # stopped by tol, before max_iter
        np.testing.assert_allclose(ours.transform(X_new), theirs.transform(X_new), rtol=1e-9, atol=1e-12)
    assert calls
