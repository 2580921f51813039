"""fastmu.NMF, the scikit-learn-style estimator: the scikit-learn contract, agreement with
``sklearn.decomposition.NMF(solver="mu")`` and ``NMF(solver="cd")`` (same start, same
updates, same stopping rule), array kinds in and out, and bad input."""
from __future__ import annotations

import copy
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


@pytest.mark.filterwarnings("ignore:The multiplicative update:UserWarning")  # init="nndsvd", both
@pytest.mark.parametrize("init", ["random", None, "nndsvd", "nndsvdar"])
@pytest.mark.parametrize("shape", [(30, 120), (120, 30)])
def test_matches_scikit_learn_mu(init, shape):
    """Same start (scikit-learn's random draw for an integer seed; its NNDSVDa by default, and
    its other NNDSVD starts, from an exact SVD where scikit-learn's is randomized),
    same updates, same tol rule: W, H, the iteration count and the error agree, in
    either orientation (the CPU engine runs a tall X on Xᵀ with the checks where
    scikit-learn has them: fastmu.transposed)."""
    X = _data(*shape)
    kw = dict(n_components=3, init=init, random_state=0, tol=1e-3, max_iter=1000)  # nndsvdar: 420-610
    ours = NMF(**kw)
    theirs = SkNMF(solver="mu", **kw)
    W = ours.fit_transform(X)
    W_sk = theirs.fit_transform(X)
    assert theirs.n_iter_ < 1000
    assert ours.n_iter_ == theirs.n_iter_
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


@pytest.mark.parametrize("init", ["random", None])
def test_tall_x_off_the_cpu_engine_runs_on_its_transpose_with_checks_half_an_iteration_later(init):
    """The torch engine (and the GPU's) gets a tall X as Xᵀ from the estimator itself
    (NMF._fit_tall): the same iterates, the tol checks half an iteration later, so the
    count may differ by one check; run for scikit-learn's count, W and H agree."""
    X = _data(120, 30)
    kw = dict(n_components=3, init=init, random_state=0, tol=1e-3, max_iter=1000)
    ours = NMF(backend="torch", **kw)
    theirs = SkNMF(solver="mu", **kw)
    ours.fit(X)
    W_sk = theirs.fit_transform(X)
    assert abs(ours.n_iter_ - theirs.n_iter_) <= 10
    ours.set_params(tol=0, max_iter=theirs.n_iter_)
    W = ours.fit_transform(X)  # the same iterates, step for step
    np.testing.assert_allclose(W, W_sk, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.components_, theirs.components_, rtol=1e-6, atol=1e-9)


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
    for solver in ("pg", "CD", None):
        with pytest.raises(ValueError, match="solver must be one of"):
            NMF(2, solver=solver).fit(X)
    for shuffle in ("yes", 1, None):
        with pytest.raises(ValueError, match="shuffle must be a bool"):
            NMF(2, solver="cd", shuffle=shuffle).fit(X)
    with pytest.raises(ValueError, match="frobenius"):
        NMF(2, beta_loss="kullback-leibler").fit(X)
    for init in ("nndsvdx", "svd", "NNDSVDA", 1):
        with pytest.raises(ValueError, match="init must be one of"):
            NMF(2, init=init).fit(X)
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


# -- solver="cd" -----------------------------------------------------------------------------

@pytest.fixture
def one_torch_thread():
    """solver="cd" runs on torch, a few small products per component: on these tiny problems
    a second torch thread only adds synchronisation (on a busy 2-core machine, milliseconds
    per product)."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fit_both(kw, X, start=None):
    """fastmu.NMF and scikit-learn's NMF with the same parameters, fitted on X (from ``start``
    = (W, H) with init="custom"); ConvergenceWarnings at max_iter are wanted here. A
    RandomState is copied, so that each estimator draws from its own."""
    ours, theirs = NMF(**kw), SkNMF(**copy.deepcopy(kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if start is None:
            W, W_sk = ours.fit_transform(X), theirs.fit_transform(X)
        else:
            W = ours.fit_transform(X, W=start[0], H=start[1])
            W_sk = theirs.fit_transform(X, W=start[0].copy(), H=start[1].copy())
    return ours, theirs, W, W_sk


def _close(a, b, dtype):
    """Equal to rounding: tight in float64, float32's few ulps per update otherwise (relative
    to the largest entry)."""
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))


@pytest.mark.usefixtures("one_torch_thread")
def test_passes_check_estimator_cd():
    """With solver="cd" every check passes, as for scikit-learn's own NMF(solver="cd"): its
    transform (coordinate descent on W from zeros) reaches fit_transform's W."""
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = check_estimator(NMF(n_components=2, max_iter=400, solver="cd"), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in res if r["status"] == "failed"]
    assert failed == []
    assert sum(r["status"] == "passed" for r in res) >= 40


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("init", ["custom", "random", None])
@pytest.mark.parametrize("shape", [(30, 120), (120, 30)])
def test_matches_scikit_learn_cd(shape, init, dtype):
    """Same start (W, H given; scikit-learn's random draw for an integer seed; NNDSVDa by
    default), same sweeps, same stopping rule, in both orientations (X as given, no
    transposed run): W, H, n_iter_, reconstruction_err_ and transform agree, for a few fixed
    iteration counts and with tol. float32: scikit-learn sums the stopping rule's violation in
    float32, fastmu in float64, so the iteration count may differ by one there."""
    X = _data(*shape, dtype=dtype)
    start = None
    if init == "custom":
        rng = np.random.default_rng(1)
        start = rng.random((shape[0], 3)).astype(dtype), rng.random((3, shape[1])).astype(dtype)
    X_new = _data(*shape, seed=1, dtype=dtype)
    for tol, max_iter in ((0, 1), (0, 7), (0, 40), (1e-4, 3000)):
        kw = dict(n_components=3, solver="cd", init=init, random_state=0, tol=tol, max_iter=max_iter)
        ours, theirs, W, W_sk = _fit_both(kw, X, start)
        assert W.dtype == dtype and ours.components_.dtype == dtype
        if tol == 0:
            assert ours.n_iter_ == theirs.n_iter_ == max_iter
        else:
            assert 1 < theirs.n_iter_ < max_iter
            if dtype == np.float64:
                assert ours.n_iter_ == theirs.n_iter_
            else:
                assert abs(ours.n_iter_ - theirs.n_iter_) <= 1
                if ours.n_iter_ != theirs.n_iter_:  # the same iterates, to scikit-learn's count
                    ours, _, W, _ = _fit_both(dict(kw, tol=0, max_iter=theirs.n_iter_), X, start)
                    ours.set_params(**kw)
        _close(W, W_sk, dtype)
        _close(ours.components_, theirs.components_, dtype)
        assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_,
                                                         rel=1e-5 if dtype == np.float32 else 1e-10)
        # transform: W alone from zeros, scikit-learn's rule on W's sweeps (in float32 with tol,
        # its count may differ by one, as fit's)
        if max_iter == 7 or (tol > 0 and dtype == np.float64):
            _close(ours.transform(X_new), theirs.transform(X_new), dtype)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("init", ["nndsvd", "nndsvdar"])
@pytest.mark.parametrize("shape", [(30, 120), (120, 30)])
def test_cd_from_the_other_nndsvd_starts_matches_scikit_learn(shape, init, dtype):
    """CD updates NNDSVD's zeros; from scikit-learn's starts (nndsvdar: the same fill for the
    same seed) the iterates agree. Fixed iteration counts only: from these starts CD converges
    slowly (over 3000 iterations at tol=1e-4), so in float32 the iteration at which the stopping
    rule fires depends on rounding."""
    X = _data(*shape, dtype=dtype)
    for max_iter in (1, 7, 40):
        kw = dict(n_components=3, solver="cd", init=init, random_state=0, tol=0, max_iter=max_iter)
        ours, theirs, W, W_sk = _fit_both(kw, X, None)
        assert ours.n_iter_ == theirs.n_iter_ == max_iter
        _close(W, W_sk, dtype)
        _close(ours.components_, theirs.components_, dtype)


@pytest.mark.usefixtures("one_torch_thread")
def test_cd_transform_matches_scikit_learn_step_for_step():
    X = _data(seed=2)
    kw = dict(n_components=3, solver="cd", init="random", random_state=0, tol=1e-3, max_iter=300)
    ours, theirs, _, _ = _fit_both(kw, X)
    X_new = _data(seed=3)
    for max_iter in (1, 3):  # far from converged: the same zero start and the same sweeps
        for m in (ours, theirs):
            m.set_params(tol=0, max_iter=max_iter)
        np.testing.assert_allclose(ours.transform(X_new), theirs.transform(X_new), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(X_new)),
                               theirs.inverse_transform(theirs.transform(X_new)), rtol=1e-9)
    for m in (ours, theirs):  # both warn when transform reaches max_iter with tol > 0
        m.set_params(tol=1e-12, max_iter=2)
        with pytest.warns(ConvergenceWarning, match="Maximum number of iterations 2"):
            m.transform(X_new)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("shape", [(30, 120), (120, 30)])
def test_cd_shuffle_follows_scikit_learns_permutations(shape):
    """shuffle=True: a new permutation of the components for every sweep, drawn from
    random_state as scikit-learn draws them: for an integer seed, and for a RandomState that
    the random start draws from first."""
    X = _data(*shape)
    X_new = _data(*shape, seed=1)
    for random_state in (3, np.random.RandomState(3)):
        ours, theirs, W, W_sk = _fit_both(dict(n_components=3, solver="cd", shuffle=True, init="random",
                                               random_state=random_state, tol=1e-3, max_iter=1000), X)
        assert 1 < theirs.n_iter_ < 1000
        assert ours.n_iter_ == theirs.n_iter_
        _close(W, W_sk, np.float64)
        _close(ours.components_, theirs.components_, np.float64)
        _close(ours.transform(X_new), theirs.transform(X_new), np.float64)
    # the orders matter: without shuffling (or with another seed) the fit differs
    plain = NMF(3, solver="cd", init="random", random_state=3, tol=0, max_iter=20).fit(X)
    shuffled = NMF(3, solver="cd", init="random", random_state=3, tol=0, max_iter=20, shuffle=True).fit(X)
    assert np.abs(plain.components_ - shuffled.components_).max() > 1e-6
    for init in (None, "nndsvd", "nndsvdar"):
        with pytest.raises(ValueError, match="RandomState instance and an NNDSVD start"):
            NMF(3, solver="cd", init=init, shuffle=True, random_state=np.random.RandomState(0)).fit(X)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_cd_torch_in_torch_out_float32_kept():
    torch = pytest.importorskip("torch")
    X = torch.from_numpy(_data(n_samples=200, dtype=np.float32))
    kw = dict(n_components=3, solver="cd", init="random", random_state=0, max_iter=300)
    model = NMF(**kw)
    W = model.fit_transform(X)
    assert isinstance(W, torch.Tensor) and isinstance(model.components_, torch.Tensor)
    assert W.dtype == torch.float32 and model.components_.dtype == torch.float32
    Wt = model.transform(X)
    assert isinstance(Wt, torch.Tensor) and Wt.dtype == torch.float32 and Wt.shape == W.shape
    assert isinstance(model.inverse_transform(Wt), torch.Tensor)
    assert model.reconstruction_err_ / float(torch.linalg.norm(X)) < 0.05
    ref = NMF(**kw).fit(X.numpy())
    assert model.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(model.components_.numpy(), ref.components_, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="same kind"):
        model.transform(X.numpy())


@pytest.mark.usefixtures("one_torch_thread")
def test_cd_convergence_warning_and_custom_start_untouched():
    X = _data()
    with pytest.warns(ConvergenceWarning, match="Maximum number of iterations 5"):
        NMF(3, solver="cd", init="random", random_state=0, tol=1e-12, max_iter=5).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NMF(3, solver="cd", init="random", random_state=0, tol=0, max_iter=5).fit(X)  # tol = 0: no warning
    rng = np.random.default_rng(5)
    W0, H0 = rng.random((X.shape[0], 4)), rng.random((4, X.shape[1]))
    W0_copy, H0_copy = W0.copy(), H0.copy()
    model = NMF(n_components="auto", solver="cd", init="custom", tol=0, max_iter=10)
    model.fit(X, W=W0, H=H0)
    assert model.n_components_ == 4 and model.n_iter_ == 10
    np.testing.assert_array_equal(W0, W0_copy)
    np.testing.assert_array_equal(H0, H0_copy)


# -- input validation -------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_torch_x_is_checked_as_numpy_x_is(solver):
    """NaN, inf and negative values in a torch X are refused as scikit-learn refuses them in a
    NumPy X, in fit (wide and tall) and transform, rather than giving NaN factors."""
    torch = pytest.importorskip("torch")
    X = torch.from_numpy(_data(5, 40))
    model = NMF(2, solver=solver, max_iter=5, tol=0).fit(X)
    nan, inf = X.clone(), X.clone()
    nan[0, 0], inf[0, 0] = float("nan"), float("inf")
    for bad, match in ((nan, "Input X contains NaN"), (inf, "Input X contains infinity"),
                       (-X, "Negative values in data passed to NMF")):
        with pytest.raises(ValueError, match=match):
            model.transform(bad)
        for Xb in (bad, bad.T):
            with pytest.raises(ValueError, match=match):
                NMF(2, solver=solver, max_iter=5, tol=0).fit(Xb)
    with pytest.raises(TypeError, match="float16"):
        model.transform(X.half())


@pytest.mark.parametrize("shape", [(5, 40), (40, 5)])
def test_torch_integer_x_becomes_float64(shape):
    """Integer and boolean torch X are fitted as float64, as NumPy's are: on the tall path too
    (its first W step mixed an integer X with float factors), unsigned types included."""
    torch = pytest.importorskip("torch")
    Xi = (_data(*shape) * 10).astype(np.int64)
    ref = NMF(2, init="random", random_state=0, max_iter=5, tol=0).fit(Xi)
    for dtype in (torch.int64, torch.uint16, torch.uint64, torch.bool):
        Xt = torch.from_numpy(Xi).to(dtype)
        model = NMF(2, init="random", random_state=0, max_iter=5, tol=0).fit(Xt)
        assert model.components_.dtype == torch.float64
        want = ref.components_ if dtype != torch.bool else NMF(2, init="random", random_state=0, max_iter=5,
                                                                tol=0).fit(Xi > 0).components_
        np.testing.assert_allclose(model.components_.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["float32", "float64", "torch"])
def test_tall_x_too_large_for_its_dtype_raises_as_the_wide_one_does(kind):
    """The tall path's own W and H steps overflow first: the solver's FloatingPointError, not
    NumPy's overflow warnings and then a complaint about an S0 the user never passed."""
    X = _data(40, 5)
    if kind == "float32":
        X = (X * 1e20).astype(np.float32)
    elif kind == "float64":
        X = X * 1e300
    else:
        X = pytest.importorskip("torch").from_numpy((X * 1e30).astype(np.float32))
    for Xs in (X, X.T):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(FloatingPointError, match=r"MU overflowed float(32|64): X's largest value"):
                NMF(2, max_iter=20).fit(Xs)


def test_tall_float32_x_whose_squares_overflow_converges_as_at_scale_1():
    """‖X − W H‖² passes float32's range from X ≈ 1e17 on (here 2.5e38 at the start) although
    nothing else does: the tall path's tol scale was inf, and it stopped after 21 iterations."""
    X = _data(300, 20, dtype=np.float32)
    kw = dict(n_components=3, init="random", random_state=0, tol=1e-3, max_iter=400)
    ref = NMF(**kw).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        big = NMF(**kw).fit(X * np.float32(5e17))
    assert big.n_iter_ == ref.n_iter_
    assert big.reconstruction_err_ / 5e17 == pytest.approx(ref.reconstruction_err_, rel=1e-4)


def test_parameters_set_after_fit_are_checked_by_transform():
    """set_params bypasses __init__: transform checks eps, max_iter and tol as fit does (eps=0
    gave NaN W where a component is 0)."""
    X = _data(5, 40)
    for solver in ("mu", "cd"):
        model = NMF(2, solver=solver, max_iter=5, tol=0).fit(X)
        for params, match in ((dict(eps=0), "eps must be finite and > 0"), (dict(max_iter=-5), "max_iter"),
                              (dict(tol=float("nan")), "tol")):
            with pytest.raises(ValueError, match=match):
                clone(model).set_params(**params).fit(X)
            model_b = copy.deepcopy(model).set_params(**params)
            with pytest.raises(ValueError, match=match):
                model_b.transform(X)
    for shape in ((5, 40), (40, 5)):
        with pytest.raises(TypeError, match="eps must be a real number, got 'a'"):
            NMF(2, eps="a", max_iter=5).fit(_data(*shape))


def test_random_state_of_a_type_scikit_learn_refuses_is_named():
    X = _data(5, 40)
    for rs in (1.5, "0", np.random.default_rng(0)):
        for solver in ("mu", "cd"):
            with pytest.raises(ValueError, match=r"random_state must be None, an integer or a numpy RandomState"):
                NMF(2, init="random", solver=solver, random_state=rs, max_iter=5).fit(X)


def test_inverse_transform_refuses_what_it_cannot_multiply():
    torch = pytest.importorskip("torch")
    scipy_sparse = pytest.importorskip("scipy.sparse")
    X = _data(5, 40)
    model = NMF(2, max_iter=5, tol=0).fit(X)
    tmodel = NMF(2, max_iter=5, tol=0).fit(torch.from_numpy(X))
    W = model.transform(X)
    with pytest.raises(TypeError, match="X is a torch array but the model was fitted on numpy arrays"):
        model.inverse_transform(torch.from_numpy(W))
    with pytest.raises(TypeError, match="X is a numpy array but the model was fitted on torch arrays"):
        tmodel.inverse_transform(W)
    with pytest.raises(TypeError, match="sparse"):
        model.inverse_transform(scipy_sparse.csr_matrix(W))
    with pytest.raises(TypeError, match="complex128"):
        model.inverse_transform(W + 1j)
    with pytest.raises(TypeError, match="complex128"):
        tmodel.inverse_transform(torch.from_numpy(W + 1j))
    np.testing.assert_allclose(model.inverse_transform(W.tolist()), W @ model.components_)


def test_custom_start_of_a_refused_dtype_names_w_or_h_on_both_paths():
    """A complex W was taken on a tall X (imaginary part dropped) and refused as "A0" on a wide one."""
    for shape in ((5, 40), (40, 5)):
        W, H = np.ones((shape[0], 2)), np.ones((2, shape[1]))
        custom = NMF(2, init="custom", max_iter=5, tol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ComplexWarning either
            with pytest.raises(TypeError, match="W has dtype complex128"):
                custom.fit(_data(*shape), W=W + 0j, H=H)
            with pytest.raises(TypeError, match="H has dtype float16"):
                custom.fit(_data(*shape), W=W, H=H.astype(np.float16))


def test_torch_x_requiring_grad_gives_detached_results():
    torch = pytest.importorskip("torch")
    for shape in ((5, 40), (40, 5)):
        X = torch.from_numpy(_data(*shape)).requires_grad_()
        W0 = torch.ones(shape[0], 2, dtype=torch.float64, requires_grad=True)
        for model, kw in ((NMF(2, max_iter=5, tol=0), {}),
                          (NMF(2, init="custom", max_iter=5, tol=0), dict(W=W0, H=torch.ones(2, shape[1]).double()))):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nor torch's warning on float() of a grad tensor
                W = model.fit_transform(X, **kw)
            assert not W.requires_grad and not model.components_.requires_grad
            assert not model.transform(X).requires_grad


def test_regularisation_parameters_are_scikit_learns():
    """alpha_W, alpha_H, l1_ratio are in the signature with scikit-learn's defaults (clone,
    get_params, grid searches over scikit-learn's names); at those defaults, and with alpha 0
    whatever l1_ratio, the fit is the plain one bit for bit. (Penalised fits against
    scikit-learn, and bad values: tests/test_penalty.py.)"""
    X = _data(20, 30)
    params = NMF().get_params()
    assert {k: params[k] for k in ("alpha_W", "alpha_H", "l1_ratio")} == {
        k: SkNMF().get_params()[k] for k in ("alpha_W", "alpha_H", "l1_ratio")}
    kw = dict(n_components=3, init="random", random_state=0, max_iter=30, tol=0)
    for solver in ("mu", "cd"):
        ref = NMF(solver=solver, **kw).fit(X).components_
        for ok in (dict(alpha_W=0.0, alpha_H="same", l1_ratio=0.0), dict(alpha_W=0, alpha_H=0.0, l1_ratio=0.7)):
            model = clone(NMF(solver=solver, **kw, **ok)).fit(X)
            np.testing.assert_array_equal(model.components_, ref)
        penalised = clone(NMF(solver=solver, alpha_W=0.1, **kw)).fit(X)
        assert penalised.get_params()["alpha_W"] == 0.1
        assert np.abs(penalised.components_ - ref).max() > 1e-3


def test_backend_is_checked_for_every_solver():
    X = np.random.default_rng(0).random((30, 8))
    for solver in ("mu", "cd"):
        with pytest.raises(ValueError, match="backend must be one of"):
            NMF(2, solver=solver, backend="bogus").fit(X)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar"])
@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_nndsvd_starts_refused_above_the_smaller_dimension_as_in_scikit_learn(init, solver):
    X = np.random.default_rng(0).random((30, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=f"init='{init}' can only be used when n_components <= min"):
            NMF(10, init=init, solver=solver).fit(X)
        with pytest.raises(ValueError):
            SkNMF(10, init=init, solver=solver).fit(X)


def test_nndsvd_with_mu_warns_as_scikit_learn_and_keeps_its_zeros():
    """MU multiplies: NNDSVD's zeros stay zero, which both estimators warn about; CD updates them
    (no warning)."""
    X = _data(30, 120)
    for est in (NMF, lambda **kw: SkNMF(solver="mu", **kw)):
        with pytest.warns(UserWarning, match="cannot update zeros present in the initialization"):
            est(n_components=3, init="nndsvd", max_iter=50, tol=0).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        NMF(n_components=3, init="nndsvd", solver="cd", max_iter=5, tol=0).fit(X)
    from sklearn.decomposition._nmf import _initialize_nmf

    W0, H0 = _initialize_nmf(X, 3, init="nndsvd")
    assert (W0 == 0).any() and (H0 == 0).any()
    with pytest.warns(UserWarning):
        model = NMF(n_components=3, init="nndsvd", max_iter=50, tol=0)
        W = model.fit_transform(X)
    np.testing.assert_array_equal(W == 0, W0 == 0)
    np.testing.assert_array_equal(model.components_ == 0, H0 == 0)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_an_out_of_range_seed_names_random_state(seed):
    with pytest.raises(ValueError, match="random_state must be a seed between 0 and 2\\*\\*32 - 1"):
        NMF(3, random_state=seed).fit(np.random.default_rng(0).random((10, 30)))


def test_cd_refuses_a_backend_it_cannot_honour():
    # coordinate descent runs where X is: backend="cuda" for host X must not silently run on the CPU
    X = np.random.default_rng(0).random((10, 30))
    with pytest.raises(ValueError, match="solver='cd' runs where X is .*backend='cuda' cannot be honoured"):
        NMF(3, solver="cd", backend="cuda", max_iter=5).fit(X)
    import torch

    for Xb in (X, torch.from_numpy(X)):  # it picks the kernel or torch itself: "torch" is not a choice
        with pytest.raises(ValueError, match="backend='torch' cannot be honoured for this X; leave backend='auto'"):
            NMF(3, solver="cd", backend="torch", shuffle=True, max_iter=5).fit(Xb)
    for backend in ("auto", "cpu"):
        assert NMF(3, solver="cd", backend=backend, max_iter=300).fit(X).components_.shape == (3, 30)


def test_float32_tol_stops_where_scikit_learn_and_float64_do():
    # ‖X‖² − 2⟨W, XHᵀ⟩ + ⟨WᵀW, HHᵀ⟩ from float32 products carries an error of ~1e-7·‖X‖², more than
    # the decrease tol looks for near the end: fits stopped at 980 iterations here (1490 is right)
    rng = np.random.default_rng(0)
    X = (rng.random((50, 3)) @ rng.random((3, 2000))).astype(np.float32)
    kw = dict(n_components=3, init="random", random_state=0, max_iter=3000, tol=1e-5)
    ours = NMF(**kw).fit(X)
    assert ours.n_iter_ == SkNMF(solver="mu", **kw).fit(X).n_iter_ == NMF(**kw).fit(X.astype(np.float64)).n_iter_
    # transform: W alone, from the same components, in float32 as in float64
    Xt = np.ascontiguousarray(X.T)
    kw = dict(kw, max_iter=1000, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = NMF(**kw).fit(Xt)
        W32 = est.transform(Xt)
        est.components_ = est.components_.astype(np.float64)
        W64 = est.transform(Xt.astype(np.float64))
    assert np.abs(W32 - W64).max() <= 1e-4 * np.abs(W64).max()


def test_convergence_warnings_as_scikit_learn_gives_them():
    rng = np.random.default_rng(5)
    X = rng.random((60, 3)) @ rng.random((3, 30)) + 0.05 * rng.random((60, 30))  # tall: run on Xᵀ
    stop = NMF(3, init="random", random_state=0, max_iter=500).fit(X).n_iter_
    assert stop == SkNMF(3, init="random", random_state=0, max_iter=500, solver="mu").fit(X).n_iter_
    # the same tol stop, now on the last iteration the budget allows: scikit-learn counts it as
    # max_iter reached, and so does fastmu
    for Est, kw in ((NMF, {}), (SkNMF, dict(solver="mu"))):
        with pytest.warns(ConvergenceWarning, match=f"Maximum number of iterations {stop} reached"):
            assert Est(3, init="random", random_state=0, max_iter=stop, **kw).fit(X).n_iter_ == stop
    # off the CPU engine the estimator runs Xᵀ itself (NMF._fit_tall): its checks fall half an
    # iteration later, on the budget's last iteration too, and a stop there is a stop
    stop = NMF(3, init="random", random_state=0, max_iter=500, backend="torch").fit(X).n_iter_
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert NMF(3, init="random", random_state=0, max_iter=stop, backend="torch").fit(X).n_iter_ == stop
    est = NMF(3, max_iter=5, random_state=0)
    with pytest.warns(ConvergenceWarning):
        est.fit(X)
    with pytest.warns(ConvergenceWarning, match="Maximum number of iterations 5"):  # transform too
        est.transform(X)


@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_random_state_none_draws_from_numpy_s_global_generator(solver):
    rng = np.random.default_rng(6)
    X = rng.random((20, 3)) @ rng.random((3, 60))
    kw = dict(n_components=3, init="random", max_iter=20, solver=solver)
    fits = []
    for Est in (NMF, NMF, SkNMF):
        np.random.seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fits.append(Est(**kw).fit_transform(X))
    assert np.array_equal(fits[0], fits[1])
    np.testing.assert_allclose(fits[0], fits[2], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case, says", [
    ("import sklearn, sklearn.utils.validation as v; del v.validate_data; sklearn.__version__ = '1.5.2'",
     "older than the 1.6"),
    ("import sklearn, sys; sys.modules['sklearn.utils.validation'] = None", "could not import"),
])
def test_a_scikit_learn_the_estimator_cannot_use_is_named(case, says):
    # scikit-learn < 1.6 has no validate_data, a broken install fails to import: NMF then
    # works as the plain fallback, and says why
    import subprocess
    import sys

    code = (f"import warnings; {case}; "
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import fastmu.estimator as e\n"
            f"print(e._SKLEARN, any({says!r} in str(x.message) for x in w))\n"
            "import numpy as np; print(e.NMF(2, max_iter=20, random_state=0).fit_transform(np.ones((4, 3))).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["False True", "(4, 2)"], r.stdout + r.stderr


def test_a_sparse_dataframe_gets_fastmu_s_own_message():
    # scikit-learn's message for it suggests X.toarray(), which a DataFrame does not have
    from fastmu.estimator import _sparse_columns

    class SparseDtype:  # pandas' name for it; checked without importing pandas
        pass

    class Frame:
        def __init__(self, dtypes):
            self.dtypes = dtypes

    assert _sparse_columns(Frame([np.dtype(float), SparseDtype()]))
    assert not _sparse_columns(Frame([np.dtype(float)])) and not _sparse_columns(np.ones((2, 2)))


def test_a_sparse_pandas_dataframe_is_refused_by_name():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(_data(20, 6)).astype(pd.SparseDtype("float64", 0.0))
    with pytest.raises(TypeError, match=r"X\.sparse\.to_dense\(\)"):
        NMF(2).fit(df)
