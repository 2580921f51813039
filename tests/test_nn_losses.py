"""The paper's layer-weighted cosine loss (eq. 3) on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from fastmu.losses import layer_weights, mean_component_cosine, unrolled_loss


def test_layer_weights():
    torch.testing.assert_close(layer_weights(1), torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(layer_weights(2), torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(layer_weights(5), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        layer_weights(0)


def test_mean_component_cosine_hand_computed():
    # columns: (1,0) vs (1,1) -> 1/√2 ; (0,1) vs (0,3) -> 1
    est = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    true = torch.tensor([[[1.0, 0.0], [1.0, 3.0]]], dtype=torch.float64)
    torch.testing.assert_close(mean_component_cosine(est, true, dim=-2), torch.tensor([(1 / math.sqrt(2) + 1) / 2], dtype=torch.float64))
    # rows: (1,0) vs (1,0) -> 1 ; (0,1) vs (1,3) -> 3/√10
    torch.testing.assert_close(mean_component_cosine(est, true, dim=-1), torch.tensor([(1 + 3 / math.sqrt(10)) / 2], dtype=torch.float64))
    # a zero component scores 0, not NaN
    assert float(mean_component_cosine(torch.zeros(1, 2, 2), torch.ones(1, 2, 2), dim=-1)) == 0.0


def test_unrolled_loss_hand_computed():
    A_true = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # (1, 2, 2)
    S_true = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)  # (1, 2, 3)
    A_bad = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)  # each column: cos 1/√2
    S_bad = torch.ones(1, 2, 3, dtype=torch.float64)  # each row: cos 1/√3
    outs = [(A_bad, S_bad), (A_bad, S_true), (A_true, S_true)]  # v = 0, 0.5, 1
    expected = -(0.5 * (1 / math.sqrt(2) + 1) + 1.0 * 2)
    torch.testing.assert_close(unrolled_loss(outs, A_true, S_true), torch.tensor(expected, dtype=torch.float64))
    # one pair = L = 1, weight 1
    torch.testing.assert_close(
        unrolled_loss((A_bad, S_bad), A_true, S_true),
        torch.tensor(-(1 / math.sqrt(2) + 1 / math.sqrt(3)), dtype=torch.float64),
    )
    # explicit weights; sum vs mean over the batch
    torch.testing.assert_close(
        unrolled_loss(outs, A_true, S_true, weights=[1.0, 0.0, 0.0]),
        torch.tensor(-(1 / math.sqrt(2) + 1 / math.sqrt(3)), dtype=torch.float64),
    )
    two = [(A.expand(2, -1, -1), S.expand(2, -1, -1)) for A, S in outs]
    At, St = A_true.expand(2, -1, -1), S_true.expand(2, -1, -1)
    torch.testing.assert_close(unrolled_loss(two, At, St), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(unrolled_loss(two, At, St, reduction="sum"), torch.tensor(2 * expected, dtype=torch.float64))


def test_unrolled_loss_gradient_and_errors():
    A = torch.rand(2, 4, 2, dtype=torch.float64, requires_grad=True)
    S = torch.rand(2, 2, 5, dtype=torch.float64, requires_grad=True)
    At, St = torch.rand(2, 4, 2, dtype=torch.float64), torch.rand(2, 2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, s: unrolled_loss([(a, s)], At, St), (A, S))
    with pytest.raises(ValueError, match="one value per layer"):
        unrolled_loss([(A, S)], At, St, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="reduction"):
        unrolled_loss([(A, S)], At, St, reduction="max")
    with pytest.raises(ValueError, match="shape"):
        unrolled_loss([(A, S)], At[:, :3], St)
    with pytest.raises(ValueError, match="empty"):
        unrolled_loss([], At, St)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("S_shape", [(300, 3, 7), (3, 3, 7), (1, 3, 7), (2, 4, 7)])
def test_truths_of_different_batch_or_rank_are_refused(fused, S_shape):
    # The fused kernels size their per-component sums from A_true: an S_true with
    # more problems or components wrote past them (a segfault), fewer scored wrong.
    A_true, S_true = torch.rand(2, 5, 3), torch.rand(*S_shape)
    with pytest.raises(ValueError, match="must share the batch and n"):
        unrolled_loss([(A_true.clone(), S_true.clone())], A_true, S_true, fused=fused)


@pytest.mark.parametrize("fused", [False, True])
def test_tiny_float32_estimates_score_as_their_direction(fused):
    # float32 squares below ~1e-45 underflow: the norm of an estimate with
    # entries ~1e-25 would be 0 while its dot product with the truth is not.
    # The loss must still see the estimate's direction (cosine ≤ 1).
    g = torch.Generator().manual_seed(0)
    A_true, S_true = torch.rand(2, 6, 3, generator=g), torch.rand(2, 3, 40, generator=g)
    A_est = torch.rand(2, 6, 3, generator=g)
    S_est = torch.rand(2, 3, 40, generator=g)
    ref = unrolled_loss((A_est.double(), S_est.double()), A_true.double(), S_true.double(), fused=False)
    tiny = unrolled_loss((A_est * 1e-25, S_est * 1e-25), A_true, S_true, fused=fused)
    assert float(tiny) >= -2.0
    torch.testing.assert_close(tiny.double(), ref, rtol=1e-5, atol=1e-6)
    c = mean_component_cosine(S_est * 1e-25, S_true, dim=-1)
    assert c.dtype == torch.float32 and bool((c <= 1).all())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_zero_component_scores_zero_and_passes_no_gradient(fused, dtype):
    # cosine with a zero vector has no direction: 0, and no gradient (a clamped
    # denominator would pass t / tiny, ~1e37 in float32, into the training step)
    g = torch.Generator().manual_seed(1)
    A_true, S_true = torch.rand(2, 6, 3, generator=g, dtype=dtype), torch.rand(2, 3, 40, generator=g, dtype=dtype)
    A = torch.rand(2, 6, 3, generator=g, dtype=dtype)
    A[0, :, 1] = 0.0
    A.requires_grad_(True)
    S = torch.rand(2, 3, 40, generator=g, dtype=dtype, requires_grad=True)
    loss = unrolled_loss((A, S), A_true, S_true, reduction="sum", fused=fused)
    loss.backward()
    assert bool((A.grad[0, :, 1] == 0).all())
    assert bool(torch.isfinite(A.grad).all()) and float(A.grad.abs().max()) < 10
    with torch.no_grad():
        c = mean_component_cosine(A, A_true, dim=-2)
        expected = (torch.nn.functional.cosine_similarity(A[0], A_true[0], dim=0).sum() / 3)
    torch.testing.assert_close(c[0], expected.to(dtype))


@pytest.mark.parametrize("fused", [False, True])
def test_float64_cosines_stay_in_range_at_any_scale(fused):
    g = torch.Generator().manual_seed(2)
    A_true, S_true = torch.rand(2, 6, 3, generator=g, dtype=torch.float64), torch.rand(2, 3, 40, generator=g,
                                                                                          dtype=torch.float64)
    for scale, cos_A in ((1e-90, 1.0), (1e90, 1.0), (1e-170, 0.0)):  # 1e-170: squares underflow, below the floor
        loss = unrolled_loss((A_true * scale, S_true), A_true, S_true, reduction="mean", fused=fused)
        torch.testing.assert_close(float(loss), -(cos_A + 1.0), rtol=1e-12, atol=1e-12)
        c = mean_component_cosine(A_true * scale, A_true, dim=-2)
        assert bool(((c >= -1) & (c <= 1)).all())


@pytest.mark.parametrize("fused", [False, True])
def test_a_nan_estimate_makes_the_loss_nan(fused):
    A_true, S_true = torch.rand(1, 6, 3), torch.rand(1, 3, 40)
    A = A_true.clone()
    A[0, 2, 1] = float("nan")  # NaN norms must not pass for zero components
    assert torch.isnan(unrolled_loss((A, S_true), A_true, S_true, fused=fused))


def test_cosine_dim_out_of_range_is_refused():
    A = torch.rand(2, 6, 3)
    with pytest.raises(ValueError, match="dim=5 is out of range"):
        mean_component_cosine(A, A, 5)
