"""Bad input to fastmu.mu: clear errors, nothing modified."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse
import torch

import fastmu

X = np.random.default_rng(0).random((6, 20))
A0 = np.ones((6, 2))
S0 = np.ones((2, 20))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(X=-X), ValueError, "non-negative"),
        (dict(X=np.where(X > 0.5, np.nan, X)), ValueError, "NaN or infinite"),
        (dict(X=np.where(X > 0.5, np.inf, X)), ValueError, "NaN or infinite"),
        (dict(X=X[0]), ValueError, "2-D or 3-D"),
        (dict(X=X[None, None]), ValueError, "2-D or 3-D"),
        (dict(X=np.zeros((0, 5))), ValueError, "zero-size"),
        (dict(X=np.zeros((3, 0))), ValueError, "zero-size"),
        (dict(X=X.astype(complex)), TypeError, "complex"),
        (dict(X=X.astype(str)), TypeError, "dtype"),
        (dict(X=X.astype(object)), TypeError, "dtype"),
        (dict(X="not an array"), TypeError, "must be an array"),
        (dict(X=scipy.sparse.csr_matrix(X)), TypeError, r"sparse csr_matrix; .*X.toarray\(\)"),
        (dict(X=X.astype(np.float16)), TypeError, "float16"),
        (dict(X=torch.ones(3, 4, dtype=torch.complex64)), TypeError, "complex64"),
        (dict(X=torch.ones(3, 4, dtype=torch.float16)), TypeError, "float16"),
        (dict(n_components=0), ValueError, "n_components must be >= 1"),
        (dict(n_components=-3), ValueError, "n_components must be >= 1"),
        (dict(n_components=2.5), TypeError, "n_components must be an integer"),
        (dict(n_components=None), ValueError, "n_components is required"),
        (dict(A0=A0), ValueError, "both A0 and S0"),
        (dict(A0=np.ones((5, 2)), S0=S0), ValueError, "A0 has shape"),
        (dict(A0=A0, S0=np.ones((2, 19))), ValueError, "S0 has shape"),
        (dict(A0=A0, S0=np.ones((3, 20))), ValueError, "components"),
        (dict(A0=-A0, S0=S0), ValueError, "A0 must be non-negative"),
        (dict(A0=A0, S0=S0 * np.nan), ValueError, "S0 contains NaN"),
        (dict(A0=np.ones((2, 6, 2)), S0=np.ones((2, 2, 20))), ValueError, "a batch of 2, but X is one problem"),
        (dict(A0=torch.ones(6, 2), S0=S0), TypeError, "torch array but X is a numpy"),
        (dict(n_iter=-1), ValueError, "n_iter"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(init="svd"), ValueError, "init must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(callback=3), TypeError, "callback must be callable"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(X=X, n_components=2, n_iter=2)
    if "A0" in kwargs:
        args["n_components"] = None
    args.update(kwargs)
    Xarg = args.pop("X")
    ncomp = args.pop("n_components")
    with pytest.raises(exc, match=match):
        fastmu.mu(Xarg, ncomp, **args)


def test_n_components_mismatch_with_start():
    with pytest.raises(ValueError, match="n_components=3"):
        fastmu.mu(X, 3, A0=A0, S0=S0)


def test_failed_call_modifies_nothing():
    Xc = X.copy()
    Xc[0, 0] = -1
    before = Xc.copy()
    with pytest.raises(ValueError):
        fastmu.mu(Xc, 2)
    np.testing.assert_array_equal(Xc, before)


def test_non_contiguous_input_is_handled():
    big = np.random.default_rng(1).random((12, 40))
    Xs = big[::2, ::2]
    assert not Xs.flags.c_contiguous
    A, S = fastmu.mu(Xs, 2, n_iter=5, random_state=0)
    A2, S2 = fastmu.mu(np.ascontiguousarray(Xs), 2, n_iter=5, random_state=0)
    np.testing.assert_array_equal(A, A2)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, fastmu; print(sorted(m for m in ('torch','numba','cupy','matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _low_rank(seed, m=20, t=300, n=3, b=None):
    rng = np.random.default_rng(seed)
    shape = () if b is None else (b,)
    return rng.random(shape + (m, n)) @ rng.random(shape + (n, t))


def _rel(X, A, S):
    return float(np.linalg.norm(X - A @ S) / np.linalg.norm(X))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_x_too_small_for_eps_warns_at_the_callers_line(kind):
    """At a scale where eps swamps the updates the factors vanish: a warning that points at the
    call, and the cure it names (dividing X by its mean) works."""
    Xs = _low_rank(1) * 1e-10
    arg = Xs if kind == "numpy" else torch.from_numpy(Xs)
    with pytest.warns(fastmu.ScaleWarning, match=r"X has mean \S+: at that scale eps=1e-12 .*divide X by its mean") as rec:
        A, S = fastmu.mu(arg, 3, n_iter=300, random_state=0)
    assert [w.filename for w in rec if w.category is fastmu.ScaleWarning][0] == __file__
    assert _rel(Xs, np.asarray(A), np.asarray(S)) > 0.5  # what the warning is about
    c = Xs.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A, S = fastmu.mu(Xs / c, 3, n_iter=300, random_state=0)
    assert _rel(Xs, A * c, S) < 0.05


def test_scale_warning_names_the_worst_problem_and_spares_ordinary_scales():
    Xb = _low_rank(2, b=3)
    Xb[1] *= 1e-9
    Xb[2] *= 1e-10
    with pytest.warns(fastmu.ScaleWarning, match=r"Problem 2 of X's 3 \(2 are affected\)"):
        fastmu.mu(Xb, 3, n_iter=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastmu.mu(X * 1e-5, 2, n_iter=2, random_state=0)  # eps 2e-5 of the denominators
        fastmu.mu(np.zeros((6, 20)), 2, n_iter=2, random_state=0)  # nothing to scale: the answer is 0


@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_float32_overflow_is_an_error_not_nan(solver):
    from fastmu.baselines import cd

    run = fastmu.mu if solver == "mu" else cd
    X32 = (_low_rank(3) * 1e30).astype(np.float32)
    with pytest.raises(FloatingPointError, match=r"overflowed float32: X's largest value, .*e\+30.* float64"):
        run(X32, 3, n_iter=20, random_state=0)
    A, S = run(X32.astype(np.float64), 3, n_iter=20, random_state=0)  # the remedy named
    assert np.isfinite(A).all() and np.isfinite(S).all()
    Xb = torch.from_numpy(np.stack([_low_rank(4), X32.astype(np.float64)]).astype(np.float32))
    with pytest.raises(FloatingPointError, match=r"for 1 of the 2 problems \(first: 1\)"):
        run(Xb, 3, n_iter=20, random_state=0)


@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_big_endian_input_is_read_as_native(solver):
    """FITS (astropy) arrays are big-endian: the same numbers in either byte order, the same result."""
    from fastmu.baselines import cd

    run = fastmu.mu if solver == "mu" else cd
    for dt in ("f8", "f4", "i4"):
        want = run(X.astype(dt), 2, n_iter=5, random_state=0)
        got = run(X.astype(">" + dt), 2, n_iter=5, random_state=0)
        for a, b in zip(got, want):
            assert a.dtype.isnative
            np.testing.assert_array_equal(a, b)
    got = run(X, A0=A0.astype(">f8"), S0=S0.astype(">f8"), n_iter=5)
    np.testing.assert_array_equal(got[0], run(X, A0=A0, S0=S0, n_iter=5)[0])


@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_unsigned_torch_integers_become_float64_as_int64_does(solver):
    from fastmu.baselines import cd

    run = fastmu.mu if solver == "mu" else cd
    Xi = torch.from_numpy((X * 100).astype(np.int64))
    want, _ = run(Xi, 2, n_iter=5, random_state=0)
    assert want.dtype == torch.float64
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        got, _ = run(Xi.to(dtype), 2, n_iter=5, random_state=0)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_non_finite_factors_blame_the_start_or_callback_not_a_modest_x(solver):
    """X (largest value ~1) cannot overflow: a start too large for the dtype, or a callback that
    wrote NaN into the factors, is named instead of X's scale."""
    from fastmu.baselines import cd

    run = fastmu.mu if solver == "mu" else cd
    want = r"factors became NaN or infinite \(float64\), although X's largest value, 0\.\d+, is far from"
    with pytest.raises(FloatingPointError, match=want + ".*given start.*callback"):
        run(X, A0=A0 * 1e300, S0=S0 * 1e300, n_iter=5)
    with pytest.raises(FloatingPointError, match=want):
        run(X, 2, n_iter=5, random_state=0, callback=lambda i, A, S: S.fill(np.nan))


def test_x_too_large_for_float64_overflows_without_numpy_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the scale check's mean**1.5 overflowed
        with pytest.raises(FloatingPointError, match=r"MU overflowed float64: X's largest value, .*e\+299"):
            fastmu.mu(X * 1e300, 2, n_iter=20, random_state=0)


def test_check_tol_and_check_random_state_name_the_argument():
    from fastmu.validation import check_random_state, check_tol

    assert check_tol(None) is None and check_tol(np.float32(0.5)) == 0.5 and check_tol(0) == 0.0
    for bad in ("abc", "1e-4", True, [1e-4]):
        with pytest.raises(TypeError, match="tol must be a real number or None"):
            check_tol(bad)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
            check_tol(bad)
    np.testing.assert_array_equal(check_random_state(3).standard_normal(4),
                                  np.random.RandomState(3).standard_normal(4))
    for rng in (np.random.RandomState(0), np.random.default_rng(0)):
        assert check_random_state(rng) is rng
    assert check_random_state(np.random) is np.random.mtrand._rand
    for bad in (1.5, "0", True, [1, 2]):
        with pytest.raises(TypeError, match="random_state must be None, an integer seed, a numpy RandomState or"):
            check_random_state(bad)
    with pytest.raises(ValueError, match=r"random_state must be a seed between 0 and 2\*\*32 - 1, got -1"):
        check_random_state(-1)
@pytest.mark.parametrize("solver", ["mu", "cd"])
def test_tol_and_random_state_of_the_wrong_type_are_named(solver):
    from fastmu.baselines import cd

    run = fastmu.mu if solver == "mu" else cd
    with pytest.raises(TypeError, match="tol must be a real number or None, got 'abc'"):
        run(X, 2, n_iter=2, tol="abc")
    with pytest.raises(TypeError, match="random_state must be None, an integer seed, a numpy RandomState or a numpy"):
        run(X, 2, n_iter=2, random_state=1.5)
    a, _ = run(X, 2, n_iter=2, random_state=np.random.default_rng(0))  # a Generator draws the start too
    b, _ = run(X, 2, n_iter=2, random_state=np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)


def test_masked_array_with_masked_entries_is_refused():
    # np.asarray drops the mask: the hidden values would be factorised as data
    Xm = np.ma.masked_greater(X, 0.9)
    assert Xm.mask.any()
    with pytest.raises(TypeError, match="masked array.*filled"):
        fastmu.mu(Xm, 2, n_iter=2)
    A, S = fastmu.mu(np.ma.masked_greater(X, 2.0), 2, n_iter=2, random_state=0)  # nothing masked: plain data
    A2, S2 = fastmu.mu(X, 2, n_iter=2, random_state=0)
    np.testing.assert_array_equal(A, A2)


@pytest.mark.parametrize("bad", ["1e-12", True, b"1"])
def test_eps_given_as_text_or_bool_is_refused_as_tol_is(bad):
    with pytest.raises(TypeError, match="eps must be a real number"):
        fastmu.mu(X, 2, n_iter=2, eps=bad)
