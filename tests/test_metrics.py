"""fastmu.metrics: known values, matching, invariances."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmu import metrics
from fastmu.metrics import cosine_matrix, evaluate, mean_cosine, nmse, rmse


def test_known_angle():
    A_true = np.array([[1.0, 0.0], [0.0, 1.0]])
    A_est = np.array([[np.cos(np.pi / 3), 0.0], [np.sin(np.pi / 3), 1.0]])
    assert metrics.mean_cosine(A_est, A_true) == pytest.approx((0.5 + 1.0) / 2)
    assert metrics.spectral_angle_deg(A_est, A_true) == pytest.approx(30.0)


def test_perfect_estimate():
    rng = np.random.default_rng(0)
    A, S = rng.random((10, 3)), rng.random((3, 50))
    sc = metrics.evaluate(A, S, A, S)
    assert sc.cos_A == pytest.approx(1.0) and sc.cos_S == pytest.approx(1.0)
    assert sc.angle_A_deg == pytest.approx(0.0, abs=1e-5)
    assert sc.rmse_A == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 1000), batch=st.integers(1, 3))
def test_matching_recovers_permutation_and_scale(n, seed, batch):
    rng = np.random.default_rng(seed)
    A = rng.random((batch, 12, n)) ** 4 + 1e-3  # peaky, well separated columns
    S = rng.random((batch, n, 40)) ** 4 + 1e-3
    perm = np.stack([rng.permutation(n) for _ in range(batch)])
    scale = rng.uniform(0.2, 5.0, size=(batch, n))
    # Estimated component j is true component perm_inv[j]: A_est[:, perm[k]] = A[:, k] * scale
    A_est = np.empty_like(A)
    S_est = np.empty_like(S)
    for b in range(batch):
        A_est[b][:, perm[b]] = A[b] * scale[b]
        S_est[b][perm[b]] = S[b] / scale[b][:, None]
    sc = metrics.evaluate(A_est, S_est, A, S)
    np.testing.assert_array_equal(sc.perm, perm)
    np.testing.assert_allclose(sc.cos_A, 1.0)
    np.testing.assert_allclose(sc.rmse_S, 0.0, atol=1e-10)


def test_no_match_keeps_order():
    A = np.eye(3)
    sc = metrics.evaluate(A[:, ::-1], np.eye(3)[::-1], A, np.eye(3), match=False)
    assert sc.cos_A == pytest.approx(1 / 3)


def test_torch_input_and_batch_shapes():
    A = torch.rand(4, 8, 2, dtype=torch.float64)
    S = torch.rand(4, 2, 16, dtype=torch.float64)
    sc = metrics.evaluate(A, S, A, S)
    assert sc.cos_A.shape == (4,)
    assert set(sc.summary()) >= {"cos_A", "angle_S_deg", "nmse_A_db"}


def test_zero_component_has_cosine_zero():
    A_true = np.ones((4, 2))
    A_est = np.ones((4, 2))
    A_est[:, 1] = 0
    c = metrics.component_cosines(A_est, A_true, axis=-2)
    np.testing.assert_allclose(c, [1.0, 0.0])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        metrics.evaluate(np.ones((3, 2)), np.ones((2, 5)), np.ones((3, 3)), np.ones((3, 5)))


@pytest.mark.parametrize("fn", [metrics.mean_cosine, metrics.spectral_angle_deg, metrics.rmse, metrics.nmse,
                                metrics.nmse_db])
def test_score_of_a_differently_shaped_estimate_is_an_error(fn):
    # broadcasting (4, 1) against (4, 3) would otherwise score one column against three
    with pytest.raises(ValueError, match=r"shape \(4, 1\) but the truth has shape \(4, 3\)"):
        fn(np.ones((4, 1)), np.ones((4, 3)))


@pytest.mark.parametrize("axis", [0, 3, -3])
def test_axis_other_than_a_component_axis_is_an_error(axis):
    A = np.ones((2, 4, 3))
    with pytest.raises(ValueError, match="axis must be -2"):
        metrics.mean_cosine(A, A, axis=axis)


def test_axis_may_be_given_as_a_positive_index():
    rng = np.random.default_rng(1)
    A, B = rng.random((2, 5, 3)), rng.random((2, 5, 3))
    np.testing.assert_array_equal(metrics.mean_cosine(A, B, axis=1), metrics.mean_cosine(A, B, axis=-2))
    np.testing.assert_array_equal(metrics.mean_cosine(A, B, axis=2), metrics.mean_cosine(A, B, axis=-1))


def test_matching_leaves_extra_estimated_components_unmatched():
    rng = np.random.default_rng(2)
    A = rng.random((10, 3))
    extra = np.concatenate([A[:, [2, 0, 1]], rng.random((10, 2))], axis=1)
    assert metrics.match_components(extra, A).tolist() == [1, 2, 0]


@pytest.mark.parametrize("perm", [[0, 0, 1], [0, 1, 3], [-1, 0, 1], [0.0, 1.0, 2.0], [0, 1, 2, 0]])
def test_apply_permutation_refuses_what_is_not_a_selection(perm):
    with pytest.raises(ValueError, match="distinct components of 0..2"):
        metrics.apply_permutation(np.ones((4, 3)), np.ones((3, 5)), np.array(perm))


def test_apply_permutation_takes_a_partial_match():
    # more estimated components than true ones: match_components leaves the extra out
    rng = np.random.default_rng(3)
    A_true = rng.random((20, 3))
    A_est = np.concatenate([A_true[:, ::-1], rng.random((20, 2))], axis=1)
    S_est = rng.random((5, 50))
    Ap, Sp = metrics.apply_permutation(A_est, S_est, metrics.match_components(A_est, A_true))
    np.testing.assert_array_equal(Ap, A_true)
    assert Sp.shape == (3, 50)


def test_a_batch_is_scored_against_one_truth():
    rng = np.random.default_rng(4)
    A = rng.random((20, 3))
    np.testing.assert_allclose(metrics.mean_cosine(np.stack([A, 2 * A]), A), [1.0, 1.0])
    np.testing.assert_allclose(metrics.rmse(np.stack([A, A]), A), [0.0, 0.0])


def test_match_components_needs_an_estimate_per_true_component():
    A = np.random.default_rng(0).random((20, 3))
    with pytest.raises(ValueError, match="fewer than the truth's 3"):
        metrics.match_components(A[:, :2], A)
    assert metrics.match_components(np.hstack([A, A[:, :1]]), A).tolist() == [0, 1, 2]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["A_est", "S_est", "A_true", "S_true"])
def test_non_finite_factors_are_refused_by_name(bad, where):
    rng = np.random.default_rng(0)
    args = dict(A_est=rng.random((20, 3)), S_est=rng.random((3, 30)), A_true=rng.random((20, 3)),
                S_true=rng.random((3, 30)))
    args[where][0, 0] = bad
    with pytest.raises(ValueError, match=f"{where} contains NaN or infinite"):
        metrics.evaluate(**args)


def test_zero_true_component_gives_finite_scores():
    rng = np.random.default_rng(0)
    A, S = rng.random((20, 3)), rng.random((3, 30))
    A_true = A.copy()
    A_true[:, 1] = 0
    with np.errstate(all="raise"):
        s = metrics.evaluate(A, S, A_true, S)
    assert np.isfinite(s.rmse_S) and np.isfinite(s.rmse_A)


@pytest.mark.parametrize("score", [metrics.mean_cosine, metrics.spectral_angle_deg])
def test_scores_refuse_nan_components(score):
    A = np.random.default_rng(0).random((5, 3))
    B = A.copy()
    B[0, 0] = np.nan
    with pytest.raises(ValueError, match="est contains NaN"):
        score(B, A)


@pytest.mark.parametrize("scale", [1e-170, 1e-300, 1e160])
def test_scores_do_not_depend_on_the_scale(scale):
    # float64 squares vanish below ~1e-162 and overflow from ~1e154: the norms are taken
    # after dividing by the largest entry, so identical factors score as identical at any scale
    rng = np.random.default_rng(3)
    A, S = rng.random((10, 3)), rng.random((3, 50))
    s = evaluate(A * scale, S, A * scale, S)
    assert float(s.cos_A) == pytest.approx(1.0, abs=1e-12) and float(s.cos_S) == pytest.approx(1.0, abs=1e-12)
    assert float(s.rmse_S) < 1e-12 and float(s.nmse_A_db) < -200
    assert float(rmse(A * scale, 2 * A * scale)) == pytest.approx(scale * float(rmse(A, 2 * A)), rel=1e-12)
    assert float(nmse(A * scale, 2 * A * scale)) == pytest.approx(0.25, rel=1e-12)


def test_scores_refuse_empty_complex_and_nan_input_and_take_bfloat16():
    import torch

    rng = np.random.default_rng(4)
    A, S = rng.random((10, 3)), rng.random((3, 50))
    with pytest.raises(ValueError, match="m, n, t ≥ 1"):
        evaluate(A[:, :0], S[:0], A[:, :0], S[:0])
    with pytest.raises(ValueError, match="m, n, t ≥ 1"):
        evaluate(A[:0], S, A[:0], S)
    with pytest.raises(TypeError, match="real factors"):
        evaluate(A.astype(complex), S, A, S)
    with pytest.raises(TypeError, match="real factors"):
        mean_cosine(torch.tensor(A, dtype=torch.complex64), A)
    for f in (rmse, nmse):
        with pytest.raises(ValueError, match="NaN or infinite"):
            f(A * np.nan, A)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cosine_matrix(A * np.inf, A, axis=-2)
    s = evaluate(torch.tensor(A).bfloat16(), torch.tensor(S).bfloat16(), A, S)
    assert float(s.cos_A) > 0.999
