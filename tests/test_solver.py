"""fastmu.mu: agreement with NumPy and scikit-learn, monotonicity, edge cases, interop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmu
from fastmu.reference import mu_numpy, objective_numpy
from fastmu.solver import initial_factors

from helpers import low_rank_problem


def shared_problem(shared_data, n_pix=24):
    """X = A* S* from the real Chandra spectra and Cas A maps (downsampled), max X = 1."""
    A = np.load(shared_data / "chandra_mixing_matrices.npz")["A"][:3]  # (3, 65, 4)
    maps = np.load(shared_data / "casa_source_maps.npz")["S"]  # (4, 346, 346)
    step = maps.shape[1] // n_pix
    S = maps[:, ::step, ::step][:, :n_pix, :n_pix].reshape(4, -1)
    X = A @ S[None]
    return X / X.max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_numpy_loop_on_real_data(shared_data, dtype):
    X = shared_problem(shared_data)
    A0, S0 = initial_factors(X.mean(axis=(1, 2)), 65, X.shape[2], 4, "random", 0)
    A, S = fastmu.mu(X.astype(dtype), A0=A0.astype(dtype), S0=S0.astype(dtype), n_iter=100)
    Ar, Sr = mu_numpy(X, A0, S0, 100)
    tol = 1e-3 if dtype == np.float32 else 1e-9
    assert A.dtype == dtype
    np.testing.assert_allclose(A, Ar, rtol=tol, atol=tol * np.abs(Ar).max())
    np.testing.assert_allclose(S, Sr, rtol=tol, atol=tol * np.abs(Sr).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("source", ["random", "shared"])
def test_matches_scikit_learn(request, dtype, source):
    sk = pytest.importorskip("sklearn.decomposition")
    if source == "shared":
        X = shared_problem(request.getfixturevalue("shared_data"))[1]
    else:
        X = low_rank_problem(np.random.default_rng(3), 1, 40, 4, 500, noise=0.01)[0][0]
    X = X.astype(dtype)
    A0, S0 = fastmu.mu(X, 4, n_iter=0, random_state=7)
    model = sk.NMF(4, init="custom", solver="mu", beta_loss="frobenius", max_iter=150, tol=0)
    W = model.fit_transform(X, W=A0.copy(), H=S0.copy())
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=150)
    tol = 2e-3 if dtype == np.float32 else 1e-8
    np.testing.assert_allclose(A, W, rtol=tol, atol=tol * np.abs(W).max())
    np.testing.assert_allclose(S, model.components_, rtol=tol, atol=tol * np.abs(S).max())


def test_random_init_is_scikit_learns(rng):
    sk_nmf = pytest.importorskip("sklearn.decomposition._nmf")
    X = rng.random((30, 50))
    W, H = sk_nmf._initialize_nmf(X, 3, init="random", random_state=42)
    A, S = fastmu.mu(X, 3, n_iter=0, random_state=42)
    np.testing.assert_array_equal(A, W)
    np.testing.assert_array_equal(S, H)


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3),
    m=st.integers(2, 20),
    n=st.integers(1, 5),
    t=st.integers(2, 300),
    seed=st.integers(0, 10_000),
)
def test_objective_never_increases(b, m, n, t, seed):
    rng = np.random.default_rng(seed)
    X = rng.random((b, m, t)) ** 3  # non-negative, not low rank
    f = []
    fastmu.mu(X, n, n_iter=40, random_state=seed,
              callback=lambda i, A, S: f.append(objective_numpy(X, A, S)))
    f = np.array(f)
    # Lee-Seung MU is monotone; allow only rounding-level increases.
    assert np.all(np.diff(f, axis=0) <= 1e-10 * f[:-1] + 1e-14)


def test_batched_equals_one_by_one(rng):
    X, A0, S0 = low_rank_problem(rng, 4, 12, 3, 200, noise=0.1)
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=30)
    for p in range(4):
        Ap, Sp = fastmu.mu(X[p], A0=A0[p], S0=S0[p], n_iter=30)
        np.testing.assert_allclose(A[p], Ap, rtol=1e-12)
        np.testing.assert_allclose(S[p], Sp, rtol=1e-12)


def test_inputs_not_modified(rng):
    X, A0, S0 = low_rank_problem(rng, 2, 8, 3, 50)
    copies = [a.copy() for a in (X, A0, S0)]
    fastmu.mu(X, A0=A0, S0=S0, n_iter=5)
    for a, c in zip((X, A0, S0), copies):
        np.testing.assert_array_equal(a, c)


def test_two_d_in_two_d_out_and_batched_shapes(rng):
    X = rng.random((5, 9, 40))
    A, S = fastmu.mu(X, 2, n_iter=3, random_state=0)
    assert A.shape == (5, 9, 2) and S.shape == (5, 2, 40)
    A, S = fastmu.mu(X[0], 2, n_iter=3, random_state=0)
    assert A.shape == (9, 2) and S.shape == (2, 40)


def test_integer_counts_become_float64(rng):
    X = rng.poisson(5.0, size=(10, 60))
    A, S = fastmu.mu(X, 3, n_iter=10, random_state=0)
    assert A.dtype == np.float64 and np.isfinite(A).all()


def test_zero_pixels_and_channels_stay_finite(rng):
    X = rng.random((12, 80)).astype(np.float32)
    X[:, 5:9] = 0  # dark pixels
    X[3] = 0  # dead channel
    A, S = fastmu.mu(X, 4, n_iter=300, random_state=0)
    assert np.isfinite(A).all() and np.isfinite(S).all()
    assert np.all(A[3] == 0)
    assert np.all(S[:, 5:9] == 0)
    Z = np.zeros((6, 10))
    A, S = fastmu.mu(Z, 2, n_iter=5, random_state=0)
    assert np.isfinite(A).all() and np.isfinite(S).all()


def test_float32_ten_thousand_iterations_finite(rng):
    X = (rng.random((65, 4)) @ rng.random((4, 256))).astype(np.float32)
    X[:, :3] = 0
    A, S = fastmu.mu(X, 4, n_iter=10_000, random_state=1)
    assert np.isfinite(A).all() and np.isfinite(S).all()
    assert np.linalg.norm(X - A @ S) / np.linalg.norm(X) < 1e-2


def test_tol_stops_early_and_callback_can_stop(rng):
    X, _, _ = low_rank_problem(rng, 1, 20, 3, 100)
    seen = []
    fastmu.mu(X, 3, n_iter=5000, tol=1e-4, random_state=0, callback=lambda i, A, S: seen.append(i))
    assert 10 <= seen[-1] < 5000
    seen.clear()
    fastmu.mu(X, 3, n_iter=100, random_state=0, callback=lambda i, A, S: seen.append(i) or i >= 7)
    assert seen == list(range(1, 8))


def test_callback_every(rng):
    X, _, _ = low_rank_problem(rng, 1, 5, 2, 30)
    seen = []
    fastmu.mu(X, 2, n_iter=20, callback=lambda i, A, S: seen.append(i), callback_every=5)
    assert seen == [5, 10, 15, 20]


@pytest.mark.parametrize("watch", [dict(progress=True), dict(callback_every=7), dict(callback_every=3, progress=True)])
def test_tol_stop_does_not_move_with_progress_bar_or_callback(rng, watch):
    # The kernels used to run in chunks of the smallest event period, so the
    # tolerance was only checked where that chunking met multiples of
    # check_every: a bar or a callback every 7 iterations moved the stop.
    from fastmu.solver import solve

    X, _, _ = low_rank_problem(rng, 2, 20, 4, 300)
    kw = dict(n_iter=350, tol=1e-3, random_state=0)
    A, S, done = solve(X, 4, **kw)
    assert done < 350 and done % 10 == 0
    if "callback_every" in watch:
        watch = dict(watch, callback=lambda i, A, S: None)
    A2, S2, done2 = solve(X, 4, **kw, **watch)
    assert done2 == done
    np.testing.assert_array_equal(A2, A)
    np.testing.assert_array_equal(S2, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out(rng, dtype):
    X, A0, S0 = low_rank_problem(rng, 2, 10, 3, 90)
    Xt, At0, St0 = (torch.from_numpy(a).to(dtype) for a in (X, A0, S0))
    A, S = fastmu.mu(Xt, A0=At0, S0=St0, n_iter=20)
    assert isinstance(A, torch.Tensor) and A.dtype == dtype and A.shape == (2, 10, 3)
    Ar, Sr = mu_numpy(X, A0, S0, 20)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(A.numpy(), Ar, rtol=tol, atol=tol)
    A2, S2 = fastmu.mu(Xt, A0=At0, S0=St0, n_iter=20, backend="torch")
    np.testing.assert_allclose(A2.numpy(), A.numpy(), rtol=10 * tol, atol=tol)


def test_numpy_backend_torch_reference(rng):
    X, A0, S0 = low_rank_problem(rng, 1, 10, 3, 90)
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=15, backend="torch")
    assert isinstance(A, np.ndarray)
    Ar, Sr = mu_numpy(X, A0, S0, 15)
    np.testing.assert_allclose(A, Ar, rtol=1e-10)


def test_cuda_backend_without_gpu_is_a_clear_error(rng, monkeypatch):
    import fastmu.solver as solver

    monkeypatch.setattr(solver, "cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        fastmu.mu(rng.random((4, 10)), 2, backend="cuda")


def test_constant_init_keeps_columns_identical(rng):
    """Under plain MU a constant start never separates the components."""
    X, _, _ = low_rank_problem(rng, 1, 15, 3, 120)
    A, S = fastmu.mu(X[0], 3, n_iter=50, init="constant")
    np.testing.assert_allclose(A, A[:, :1].repeat(3, axis=1), rtol=1e-12)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar"])
@pytest.mark.parametrize("shape", [(12, 50), (50, 12)])
def test_nndsvd_starts_are_scikit_learns(init, shape):
    """scikit-learn's NNDSVD starts from a randomized SVD, fastmu's from an exact one: on a
    matrix whose leading singular values stand apart they agree to the SVDs' accuracy, with the
    same zeros, and nndsvdar's fill draws the same numbers for the same integer seed."""
    sk_nmf = pytest.importorskip("sklearn.decomposition._nmf")
    from fastmu.solver import initial_factors

    X, _, _ = low_rank_problem(np.random.default_rng(4), 1, *shape[:1], 3, shape[1])
    W, H = sk_nmf._initialize_nmf(X[0], 3, init=init, random_state=7)
    A, S = initial_factors(X.mean(axis=(1, 2)), *shape, 3, init, 7, X=X)
    assert A.shape == (1, shape[0], 3) and S.shape == (1, 3, shape[1])
    np.testing.assert_array_equal(A[0] == 0, W == 0)
    np.testing.assert_array_equal(S[0] == 0, H == 0)
    np.testing.assert_allclose(A[0], W, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(S[0], H, rtol=1e-6, atol=1e-9)
    if init == "nndsvd":
        assert (W == 0).any()  # the case the others fill
    else:
        assert (A > 0).all() and (S > 0).all()


def test_nndsvdar_batch_draws_one_stream_in_problem_order(rng):
    """A batch's nndsvdar fills come from one seeded stream, problem after problem (A's zeros,
    then S's): problem 0 starts as it would alone, and a seed repeats the batch's start."""
    X, _, _ = low_rank_problem(rng, 3, 10, 3, 40)
    A, S = fastmu.mu(X, 3, n_iter=0, init="nndsvdar", random_state=2)
    A1, S1 = fastmu.mu(X[0], 3, n_iter=0, init="nndsvdar", random_state=2)
    np.testing.assert_array_equal(A[0], A1)
    np.testing.assert_array_equal(S[0], S1)
    A2, S2 = fastmu.mu(X, 3, n_iter=0, init="nndsvdar", random_state=2)
    np.testing.assert_array_equal(A, A2)
    np.testing.assert_array_equal(S, S2)
    A3, _ = fastmu.mu(X, 3, n_iter=0, init="nndsvdar", random_state=3)
    assert not np.array_equal(A, A3)
    Ad, Sd = fastmu.mu(X, 3, n_iter=0, init="nndsvd")
    zero = Ad == 0
    assert zero.any() and (A[zero] > 0).all() and (A[zero] < X.mean() / 10).all()
    np.testing.assert_array_equal(A[~zero], Ad[~zero])


def test_nndsvd_zeros_stay_zero_under_mu_and_its_rank_is_bounded(rng):
    X, _, _ = low_rank_problem(rng, 2, 10, 3, 40)
    A0, S0 = fastmu.mu(X, 3, n_iter=0, init="nndsvd")
    A, S = fastmu.mu(X, 3, n_iter=30, init="nndsvd")
    assert (A0 == 0).any()
    np.testing.assert_array_equal(A == 0, A0 == 0)
    np.testing.assert_array_equal(S == 0, S0 == 0)
    assert np.isfinite(A).all() and np.isfinite(S).all()
    with pytest.raises(ValueError, match=r"init='nndsvd' needs n_components <= min\(m, t\) = 10, got 11"):
        fastmu.mu(X, 11, init="nndsvd")
    for init in ("nndsvda", "nndsvdar"):  # filled: every component starts non-zero
        A, S = fastmu.mu(X, 11, n_iter=0, init=init, random_state=0)
        assert (A > 0).all() and (S > 0).all()


def test_eps_below_the_dtypes_smallest_normal_number_is_refused():
    """The CPU kernels read subnormals as 0 (flush-to-zero), so such an eps would give 0/0 at zero
    entries: refused up front, naming the bound; the same eps is fine in float64."""
    X = np.random.default_rng(0).random((6, 40))
    X[:, 3] = 0.0
    for backend in ("cpu", "torch"):
        with pytest.raises(ValueError, match=r"eps=1e-40 is below the smallest normal float32 number \(1.175e-38\)"):
            fastmu.mu(X.astype(np.float32), 2, n_iter=5, eps=1e-40, backend=backend)
        A, S = fastmu.mu(X, 2, n_iter=5, eps=1e-40, backend=backend, random_state=0)
        assert np.isfinite(A).all() and np.isfinite(S).all()
    with pytest.raises(ValueError, match="below the smallest normal float32"):
        fastmu.NMF(2, eps=1e-40).fit(X.T.astype(np.float32))  # tall: W's first update before the solver
    with pytest.raises(ValueError, match="below the smallest normal float32"):
        fastmu.NMF(2, eps=1e-40).fit(X.astype(np.float32))


@pytest.mark.parametrize("init", ["random", "nndsvda"])
def test_inits_converge(rng, init):
    X, _, _ = low_rank_problem(rng, 1, 15, 3, 120)
    A, S = fastmu.mu(X[0], 3, n_iter=400, init=init, random_state=0)
    assert np.linalg.norm(X[0] - A @ S) / np.linalg.norm(X[0]) < 0.05


@pytest.mark.parametrize("stop", [True, np.True_, np.array([True]), torch.tensor(True)])
@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_callback_stops_on_any_boolean_true(stop, solver):
    """`err < tol` on arrays returns NumPy's or torch's True, not Python's: it must stop too."""
    from fastmu.baselines import cd

    X = np.random.default_rng(0).random((6, 40))
    run = fastmu.mu if solver == "mu" else cd
    calls = []
    run(X, 2, n_iter=30, random_state=0, callback=lambda it, A, S: calls.append(it) or stop)
    assert calls == [1]


@pytest.mark.parametrize("result", [None, 1, 0.5, "yes", np.False_, np.array([True, True])])
def test_callback_results_that_do_not_stop(result):
    X = np.random.default_rng(0).random((6, 40))
    calls = []
    fastmu.mu(X, 2, n_iter=7, random_state=0, callback=lambda it, A, S: calls.append(it) or result)
    assert len(calls) == 7


@pytest.mark.parametrize("X_shape, A_shape, S_shape, expect", [
    ((8, 30), (9, 2), (2, 30), r"A0 has shape \(9, 2\) but X has shape \(8, 30\): A0 must be \(8, n\)"),
    ((2, 8, 30), (8, 2), (2, 30), r"A0 has shape \(8, 2\), with no batch axis, but X holds 2 problems"),
    ((8, 30), (2, 8, 2), (2, 2, 30), r"A0 has shape \(2, 8, 2\), a batch of 2, but X is one problem"),
    ((2, 8, 30), (2, 8, 2), (2, 2, 31), r"S0 has shape \(2, 2, 31\) but X has shape \(2, 8, 30\): "
                                        r"S0 must be \(2, n, 30\)"),
])
def test_start_shape_errors_speak_of_the_shapes_given(X_shape, A_shape, S_shape, expect):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=expect):
        fastmu.mu(rng.random(X_shape), A0=rng.random(A_shape), S0=rng.random(S_shape), n_iter=1)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_factors_never_join_the_callers_graph(backend):
    X = torch.rand(8, 30, dtype=torch.float64)
    A0 = torch.rand(8, 2, dtype=torch.float64, requires_grad=True)
    for n_iter in (0, 2):
        A, S = fastmu.mu(X, A0=A0, S0=torch.rand(2, 30, dtype=torch.float64), n_iter=n_iter, backend=backend)
        assert not A.requires_grad and not S.requires_grad


@pytest.mark.parametrize("layout", ["to_sparse", "to_sparse_csr"])
def test_sparse_torch_input_is_refused_clearly(layout):
    from fastmu.baselines import cd

    X = getattr(torch.rand(8, 30), layout)()
    for call in (lambda: fastmu.mu(X, 2), lambda: cd(X, 2), lambda: fastmu.NMF(2).fit(X.t() if layout == "to_sparse" else X)):
        with pytest.raises(TypeError, match=r"sparse torch tensor.*to_dense\(\)"):
            call()


def test_meta_tensors_are_refused_clearly():
    from fastmu.baselines import cd

    X = torch.rand(8, 30, device="meta")
    for call in (lambda: fastmu.mu(X, 2, backend="torch"), lambda: fastmu.mu(X, 2), lambda: cd(X, 2),
                 lambda: fastmu.NMF(2).fit(X)):
        with pytest.raises(TypeError, match="X is a meta tensor, which holds no values"):
            call()


@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_return_n_iter_counts_the_iterations_run(solver):
    from fastmu.baselines import cd

    run = fastmu.mu if solver == "mu" else cd
    X = np.random.default_rng(0).random((20, 300))
    A, S, k = run(X, 3, n_iter=40, random_state=0, return_n_iter=True)
    assert k == 40
    np.testing.assert_array_equal(A, run(X, 3, n_iter=40, random_state=0)[0])  # the same run
    _, _, k = run(X, 3, n_iter=5000, tol=1e-3, random_state=0, return_n_iter=True)
    assert 0 < k < 5000
    _, _, k = run(X, 3, n_iter=50, random_state=0, callback=lambda it, A, S: it >= 7, return_n_iter=True)
    assert k == 7
    assert run(X, 3, n_iter=0, random_state=0, return_n_iter=True)[2] == 0


def test_an_nndsvda_start_that_overflows_is_named():
    # NNDSVDa fills NNDSVD's zeros with X's mean, so its first products grow as X's cube:
    # X near 1e13 overflows float32 there, far below where X's own scale would
    rng = np.random.default_rng(0)
    X = ((rng.random((10, 3)) @ rng.random((3, 50))) * 1e13).astype(np.float32)
    for call in (lambda: fastmu.mu(X, 3, n_iter=20, init="nndsvda"),
                 lambda: fastmu.NMF(3, max_iter=20, random_state=0).fit(X),  # NMF's default start
                 lambda: fastmu.NMF(3, max_iter=20, random_state=0).fit(np.ascontiguousarray(X.T))):  # tall
        with pytest.raises(FloatingPointError, match="init='nndsvda' start fills NNDSVD's zeros with X's mean"):
            call()
    A, S = fastmu.mu(X, 3, n_iter=20, init="random", random_state=0)  # the cure it names
    assert np.isfinite(A).all() and np.isfinite(S).all()

    def spoil(it, A, S):
        A[...] = np.nan

    # a small X cannot overflow that start: a NaN from a callback is named as such
    with pytest.raises(FloatingPointError, match="a callback that wrote NaN"):
        fastmu.mu(X / 1e13, 3, n_iter=20, init="nndsvda", callback=spoil)


@pytest.mark.parametrize("n", [3, 4, 6])  # tiled (rank <= 4 where 512-bit vectors are) and blocked kernels
@pytest.mark.parametrize("shape", [(1, 65, 5000), (3, 20, 700)])
def test_float32_objective_is_the_residual_even_near_an_exact_fit(n, shape):
    # ‖X‖² − 2⟨A, X Sᵀ⟩ + ⟨AᵀA, S Sᵀ⟩ from float32 P and G is off by ~1e-7·‖X‖²: near an exact fit
    # (‖R‖² ~ 1e-8·‖X‖² here) that is all error. The float32 check reads the residual itself.
    from fastmu.dispatch import CPUEngine

    b, m, t = shape
    rng = np.random.default_rng(n)
    A = rng.random((b, m, n)) + 0.1
    S = rng.random((b, n, t))
    X = (A @ S + 1e-4 * rng.random((b, m, t))).astype(np.float32)
    engine = CPUEngine(X, A.astype(np.float32), S.astype(np.float32), None, 1e-12)
    engine.run(2)
    got = engine.objective()
    A2, S2 = (f.astype(np.float64) for f in engine.factors())
    want = 0.5 * ((X.astype(np.float64) - A2 @ S2) ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-2)
    assert (want < 1e-6 * 0.5 * (X.astype(np.float64) ** 2).sum(axis=(1, 2))).all()  # the regime it is about
