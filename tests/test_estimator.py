"""fastmu.NMF, the scikit-learn-style estimator: the scikit-learn contract, agreement with
``sklearn.decomposition.NMF(solver="mu")`` (same start, same updates, same stopping rule),
array kinds in and out, and bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastmu
from fastmu import NMF

sk = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.decomposition import NMF as SkNMF  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402


def _data(n_samples=120, n_features=30, rank=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.random((n_samples, rank)) @ rng.random((rank, n_features)) + 0.01 * rng.random((n_samples, n_features))
    return X.astype(dtype)


def test_passes_check_estimator():
    """scikit-learn's estimator checks, except the two that scikit-learn's own
    NMF(solver="mu") fails in the same way: transform restarts W from a constant, and on
    the checks' tiny random data multiplicative updates reach another W than fit_transform's."""
    from sklearn.utils.estimator_checks import check_estimator

    why = "scikit-learn's NMF(solver='mu') fails it too (transform restarts W from a constant)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = check_estimator(NMF(n_components=2, max_iter=400), on_fail=None, expected_failed_checks={
            "check_transformer_general": why, "check_transformer_data_not_an_array": why})
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in res if r["status"] == "failed"]
    assert failed == []
    assert sum(r["status"] == "passed" for r in res) >= 40


@pytest.mark.parametrize("init", ["random", None])
@pytest.mark.parametrize("shape", [(30, 120), (120, 30)])
def test_matches_scikit_learn_mu(init, shape):
    """Same start (scikit-learn's random draw for an integer seed; its NNDSVDa by default),
    same updates, same tol rule: W, H, the iteration count and the error agree. A tall X
    (more samples than features) runs on Xᵀ, where the tol checks fall half an
    iteration later: its iteration count may differ by one check."""
    X = _data(*shape)
    kw = dict(n_components=3, init=init, random_state=0, tol=1e-3, max_iter=400)
    ours = NMF(**kw)
    theirs = SkNMF(solver="mu", **kw)
    W = ours.fit_transform(X)
    W_sk = theirs.fit_transform(X)
    assert theirs.n_iter_ < 400
    if shape[0] <= shape[1]:
        assert ours.n_iter_ == theirs.n_iter_
    else:
        assert abs(ours.n_iter_ - theirs.n_iter_) <= 10
        ours.set_params(tol=0, max_iter=theirs.n_iter_)
        W = ours.fit_transform(X)  # the same iterates, step for step
        ours.set_params(**kw)
    np.testing.assert_allclose(W, W_sk, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.components_, theirs.components_, rtol=1e-6, atol=1e-9)
    assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_, rel=1e-9)
    X_new = _data(*shape, seed=1)
    np.testing.assert_allclose(ours.transform(X_new), theirs.transform(X_new), rtol=1e-6, atol=1e-9)
    # five updates of W alone, far from converged: the same start and the same steps
    for m in (ours, theirs):
        m.set_params(tol=0, max_iter=5)
    np.testing.assert_allclose(ours.transform(X_new), theirs.transform(X_new), rtol=1e-9)
    np.testing.assert_allclose(ours.inverse_transform(W), theirs.inverse_transform(W_sk), rtol=1e-6, atol=1e-9)


def test_custom_start_and_auto_rank():
    X = _data()
    rng = np.random.default_rng(5)
    W0, H0 = rng.random((X.shape[0], 4)), rng.random((4, X.shape[1]))
    W0_copy = W0.copy()
    ours = NMF(n_components="auto", init="custom", tol=0, max_iter=30)
    W = ours.fit_transform(X, W=W0, H=H0)
    theirs = SkNMF(n_components="auto", init="custom", solver="mu", tol=0, max_iter=30)
    W_sk = theirs.fit_transform(X, W=W0.copy(), H=H0.copy())
    assert ours.n_components_ == 4 and ours.n_iter_ == 30
    np.testing.assert_allclose(W, W_sk, rtol=1e-8)
    np.testing.assert_array_equal(W0, W0_copy)  # the start is not modified


def test_torch_in_torch_out_float32_kept():
    torch = pytest.importorskip("torch")
    X = torch.from_numpy(_data(dtype=np.float32))
    model = NMF(n_components=3, init="random", random_state=0, max_iter=300)
    W = model.fit_transform(X)
    assert isinstance(W, torch.Tensor) and isinstance(model.components_, torch.Tensor)
    assert W.dtype == torch.float32 and model.components_.dtype == torch.float32
    Wt = model.transform(X)
    assert isinstance(Wt, torch.Tensor) and Wt.dtype == torch.float32
    assert isinstance(model.inverse_transform(Wt), torch.Tensor)
    assert model.reconstruction_err_ / float(torch.linalg.norm(X)) < 0.05
    ref = NMF(n_components=3, init="random", random_state=0, max_iter=300).fit(X.numpy())
    np.testing.assert_allclose(model.components_.numpy(), ref.components_, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="same kind"):
        model.transform(X.numpy())


def test_objective_decreases_with_iterations_and_tol_stops_early():
    X = _data(seed=3)
    errs = [NMF(3, init="random", random_state=0, tol=0, max_iter=k).fit(X).reconstruction_err_
            for k in (1, 5, 20, 80)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert NMF(3, init="random", random_state=0, tol=1e-2, max_iter=500).fit(X).n_iter_ < 500


def test_convergence_warning_and_clone():
    X = _data()
    with pytest.warns(ConvergenceWarning, match="Maximum number of iterations 5"):
        NMF(3, init="random", random_state=0, tol=1e-12, max_iter=5).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NMF(3, init="random", random_state=0, tol=0, max_iter=5).fit(X)  # tol = 0: no warning
    model = NMF(3, init="random", random_state=7, backend="cpu")
    twin = clone(model)
    assert twin.get_params() == model.get_params() and twin is not model
    assert list(model.fit(X).get_feature_names_out()) == ["nmf0", "nmf1", "nmf2"]


def test_bad_input():
    X = _data()
    with pytest.raises(NotFittedError):
        NMF(2).transform(X)
    with pytest.raises(ValueError, match="solver='mu' only"):
        NMF(2, solver="cd").fit(X)
    with pytest.raises(ValueError, match="frobenius"):
        NMF(2, beta_loss="kullback-leibler").fit(X)
    with pytest.raises(ValueError, match="init must be one of"):
        NMF(2, init="nndsvdar").fit(X)
    for nc in (0, -1, 2.5, True, "all"):
        with pytest.raises(ValueError, match="n_components"):
            NMF(nc).fit(X)
    for it in (0, 1.5, None):
        with pytest.raises(ValueError, match="max_iter"):
            NMF(2, max_iter=it).fit(X)
    for tol in (-1.0, float("nan"), "1e-4"):
        with pytest.raises(ValueError, match="tol"):
            NMF(2, tol=tol).fit(X)
    with pytest.raises(ValueError, match="Negative values in data passed to NMF"):
        NMF(2).fit(X - 1.0)
    with pytest.raises(ValueError, match="NaN|infinity"):
        NMF(2).fit(np.where(X > 0.9, np.nan, X))
    with pytest.raises(ValueError, match="dim 3|2-D"):
        NMF(2).fit(X[None])
    scipy_sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match="sparse"):
        NMF(2).fit(scipy_sparse.csr_matrix(X))
    for shape in ((120, 30), (30, 120)):  # the direct path and the tall one check the start alike
        Xs = _data(*shape)
        good_W, good_H = np.ones((shape[0], 2)), np.ones((2, shape[1]))
        custom = NMF(2, init="custom", max_iter=5)
        with pytest.raises(ValueError, match=r"W has shape \(3, 2\)"):
            custom.fit(Xs, W=np.ones((3, 2)), H=good_H)
        with pytest.raises(ValueError, match="H has shape"):
            custom.fit(Xs, W=good_W, H=np.ones((3, shape[1])))
        with pytest.raises(ValueError, match="H must be finite and non-negative"):
            custom.fit(Xs, W=good_W, H=-good_H)
        with pytest.raises(ValueError, match="W must be finite"):
            custom.fit(Xs, W=good_W * np.nan, H=good_H)
    with pytest.raises(ValueError, match="needs both W and H"):
        NMF(2, init="custom").fit(X)
    with pytest.raises(ValueError, match="only with init='custom'"):
        NMF(2, init="random").fit(X, W=np.ones((X.shape[0], 2)), H=np.ones((2, X.shape[1])))
    model = NMF(2, init="random", random_state=0, max_iter=20, tol=0).fit(X)
    with pytest.raises(ValueError, match="features"):
        model.transform(X[:, :-1])
    with pytest.raises(ValueError, match="shape"):
        model.inverse_transform(np.ones((4, 3)))


def test_estimator_is_exported_lazily():
    assert fastmu.NMF is NMF
    assert "NMF" in fastmu.__all__
