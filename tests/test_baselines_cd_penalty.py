"""fastmu.baselines.cd with L1/L2 penalties (fastmu.penalty): scikit-learn's regularised CD
(``_fit_coordinate_descent`` with ``l1_reg_W`` … ``l2_reg_H``, A = W, S = H) from the same start,
in each schedule of the fused kernel (kernels/cpu_cd.py) and on the torch path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmu.baselines import coordinate_descent as cdm
from fastmu.baselines.coordinate_descent import cd
from fastmu.penalty import Penalty

from helpers import low_rank_problem, record_calls, schedule_shapes

_nmf = pytest.importorskip("sklearn.decomposition._nmf")

# (l1_A, l2_A, l1_S, l2_S), each alone and all together. Sized to X ~ A S with entries of
# A and S in [0, 1): large enough to move the iterates well away from the unpenalised ones
# and to hold some coordinates at 0 (the L1 weights), small enough not to zero a factor.
PENALTIES = {
    "l1_A": Penalty(3.0, 0.0, 0.0, 0.0),
    "l2_A": Penalty(0.0, 20.0, 0.0, 0.0),
    "l1_S": Penalty(0.0, 0.0, 0.8, 0.0),
    "l2_S": Penalty(0.0, 0.0, 0.0, 4.0),
    "all": Penalty(3.0, 20.0, 0.8, 4.0),
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny problems: a second torch thread only adds synchronisation (as in test_baselines_cd)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sk_fit(X, A0, S0, pen, max_iter, tol=0.0, update_H=True, shuffle=False, random_state=None):
    """scikit-learn's ``_fit_coordinate_descent`` on one problem, penalised: (W, H, n_iter)."""
    return _nmf._fit_coordinate_descent(
        X, A0.copy(), S0.copy(), tol=tol, max_iter=max_iter, l1_reg_W=pen.l1_A, l1_reg_H=pen.l1_S,
        l2_reg_W=pen.l2_A, l2_reg_H=pen.l2_S, update_H=update_H, verbose=0, shuffle=shuffle,
        random_state=random_state)


def sk_iterations(X, A0, S0, pen, n_iter):
    """scikit-learn's iterations (``_update_coordinate_descent`` for W, then H, as
    ``_fit_coordinate_descent`` runs them) on a batch, one problem at a time:
    ``A (b, m, n)``, ``S (b, n, t)`` and each iteration's violations, W's sweep's and H's
    apart, ``(n_iter, b, 2)``."""
    A, S, viol = A0.copy(), S0.copy(), np.zeros((n_iter, X.shape[0], 2))
    for p in range(X.shape[0]):
        W, Ht = A0[p].copy(), S0[p].T.copy()  # copies: sklearn updates them in place
        for it in range(n_iter):
            viol[it, p, 0] = _nmf._update_coordinate_descent(X[p], W, Ht, pen.l1_A, pen.l2_A, False, None)
            viol[it, p, 1] = _nmf._update_coordinate_descent(X[p].T, Ht, W, pen.l1_S, pen.l2_S, False, None)
        A[p], S[p] = W, Ht.T
    return A, S, viol


def close(a, b, dtype, rtol=None):
    """Agreement to the dtype's rounding (as test_baselines_cd), relative to b's scale."""
    tol = rtol or (5e-5 if np.dtype(dtype) == np.float32 else 1e-11)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def problem(seed, b, m, n, t, dtype=np.float64):
    X, A0, S0 = low_rank_problem(np.random.default_rng(seed), b, m, n, t, dtype=dtype, noise=0.05)
    return X, A0, S0


def kernel_buffers(A0, S0, n_iter):
    b, m, n = A0.shape
    return A0.copy(), S0.copy(), np.empty((b, m, n), A0.dtype), np.empty((b, n, n), A0.dtype), np.zeros((n_iter, b, 2))


def check_kernel_against_sklearn(X, A0, S0, pen, nthreads, dtype, calls=(2, 3)):
    """``cd_run`` in calls of ``calls`` iterations (P, G carried between them) against scikit-learn:
    iterates and violations; the carried P, G still ``X Sᵀ`` and ``S Sᵀ`` (never shifted)."""
    from fastmu.kernels import cpu_cd

    n_iter = sum(calls)
    Ar, Sr, vr = sk_iterations(X, A0, S0, pen, n_iter)
    A, S, P, G, viol = kernel_buffers(A0, S0, n_iter)
    done = 0
    for k in calls:
        cpu_cd.cd_run(X, A, S, P, G, k, done > 0, viol[done:done + k], nthreads, tuple(pen))
        done += k
    close(A, Ar, dtype)
    close(S, Sr, dtype)
    # scikit-learn sums float32 violations in float32, the kernel in float64
    close(viol, vr, dtype, rtol=1e-3 if dtype == np.float32 else None)
    close(P, X.astype(np.float64) @ S.transpose(0, 2, 1).astype(np.float64), dtype)
    close(G, S.astype(np.float64) @ S.transpose(0, 2, 1).astype(np.float64), dtype)
    return A, S


# ---- through fastmu.cd (the fused kernel on NumPy arrays)

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_cd_matches_scikit_learn(dtype, name):
    pen = PENALTIES[name]
    X, A0, S0 = problem(1, 1, 30, 4, 200, dtype)
    X, A0, S0 = X[0], A0[0], S0[0]
    W, H, _ = sk_fit(X, A0, S0, pen, 25)
    A, S = cd(X, A0=A0, S0=S0, n_iter=25, **pen._asdict())
    assert A.dtype == dtype and S.dtype == dtype
    close(A, W, dtype)
    close(S, H, dtype)
    A_plain, S_plain = cd(X, A0=A0, S0=S0, n_iter=25)
    assert np.abs(A - A_plain).max() + np.abs(S - S_plain).max() > 1e-2 * np.abs(W).max()  # it did act


def test_l1_sets_coordinates_to_zero_as_scikit_learn():
    X, A0, S0 = problem(2, 1, 20, 4, 150)
    pen = Penalty(0.0, 0.0, 6.0, 0.0)  # strong enough to zero part of S
    W, H, _ = sk_fit(X[0], A0[0], S0[0], pen, 30)
    A, S = cd(X[0], A0=A0[0], S0=S0[0], n_iter=30, l1_S=6.0)
    assert 0 < (H == 0).sum() < H.size
    np.testing.assert_array_equal(S == 0, H == 0)
    close(A, W, np.float64)
    close(S, H, np.float64)


def test_l2_steps_a_component_whose_gram_diagonal_is_zero():
    """With S0's row 1 zero, ``S Sᵀ`` has a 0 at [1, 1]: unpenalised, A's column 1 is left
    alone; with ``l2_A > 0`` the shifted diagonal is positive and it is stepped (to 0 from a
    positive start, as scikit-learn does)."""
    X, A0, S0 = problem(3, 2, 12, 3, 300)
    S0[:, 1] = 0
    A1, _ = cd(X, A0=A0, S0=S0, n_iter=1, l2_A=2.0)
    assert not np.array_equal(A1[:, :, 1], A0[:, :, 1])
    Ar, Sr, _ = sk_iterations(X, A0, S0, Penalty(0.0, 2.0, 0.0, 0.0), 5)
    A, S = cd(X, A0=A0, S0=S0, n_iter=5, l2_A=2.0)
    close(A, Ar, np.float64)
    close(S, Sr, np.float64)


# ---- each schedule of the fused kernel

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", ["problem_major", "block_parallel"])
@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_fused_column_schedules_match_scikit_learn(monkeypatch, dtype, schedule, name):
    """Both column schedules (the shape sized to the threads, a spy checks which ran; as
    test_baselines_cd), two calls with P, G carried over."""
    import numba

    from fastmu.kernels import cpu, cpu_cd

    nthreads = numba.config.NUMBA_NUM_THREADS
    if schedule == "block_parallel" and nthreads < 2:
        pytest.skip("with one thread every batch runs problem-major")
    m, n = 11, 3
    b, t = schedule_shapes(nthreads, cpu.block_length(m, np.dtype(dtype).itemsize))[schedule]
    calls = record_calls(monkeypatch, cpu_cd, "_cd_problem_major", "_cd_block_parallel", "_cd_rows")
    X, A0, S0 = problem(7, b, m, n, t, dtype)
    S0[:, :, ::7] = 0  # coordinates at 0: the projected gradient's other branch
    check_kernel_against_sklearn(X, A0, S0, PENALTIES[name], nthreads, dtype)
    assert calls == [f"_cd_{schedule}"] * 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_fused_rows_schedule_matches_scikit_learn(monkeypatch, dtype, name):
    """A tall X with its rows shared out (several chunks: the summed ``AᵀA`` is shifted once)."""
    import numba

    from fastmu.kernels import cpu_cd

    nthreads = max(2, numba.config.NUMBA_NUM_THREADS)
    b, m, t, n = 1, 700, 60, 4
    assert cpu_cd.row_chunks(b, m, t, np.dtype(dtype).itemsize, nthreads) >= 2  # the schedule under test
    calls = record_calls(monkeypatch, cpu_cd, "_cd_problem_major", "_cd_block_parallel", "_cd_rows")
    X, A0, S0 = problem(8, b, m, n, t, dtype)
    S0[:, :, ::7] = 0
    check_kernel_against_sklearn(X, A0, S0, PENALTIES[name], nthreads, dtype, calls=(1, 4))
    assert calls == ["_cd_rows"] * 2


@pytest.mark.parametrize("schedule", ["problem_major", "block_parallel", "rows"])
def test_carried_pg_continue_one_penalised_run_bit_for_bit(schedule):
    """Calls of 1 + 2 + 3 iterations with P, G carried (``pg_valid``) give one 6-iteration
    call's bits: the kernel never leaves a shift in them to be applied twice."""
    import numba

    from fastmu.kernels import cpu, cpu_cd

    nthreads = max(2, numba.config.NUMBA_NUM_THREADS)
    if schedule == "rows":
        b, m, t, n = 1, 700, 60, 4
    else:
        m, n = 11, 3
        b, t = schedule_shapes(nthreads, cpu.block_length(m, 8))[schedule]
    X, A0, S0 = problem(9, b, m, n, t)
    pen = tuple(PENALTIES["all"])
    one = kernel_buffers(A0, S0, 6)
    cpu_cd.cd_run(X, *one[:4], 6, False, one[4], nthreads, pen)
    parts = kernel_buffers(A0, S0, 6)
    done = 0
    for k in (1, 2, 3):
        cpu_cd.cd_run(X, *parts[:4], k, done > 0, parts[4][done:done + k], nthreads, pen)
        done += k
    for x, y in zip(one, parts):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("schedule", ["problem_major", "block_parallel", "rows"])
def test_zero_penalty_is_no_penalty_bit_for_bit(schedule):
    import numba

    from fastmu.kernels import cpu, cpu_cd

    nthreads = max(2, numba.config.NUMBA_NUM_THREADS)
    if schedule == "rows":
        b, m, t, n = 1, 700, 60, 4
    else:
        m, n = 11, 3
        b, t = schedule_shapes(nthreads, cpu.block_length(m, 4))[schedule]
    X, A0, S0 = problem(10, b, m, n, t, np.float32)
    plain = kernel_buffers(A0, S0, 4)
    cpu_cd.cd_run(X, *plain[:4], 4, False, plain[4], nthreads)
    zero = kernel_buffers(A0, S0, 4)
    cpu_cd.cd_run(X, *zero[:4], 4, False, zero[4], nthreads, Penalty())
    for x, y in zip(plain, zero):
        np.testing.assert_array_equal(x, y)


# ---- the torch path

def torch_state(X, A0, S0):
    """``Xt``, ``At = A0ᵀ`` and a non-contiguous ``S`` (as ``_iterate`` takes them): a
    non-contiguous S keeps ``_iterate`` off the fused kernel, on the torch sweeps."""
    Xt = torch.from_numpy(X)
    At = torch.from_numpy(A0).mT.contiguous()
    S = torch.empty(S0.shape[0], S0.shape[2], S0.shape[1], dtype=Xt.dtype).mT
    S.copy_(torch.from_numpy(S0))
    assert not S.is_contiguous()
    return Xt, At, S


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_torch_path_matches_scikit_learn(monkeypatch, dtype, name):
    pen = PENALTIES[name]
    X, A0, S0 = problem(11, 2, 15, 3, 80, dtype)
    Ar, Sr, _ = sk_iterations(X, A0, S0, pen, 12)
    Xt, At, S = torch_state(X, A0, S0)
    monkeypatch.setattr(cdm, "_iterate_fused", None)  # would raise if called
    assert cdm._iterate(Xt, At, S, 12, None, penalty=pen) == 12
    close(At.mT.numpy(), Ar, dtype)
    close(S.numpy(), Sr, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_sweep_leaves_its_inputs_unshifted(dtype):
    X, A0, S0 = problem(12, 1, 10, 3, 40, dtype)
    Xt, At, S = torch_state(X, A0, S0)
    G, P = torch.bmm(S, S.mT), torch.bmm(S, Xt.mT)
    G0, P0 = G.clone(), P.clone()
    cdm._sweep(At, G, P, True, 1.5, 2.5)
    assert torch.equal(G, G0) and torch.equal(P, P0)


@pytest.mark.parametrize("name", ["l1_A", "l2_S", "all"])
def test_shuffled_orders_match_scikit_learn(name):
    """``_solve(order=RandomState(seed))``, the estimator's shuffle=True, against scikit-learn's
    ``shuffle=True, random_state=seed``: the same permutations, A's drawn before S's."""
    pen = PENALTIES[name]
    X, A0, S0 = problem(13, 1, 20, 4, 100)
    W, H, _ = sk_fit(X[0], A0[0], S0[0], pen, 15, shuffle=True, random_state=42)
    A, S, done = cdm._solve(X[0], A0=A0[0], S0=S0[0], n_iter=15, order=np.random.RandomState(42), penalty=pen)
    assert done == 15
    close(A, W, np.float64)
    close(S, H, np.float64)


# ---- the stopping rule and transform (update_S=False)

@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_tol_stops_where_scikit_learn_stops(tol):
    pen = PENALTIES["all"]
    X, A0, S0 = problem(14, 1, 20, 3, 100)
    X, A0, S0 = X[0], A0[0], S0[0]
    W, H, n_sk = sk_fit(X, A0, S0, pen, 1000, tol=tol)
    assert 1 < n_sk < 1000
    A, S, done = cd(X, A0=A0, S0=S0, n_iter=1000, tol=tol, return_n_iter=True, **pen._asdict())
    assert done == n_sk
    close(A, W, np.float64)
    close(S, H, np.float64)
    Xt, At, St = torch_state(X[None], A0[None], S0[None])  # and on the torch path
    assert cdm._iterate(Xt, At, St, 1000, tol, penalty=pen) == n_sk
    close(At.mT.numpy()[0], W, np.float64)
    close(St.numpy()[0], H, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["l1_A", "l2_A", "all"])
def test_transform_update_S_false_matches_scikit_learn(dtype, name):
    """``_iterate(update_S=False)`` (the estimator's transform): W alone from zeros, with A's
    weights only (S's are ignored: S is not updated), against scikit-learn's
    ``update_H=False``, iteration count included."""
    pen = PENALTIES[name]
    X, _, H = problem(15, 1, 25, 3, 90, dtype)
    W0 = np.zeros((1, 25, 3), dtype)
    W, _, n_sk = sk_fit(X[0], W0[0], H[0], pen, 200, tol=1e-4, update_H=False)
    Xt = torch.from_numpy(X)
    Ht = torch.from_numpy(H.copy())
    Wt = torch.zeros((1, 3, 25), dtype=Xt.dtype)
    n = cdm._iterate(Xt, Wt, Ht, 200, 1e-4, update_S=False, penalty=pen)
    np.testing.assert_array_equal(Ht.numpy(), H)
    if dtype == np.float64:  # float32 violations are summed differently (scikit-learn in float32)
        assert n == n_sk
    close(Wt.mT.numpy()[0], W, dtype)
    Wa = torch.zeros((1, 3, 25), dtype=Xt.dtype)  # A's weights alone: the same bits
    cdm._iterate(Xt, Wa, Ht, n, None, update_S=False, penalty=Penalty(pen.l1_A, pen.l2_A, 0.0, 0.0))
    Wb = torch.zeros((1, 3, 25), dtype=Xt.dtype)
    cdm._iterate(Xt, Wb, Ht, n, None, update_S=False, penalty=Penalty(pen.l1_A, pen.l2_A, 7.0, 9.0))
    assert torch.equal(Wa, Wb)


# ---- zero penalty, errors

def test_zero_penalty_is_no_penalty_through_cd_and_the_torch_path():
    X, A0, S0 = problem(16, 2, 12, 3, 60)
    A, S = cd(X, A0=A0, S0=S0, n_iter=8)
    Az, Sz = cd(X, A0=A0, S0=S0, n_iter=8, l1_A=0.0, l2_A=0, l1_S=0.0, l2_S=0)
    np.testing.assert_array_equal(A, Az)
    np.testing.assert_array_equal(S, Sz)
    runs = []
    for pen in (None, Penalty(), (0, 0, 0, 0)):
        Xt, At, St = torch_state(X, A0, S0)
        cdm._iterate(Xt, At, St, 8, 1e-9, penalty=pen)
        runs.append((At, St))
    for At, St in runs[1:]:
        assert torch.equal(At, runs[0][0]) and torch.equal(St, runs[0][1])


@pytest.mark.parametrize("name", ["l1_A", "l2_A", "l1_S", "l2_S"])
def test_bad_weights_are_refused(name):
    X, A0, S0 = problem(17, 1, 6, 2, 10)
    X = X[0]
    for bad in (-1.0, -1e-300, float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            cd(X, 2, n_iter=2, **{name: bad})
    for bad in ("0.1", None, True, [0.1], 1j):
        with pytest.raises(TypeError, match=f"{name} must be a real number"):
            cd(X, 2, n_iter=2, **{name: bad})
    A, _ = cd(X, 2, n_iter=2, random_state=0, **{name: np.float32(0.5)})  # NumPy scalars and ints are reals
    assert np.isfinite(A).all()
    cd(X, 2, n_iter=2, random_state=0, **{name: 1})


def test_bad_penalty_arguments_of_the_private_entry_points():
    X, A0, S0 = problem(18, 1, 6, 2, 10)
    with pytest.raises(ValueError, match="4 weights"):
        cdm._solve(X, 2, n_iter=1, penalty=(0.1, 0.2))
    with pytest.raises(TypeError, match="penalty must be"):
        cdm._solve(X, 2, n_iter=1, penalty=0.1)
    with pytest.raises(ValueError, match="l2_S must be a finite number >= 0"):
        cdm._solve(X, 2, n_iter=1, penalty=(0.0, 0.0, 0.0, -2.0))
    Xt, At, St = torch_state(X, A0, S0)
    with pytest.raises(ValueError, match="l1_A must be a finite number >= 0"):
        cdm._iterate(Xt, At, St, 1, None, penalty=(float("nan"), 0.0, 0.0, 0.0))
