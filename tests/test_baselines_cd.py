"""fastmu.baselines.cd (coordinate_descent.py): agreement with scikit-learn's CD solver, batching, stopping rule, interop, errors."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fastmu
# the function, not the module of the same name (which shadows it once imported directly)
from fastmu.baselines.coordinate_descent import cd

from helpers import low_rank_problem, record_calls, schedule_shapes

sk = pytest.importorskip("sklearn.decomposition")
sk_exceptions = pytest.importorskip("sklearn.exceptions")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These problems are tiny: a second torch thread only adds synchronisation (and on a
    busy 2-core machine, much more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sk_cd(X, W0=None, H0=None, n_components=None, max_iter=200, tol=0.0, **kw):
    """scikit-learn's NMF(solver="cd", shuffle=False, no regularisation): (W, H, n_iter_)."""
    custom = W0 is not None
    model = sk.NMF(n_components or W0.shape[1], solver="cd", init="custom" if custom else "random",
                   tol=tol, max_iter=max_iter, shuffle=False, alpha_W=0.0, alpha_H=0.0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when max_iter is reached on purpose
        if custom:
            W = model.fit_transform(X, W=W0.copy(), H=H0.copy())
        else:
            W = model.fit_transform(X)
    return W, model.components_, model.n_iter_


def one_problem(seed=0, m=30, n=4, t=200, dtype=np.float64):
    X, A0, S0 = low_rank_problem(np.random.default_rng(seed), 1, m, n, t, dtype=dtype, noise=0.01)
    return X[0], A0[0], S0[0]


def close(a, b, dtype, scale_of=None):
    tol = 5e-5 if dtype == np.float32 else 1e-11
    ref = b if scale_of is None else scale_of
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(ref).max())


def iterations(X, **kw):
    """Iterations cd runs (the last callback's iteration number, callback every iteration)."""
    seen = [0]
    cd(X, callback=lambda it, A, S: seen.append(it), **kw)
    return seen[-1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_matches_scikit_learn_from_same_start(dtype, k):
    X, A0, S0 = one_problem(dtype=dtype)
    W, H, _ = sk_cd(X, A0, S0, max_iter=k)
    A, S = cd(X, A0=A0, S0=S0, n_iter=k)
    assert A.dtype == dtype and S.dtype == dtype
    close(A, W, dtype)
    close(S, H, dtype)


def test_matches_scikit_learn_with_a_zero_component():
    # S0's row 1 is zero: the first A sweep must skip component 1 (hess = 0), as scikit-learn does
    X, A0, S0 = one_problem(seed=1)
    S0[1] = 0
    W, H, _ = sk_cd(X, A0, S0, max_iter=5)
    A, S = cd(X, A0=A0, S0=S0, n_iter=5)
    close(A, W, np.float64)
    close(S, H, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_start_is_scikit_learns(dtype):
    X, _, _ = one_problem(seed=2, dtype=dtype)
    W, H, _ = sk_cd(X, n_components=4, max_iter=10, random_state=11)
    A, S = cd(X, 4, n_iter=10, init="random", random_state=11)
    # fastmu draws the start in float64 then casts, scikit-learn scales in float32: ulps apart
    close(A, W, dtype)
    close(S, H, dtype)


@pytest.mark.parametrize("init", ["random", "constant", "nndsvd", "nndsvda", "nndsvdar"])
def test_starts_are_fastmu_mus(init):
    X, _, _ = low_rank_problem(np.random.default_rng(3), 2, 12, 3, 40)
    A, S = cd(X, 3, n_iter=0, init=init, random_state=5)
    Am, Sm = fastmu.mu(X, 3, n_iter=0, init=init, random_state=5)
    np.testing.assert_array_equal(A, Am)
    np.testing.assert_array_equal(S, Sm)


def test_batch_equals_problems_alone():
    X, A0, S0 = low_rank_problem(np.random.default_rng(4), 3, 25, 4, 120, noise=0.01)
    A, S = cd(X, A0=A0, S0=S0, n_iter=40)
    assert A.shape == (3, 25, 4) and S.shape == (3, 4, 120)
    for p in range(3):
        Ap, Sp = cd(X[p], A0=A0[p], S0=S0[p], n_iter=40)
        close(A[p], Ap, np.float64)
        close(S[p], Sp, np.float64)


def test_objective_never_increases():
    X, A0, S0 = one_problem(seed=5, t=300)
    errs = []
    cd(X, A0=A0, S0=S0, n_iter=100, callback=lambda it, A, S: errs.append(np.linalg.norm(X - A @ S)))
    errs = np.array([np.linalg.norm(X - A0 @ S0), *errs])
    assert len(errs) == 101
    assert np.all(np.diff(errs) <= 1e-12 * errs[0])
    assert errs[-1] < 0.1 * errs[0]


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_tol_stops_where_scikit_learn_stops(tol):
    X, A0, S0 = one_problem(seed=6, m=20, t=100)
    W, H, n_sk = sk_cd(X, A0, S0, max_iter=1000, tol=tol)
    assert 1 < n_sk < 1000
    assert iterations(X, A0=A0, S0=S0, n_iter=1000, tol=tol) == n_sk
    A, S = cd(X, A0=A0, S0=S0, n_iter=1000, tol=tol)
    close(A, W, np.float64)
    close(S, H, np.float64)


def test_tol_1e4_iteration_count_is_scikit_learns():
    X, A0, S0 = one_problem(seed=7, m=15, n=3, t=60)
    _, _, n_sk = sk_cd(X, A0, S0, max_iter=3000, tol=1e-4)
    assert 1 < n_sk < 3000
    assert iterations(X, A0=A0, S0=S0, n_iter=3000, tol=1e-4) == n_sk


def test_batch_tol_runs_until_the_slowest_problem_has_converged():
    X, A0, S0 = low_rank_problem(np.random.default_rng(8), 3, 20, 3, 80, noise=0.05)
    alone = [iterations(X[p], A0=A0[p], S0=S0[p], n_iter=1000, tol=1e-3) for p in range(3)]
    assert max(alone) < 1000
    assert iterations(X, A0=A0, S0=S0, n_iter=1000, tol=1e-3) == max(alone)


def test_tol_none_runs_n_iter_and_callback_can_stop():
    X, A0, S0 = one_problem(seed=9, m=10, t=40)
    assert iterations(X, A0=A0, S0=S0, n_iter=37) == 37
    assert iterations(X, A0=A0, S0=S0, n_iter=37, tol=0.0) == 37
    seen = []
    cd(X, A0=A0, S0=S0, n_iter=100, callback=lambda it, A, S: seen.append(it) or it >= 7)
    assert seen == list(range(1, 8))
    seen.clear()
    cd(X, A0=A0, S0=S0, n_iter=20, callback=lambda it, A, S: seen.append(it), callback_every=5)
    assert seen == [5, 10, 15, 20]


def test_n_iter_zero_returns_a_copy_of_the_start():
    X, A0, S0 = one_problem(seed=10, m=10, t=40)
    A0_keep, S0_keep = A0.copy(), S0.copy()
    A, S = cd(X, A0=A0, S0=S0, n_iter=0)
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(S, S0)
    cd(X, A0=A0, S0=S0, n_iter=3)
    np.testing.assert_array_equal(A0, A0_keep)  # the caller's start is never modified
    np.testing.assert_array_equal(S0, S0_keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out(dtype):
    X, A0, S0 = one_problem(seed=11, m=12, t=50)
    Xt = torch.from_numpy(X).to(dtype)
    types = []
    A, S = cd(Xt, A0=torch.from_numpy(A0).to(dtype), S0=torch.from_numpy(S0).to(dtype), n_iter=10,
              callback=lambda it, A, S: types.append((type(A), type(S))))
    assert isinstance(A, torch.Tensor) and isinstance(S, torch.Tensor)
    assert A.dtype == dtype and S.dtype == dtype and A.device == Xt.device
    assert set(types) == {(torch.Tensor, torch.Tensor)}
    npdt = np.float32 if dtype == torch.float32 else np.float64
    An, Sn = cd(X.astype(npdt), A0=A0.astype(npdt), S0=S0.astype(npdt), n_iter=10)
    close(A.numpy(), An, npdt)
    close(S.numpy(), Sn, npdt)


def test_numpy_kinds_dtypes_and_ranks():
    X, _, _ = one_problem(seed=12, m=8, t=30)
    A, S = cd(X.astype(np.float32), 3, n_iter=3, random_state=0)
    assert isinstance(A, np.ndarray) and A.dtype == np.float32 and S.dtype == np.float32
    assert A.shape == (8, 3) and S.shape == (3, 30)
    A, S = cd(np.rint(10 * X).astype(np.int64), 3, n_iter=3, random_state=0)
    assert A.dtype == np.float64 and S.dtype == np.float64
    A, S = cd(X[None], 3, n_iter=3, random_state=0)
    assert A.shape == (1, 8, 3) and S.shape == (1, 3, 30)
    A, S = cd(X.tolist(), 3, n_iter=3, random_state=0, progress=True)
    assert isinstance(A, np.ndarray) and A.shape == (8, 3)


def test_all_zero_pixels_and_channels_stay_finite():
    X, _, _ = one_problem(seed=13, m=10, t=40)
    X[:, :5] = 0
    X[:2] = 0
    A, S = cd(X, 4, n_iter=50, random_state=0)
    assert np.isfinite(A).all() and np.isfinite(S).all()


def test_bad_input_is_refused():
    X, A0, S0 = one_problem(seed=14, m=6, n=2, t=10)
    bad = X.copy()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="X must be non-negative"):
        cd(bad, 2)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        cd(bad, 2)
    with pytest.raises(ValueError, match="X must be 2-D or 3-D"):
        cd(X[0], 2)
    with pytest.raises(ValueError, match="zero-size"):
        cd(np.zeros((6, 0)), 2)
    with pytest.raises(TypeError, match="X has dtype complex"):
        cd(X.astype(complex), 2)
    with pytest.raises(ValueError, match="n_components is required"):
        cd(X)
    with pytest.raises(ValueError, match="give both A0 and S0"):
        cd(X, A0=A0)
    with pytest.raises(ValueError, match="S0 has shape"):
        cd(X, A0=A0, S0=S0[:, :5])
    with pytest.raises(ValueError, match="A0 has 2 components but S0 has 3"):
        cd(X, A0=A0, S0=np.ones((3, 10)))
    with pytest.raises(ValueError, match="n_components=3 but A0/S0 have 2"):
        cd(X, 3, A0=A0, S0=S0)
    with pytest.raises(TypeError, match="A0 is a torch array but X is a numpy array"):
        cd(X, A0=torch.from_numpy(A0), S0=S0)
    with pytest.raises(ValueError, match="S0 must be non-negative"):
        cd(X, A0=A0, S0=-S0)
    with pytest.raises(ValueError, match="n_iter must be >= 0"):
        cd(X, 2, n_iter=-1)
    with pytest.raises(TypeError, match="n_iter must be an integer"):
        cd(X, 2, n_iter=2.5)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        cd(X, 2, tol=-1e-4)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        cd(X, 2, tol=float("nan"))
    with pytest.raises(TypeError, match="tol must be a real number"):
        cd(X, 2, tol="small")
    with pytest.raises(ValueError, match="init must be one of"):
        cd(X, 2, init="svd")
    with pytest.raises(ValueError, match="callback_every must be >= 1"):
        cd(X, 2, callback_every=0)
    with pytest.raises(TypeError, match="callback must be callable"):
        cd(X, 2, callback=3)


# The fused CPU kernel (fastmu.kernels.cpu_cd), against the torch sweeps as the slow oracle.

def _torch_iterations(X, A0, S0, n_iter):
    """The torch path's iterations (coordinate_descent._sweep) and each one's violation,
    A's sweep's and S's apart: ``(n_iter, b, 2)``."""
    from fastmu.baselines import coordinate_descent as cdm

    Xt = torch.from_numpy(X)
    At, St = torch.from_numpy(A0.copy()).mT.contiguous(), torch.from_numpy(S0.copy())
    viol = []
    for _ in range(n_iter):
        va = cdm._sweep(At, torch.bmm(St, St.mT), torch.bmm(St, Xt.mT), True)
        vs = cdm._sweep(St, torch.bmm(At, At.mT), torch.bmm(At, Xt), True)
        viol.append(np.stack([va.numpy(), vs.numpy()], axis=-1))
    return At.mT.numpy(), St.numpy(), np.array(viol)


def _fused_case(seed, b, m, n, t, dtype, n_iter):
    """A problem whose start has coordinates of S at 0 (the projected gradient's other branch), the
    torch sweeps' iterates and violations after ``n_iter``, and the fused kernel's buffers
    ``A, S, P, G, viol`` at the start."""
    X, A0, S0 = low_rank_problem(np.random.default_rng(seed), b, m, n, t, dtype=dtype, noise=0.05)
    S0[:, :, ::7] = 0
    ref = _torch_iterations(X, A0, S0, n_iter)
    bufs = (A0.copy(), S0.copy(), np.empty((b, m, n), dtype), np.empty((b, n, n), dtype),
            np.zeros((n_iter, b, 2)))
    return X, S0, ref, bufs


# (b, m, t, n): ranks 1, 3, 4, 5; t not a multiple of the pixel block (which schedule each runs
# depends on the thread count: test_fused_kernel_runs_each_column_schedule covers both)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b,m,t,n", [(1, 13, 2500, 4), (3, 9, 1100, 3), (8, 11, 300, 5), (2, 7, 1500, 1)])
def test_fused_kernel_matches_torch_sweeps(dtype, b, m, t, n):
    import numba

    from fastmu.kernels import cpu_cd

    X, _, (Ar, Sr, vr), (A, S, P, G, viol) = _fused_case(b * 100 + n, b, m, n, t, dtype, 6)
    # two calls: P, G carried over from the first (pg_valid) must continue the same run
    cpu_cd.cd_run(X, A, S, P, G, 2, False, viol[:2], numba.config.NUMBA_NUM_THREADS)
    cpu_cd.cd_run(X, A, S, P, G, 4, True, viol[2:], numba.config.NUMBA_NUM_THREADS)
    close(A, Ar, dtype, scale_of=Ar)
    close(S, Sr, dtype, scale_of=Sr)
    close(viol, vr, dtype, scale_of=vr)
    close(P, X.astype(np.float64) @ S.transpose(0, 2, 1), dtype, scale_of=P)
    close(G, S.astype(np.float64) @ S.transpose(0, 2, 1), dtype, scale_of=G)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", ["problem_major", "block_parallel"])
def test_fused_kernel_runs_each_column_schedule(monkeypatch, dtype, schedule):
    """Both column schedules on any thread count (the shape sized to the threads, a spy checks
    which ran), against the torch sweeps; the second call on the first's P, G."""
    import numba

    from fastmu.kernels import cpu, cpu_cd

    nthreads = numba.config.NUMBA_NUM_THREADS
    if schedule == "block_parallel" and nthreads < 2:
        pytest.skip("with one thread every batch runs problem-major")
    m, n = 11, 3
    b, t = schedule_shapes(nthreads, cpu.block_length(m, np.dtype(dtype).itemsize))[schedule]
    calls = record_calls(monkeypatch, cpu_cd, "_cd_problem_major", "_cd_block_parallel")
    X, _, (Ar, Sr, vr), (A, S, P, G, viol) = _fused_case(7, b, m, n, t, dtype, 4)
    cpu_cd.cd_run(X, A, S, P, G, 2, False, viol[:2], nthreads)
    cpu_cd.cd_run(X, A, S, P, G, 2, True, viol[2:], nthreads)
    assert calls == [f"_cd_{schedule}"] * 2
    close(A, Ar, dtype, scale_of=Ar)
    close(S, Sr, dtype, scale_of=Sr)
    close(viol, vr, dtype, scale_of=vr)


# tall problems (many rows, few pixels): the rows are shared out (kernels.cpu.row_chunks); nthreads
# at least the real thread count (it sizes per-thread scratch), and four times it; the last two
# shapes: several pixel units in the S half, several column blocks per chunk of rows
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b,m,t,n", [(1, 700, 60, 4), (3, 900, 40, 5), (1, 650, 130, 1), (1, 400, 600, 4),
                                     (1, 128, 3000, 4)])
@pytest.mark.parametrize("scale", [1, 4])
def test_fused_kernel_shares_out_the_rows_of_tall_problems(dtype, b, m, t, n, scale):
    import numba

    from fastmu.kernels import cpu_cd

    nthreads = scale * max(2, numba.config.NUMBA_NUM_THREADS)
    cpp = cpu_cd.row_chunks(b, m, t, np.dtype(dtype).itemsize, nthreads)
    assert cpp >= 2  # the schedule under test
    X, S0, (Ar, Sr, vr), (A, S, P, G, viol) = _fused_case(m + n, b, m, n, t, dtype, 6)
    cpu_cd.cd_run(X, A, S, P, G, 0, False, viol[:0], nthreads)  # no iteration: P, G of the start
    close(P, X.astype(np.float64) @ S0.transpose(0, 2, 1), dtype, scale_of=P)
    cpu_cd.cd_run(X, A, S, P, G, 1, True, viol[:1], nthreads)
    cpu_cd.cd_run(X, A, S, P, G, 5, True, viol[1:], nthreads)
    close(A, Ar, dtype, scale_of=Ar)
    close(S, Sr, dtype, scale_of=Sr)
    close(viol, vr, dtype, scale_of=vr)
    close(P, X.astype(np.float64) @ S.transpose(0, 2, 1), dtype, scale_of=P)
    close(G, S.astype(np.float64) @ S.transpose(0, 2, 1), dtype, scale_of=G)


def test_tall_problem_matches_scikit_learn():
    """A tall X through fastmu.cd (the row-parallel schedule where there are threads)."""
    X, A0, S0 = one_problem(seed=4, m=1200, t=40)
    W, H, _ = sk_cd(X, A0, S0, max_iter=20)
    A, S = cd(X, A0=A0, S0=S0, n_iter=20)
    close(A, W, np.float64)
    close(S, H, np.float64)


def test_fused_kernel_leaves_a_component_with_zero_gram_alone():
    """A component whose row of S is all zero has G[k, k] = 0: A's column k is not stepped
    (scikit-learn skips it), and the run stays finite."""
    X, A0, S0 = low_rank_problem(np.random.default_rng(5), 2, 10, 3, 400, noise=0.01)
    S0[:, 1] = 0
    A, S = cd(X, A0=A0, S0=S0, n_iter=5)
    Ar, Sr, _ = _torch_iterations(X, A0, S0, 5)
    assert np.isfinite(A).all() and np.isfinite(S).all()
    close(A, Ar, np.float64, scale_of=Ar)
    close(S, Sr, np.float64, scale_of=Sr)
    A1, _ = cd(X, A0=A0, S0=S0, n_iter=1)  # the first A sweep, where G[1, 1] = 0
    np.testing.assert_array_equal(A1[:, :, 1], A0[:, :, 1])


def test_cd_on_cpu_runs_the_fused_kernel(monkeypatch):
    """fastmu.cd on CPU arrays goes through kernels.cpu_cd (and returns what it computed)."""
    from fastmu.kernels import cpu_cd

    calls = []
    real = cpu_cd.cd_run

    def spy(*args):
        calls.append(args[5])
        return real(*args)

    monkeypatch.setattr(cpu_cd, "cd_run", spy)
    X, A0, S0 = one_problem(seed=3)
    cd(X, A0=A0, S0=S0, n_iter=7)
    assert sum(calls) == 7 and len(calls) <= 3  # slices (cpu_threads.run_in_slices): 1, then the rest
    calls.clear()
    cd(X, A0=A0, S0=S0, n_iter=7, callback=lambda it, A, S: None, callback_every=3)
    # no call crosses a callback; each slice is at most 16 times the one before
    assert calls[:2] == [1, 2] and sum(calls) == 7 and len(calls) <= 4


def test_fused_path_calls_back_on_schedule_and_takes_tensors_that_require_grad():
    """With a progress bar slicing the run, callbacks still come every callback_every
    iterations; torch inputs that require grad are read, not refused."""
    X, A0, S0 = one_problem(seed=4)
    seen = []
    cd(X, A0=A0, S0=S0, n_iter=100, callback=lambda it, A, S: seen.append(it), callback_every=15, progress=True)
    assert seen == list(range(15, 100, 15))
    Xt = torch.from_numpy(X).requires_grad_(True)
    A, S = cd(Xt, A0=torch.from_numpy(A0), S0=torch.from_numpy(S0), n_iter=5)
    A_np, S_np = cd(X, A0=A0, S0=S0, n_iter=5)
    np.testing.assert_array_equal(A.detach().numpy(), A_np)
    np.testing.assert_array_equal(S.detach().numpy(), S_np)



def test_read_only_x_is_read_without_a_warning():
    # A memory-mapped X is read-only; torch warned on wrapping it although X is
    # only read. torch warns once per process, hence a fresh one.
    import subprocess
    import sys

    code = ("import numpy as np, fastmu; from fastmu.baselines import cd\n"
            "X = np.random.default_rng(0).random((5, 40)); X.setflags(write=False)\n"
            "cd(X, 2, n_iter=3, random_state=0); fastmu.mu(X, 2, n_iter=3, backend='torch', random_state=0)\n")
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


# ---- S fixed (transform): the sweep kernel


def _torch_sweeps(F0, P, G, n_iter, tol, l1=0.0, l2=0.0):
    """The torch path's sweeps of F (b, n, r) from a fixed P, G and its stopping rule: F, sweeps run,
    each sweep's violation."""
    from fastmu.baselines import coordinate_descent as cdm

    F = torch.from_numpy(F0.copy())
    Pt, Gt = torch.from_numpy(P), torch.from_numpy(G)
    stop = cdm._Stopping(tol)
    viol = []
    for it in range(n_iter):
        viol.append(cdm._sweep(F, Gt, Pt, True, l1, l2).numpy())
        if tol is not None and stop(viol[-1]):
            break
    return F.numpy(), len(viol), np.array(viol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b,n,r", [(1, 3, 4500), (3, 4, 700), (2, 1, 50)])  # r > 2 runs of SWEEP_PIXELS
@pytest.mark.parametrize("calls", [(12,), (1, 2, 9)], ids=["one call", "three calls"])
def test_sweep_kernel_matches_the_torch_sweeps(dtype, b, n, r, calls):
    from fastmu.kernels import cpu_cd

    rng = np.random.default_rng(r + n)
    S = rng.random((b, n, 30)) + 0.05
    X = rng.random((b, r, n)) @ S + 0.05 * rng.random((b, r, 30))
    P, G = (S @ X.transpose(0, 2, 1)).astype(dtype), (S @ S.transpose(0, 2, 1)).astype(dtype)
    F0 = np.zeros((b, n, r), dtype)
    F0[:, :, ::5] = 0.3  # some coordinates start above 0, others at 0 (pg's other branch)
    for l1, l2 in [(0.0, 0.0), (0.2, 0.5)]:
        Fr, _, vr = _torch_sweeps(F0, P, G, sum(calls), None, l1, l2)
        F, viol = F0.copy(), np.zeros((sum(calls), b))
        first, converged = np.full(b, -1.0), np.zeros(b, np.bool_)
        done = 0
        for k in calls:
            assert cpu_cd.cd_sweeps(F, P, G, l1, l2, k, -1.0, viol[done:], first, converged,
                                    cpu_cd.natural_order(k, n, sweeps=1)) == k
            done += k
        close(F, Fr, dtype, scale_of=Fr)
        close(viol, vr, dtype, scale_of=vr)


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_sweep_kernel_stops_where_the_rule_does_across_calls(tol):
    """scikit-learn's rule over a batch, its state carried from call to call: the same stop
    whether the sweeps come in one call or one at a time."""
    from fastmu.kernels import cpu_cd

    rng = np.random.default_rng(7)
    b, n, r = 3, 4, 600
    S = rng.random((b, n, 40)) + 0.05
    X = rng.random((b, r, n)) @ S + 0.05 * rng.random((b, r, 40))
    P, G = S @ X.transpose(0, 2, 1), S @ S.transpose(0, 2, 1)
    F0 = np.zeros((b, n, r))
    Fr, n_ref, vr = _torch_sweeps(F0, P, G, 500, tol)
    assert 2 < n_ref < 500
    for k in (500, 1):
        F, viol = F0.copy(), np.zeros((500, b))
        first, converged = np.full(b, -1.0), np.zeros(b, np.bool_)
        done = 0
        while done < 500:
            kk = min(k, 500 - done)
            ran = cpu_cd.cd_sweeps(F, P, G, 0.0, 0.0, kk, tol, viol[done:], first, converged,
                                   cpu_cd.natural_order(kk, n, sweeps=1))
            done += ran
            if converged.all():
                break
        assert done == n_ref
        close(F, Fr, np.float64, scale_of=Fr)
        close(viol[:done], vr, np.float64, scale_of=vr)


def test_transform_on_the_cpu_runs_the_sweep_kernel(monkeypatch):
    """NMF(solver="cd").transform on host arrays goes through kernels.cpu_cd.cd_sweeps, stopping
    where scikit-learn's transform does (to the iterate)."""
    from fastmu.kernels import cpu_cd

    calls = record_calls(monkeypatch, cpu_cd, "cd_sweeps")
    rng = np.random.default_rng(1)
    H = rng.random((5, 40))
    X, X_new = (rng.random((60, 5)) @ H + 0.01 * rng.random((60, 40)) for _ in range(2))
    kw = dict(n_components=5, solver="cd", init="random", random_state=0, tol=1e-2, max_iter=400)
    ours, theirs = fastmu.NMF(**kw).fit(X), sk.NMF(**kw).fit(X)
    ours.components_ = theirs.components_.copy()  # the same H: transform alone compared
    for m in (ours, theirs):
        m.set_params(tol=1e-4, max_iter=2000)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sk_exceptions.ConvergenceWarning)  # stopped by tol, before max_iter
        np.testing.assert_allclose(ours.transform(X_new), theirs.transform(X_new), rtol=1e-9, atol=1e-12)
    assert calls


def test_a_huge_iteration_limit_allocates_nothing_for_iterations_that_never_run():
    """tol stops these long before n_iter / max_iter: nothing is sized by the limit (a
    MemoryError for 10¹² iterations' violations)."""
    rng = np.random.default_rng(2)
    X = rng.random((60, 3)) @ rng.random((3, 40)) + 0.01 * rng.random((60, 40))
    for Xk in (X, np.ascontiguousarray(X.T)):  # on X as given, and a tall X on its transpose
        A, S, n_it = cd(Xk, 3, n_iter=10**12, tol=1e-2, random_state=0, return_n_iter=True)
        assert n_it < 10_000
    model = fastmu.NMF(3, solver="cd", init="random", random_state=0, tol=1e-2, max_iter=200).fit(X)
    W = model.set_params(tol=1e-4, max_iter=10**12).transform(X)
    assert W.shape == (60, 3) and np.isfinite(W).all()
