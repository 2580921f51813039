"""The fused cosine loss (``unrolled_loss(..., fused=True)``, kernels/cpu_cosine.py) against
the same loss in torch ops with autograd: values and gradients, float32 and float64."""
from __future__ import annotations

import pytest
import torch

from fastmu.losses import unrolled_loss


def _outputs(L, shape_A, shape_S, dtype, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    outs = [(torch.rand(shape_A, generator=g, dtype=dtype), torch.rand(shape_S, generator=g, dtype=dtype))
            for _ in range(L)]
    for A, S in outs:
        A.requires_grad_(grad)
        S.requires_grad_(grad)
    A_true = torch.rand(shape_A, generator=g, dtype=dtype)
    S_true = torch.rand(shape_S, generator=g, dtype=dtype)
    return outs, A_true, S_true


def _value_and_grads(outs, A_true, S_true, fused, **kw):
    for A, S in outs:
        A.grad = S.grad = None
    loss = unrolled_loss(outs, A_true, S_true, fused=fused, **kw)
    loss.backward()
    return loss.detach(), [t.grad for pair in outs for t in pair]


def _compare(outs, A_true, S_true, rtol, atol, **kw):
    v1, g1 = _value_and_grads(outs, A_true, S_true, True, **kw)
    v0, g0 = _value_and_grads(outs, A_true, S_true, False, **kw)
    torch.testing.assert_close(v1, v0, rtol=rtol, atol=atol)
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    return v1, g1


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 1e-4, 1e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shapes", [((3, 7, 3), (3, 3, 50)), ((2, 65, 4), (2, 4, 40000)), ((1, 1, 1), (1, 1, 1))])
def test_fused_loss_matches_torch_ops(dtype, rtol, atol, reduction, shapes):
    """40000 pixels × 4 components crosses the kernels' parallel threshold."""
    outs, A_true, S_true = _outputs(4, *shapes, dtype)
    _compare(outs, A_true, S_true, rtol, atol, reduction=reduction)


def test_fused_loss_weights_leading_dims_and_partial_grads():
    outs, A_true, S_true = _outputs(3, (2, 5, 2), (2, 2, 30), torch.float64, seed=1)
    _compare(outs, A_true, S_true, 1e-12, 1e-14, weights=[0.5, 0.0, 2.0])
    _compare(outs[:1], A_true, S_true, 1e-12, 1e-14)  # L = 1: weight 1
    # unbatched (m, n), (n, t) and two leading dims (c, b, m, n)
    for lead in ((), (3, 2)):
        o, At, St = _outputs(2, (*lead, 5, 2), (*lead, 2, 30), torch.float64, seed=2)
        _compare(o, At, St, 1e-12, 1e-14)
    # only the A factors want gradients; the S factors get none
    o, At, St = _outputs(3, (2, 5, 2), (2, 2, 30), torch.float64, seed=3, grad=False)
    for A, _ in o:
        A.requires_grad_(True)
    _, grads = _compare(o, At, St, 1e-12, 1e-14)  # layer 1 (v = 0) is not scored: no gradient
    assert all(g is not None for g in grads[2::2]) and all(g is None for g in grads[1::2] + grads[:1])


def test_fused_loss_degenerate_components():
    """A zero truth component and a zero estimated component: the clamp of the norms' product
    decides both the cosine (0) and the gradient, as in the torch expression."""
    outs, A_true, S_true = _outputs(2, (2, 5, 3), (2, 3, 20), torch.float64, seed=4)
    A_true[0, :, 1] = 0.0
    S_true[1, 2] = 0.0
    with torch.no_grad():
        outs[1][0][1, :, 0] = 0.0
        outs[1][1][0, 1] = 0.0
    v, grads = _compare(outs, A_true, S_true, 1e-12, 1e-14)
    assert torch.isfinite(v) and all(torch.isfinite(g).all() for g in grads if g is not None)


def test_fused_loss_gradcheck_and_second_derivative():
    outs, A_true, S_true = _outputs(3, (2, 4, 2), (2, 2, 9), torch.float64, seed=5)
    flat = [t for pair in outs for t in pair]

    def f(*ts):
        return unrolled_loss(list(zip(ts[0::2], ts[1::2])), A_true, S_true)

    assert torch.autograd.gradcheck(f, flat, eps=1e-6, atol=1e-8, rtol=1e-6)
    loss = f(*flat)
    # raises as the graph of the first derivative is asked for: it used to come back without
    # one, so that the second derivative was silently zero
    with pytest.raises(RuntimeError, match="not itself differentiable"):
        (g,) = torch.autograd.grad(loss, flat[-1], create_graph=True)
        g.sum().backward()


def test_loss_with_a_truth_that_requires_grad_uses_torch_ops():
    outs, A_true, S_true = _outputs(2, (2, 4, 2), (2, 2, 9), torch.float64, seed=6)
    A_true.requires_grad_(True)
    loss = unrolled_loss(outs, A_true, S_true)
    loss.backward()
    assert A_true.grad is not None and torch.isfinite(A_true.grad).all()


def test_loss_bad_inputs():
    outs, A_true, S_true = _outputs(2, (2, 4, 2), (2, 2, 9), torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        unrolled_loss([(outs[0][0].float(), outs[0][1])], A_true, S_true)
    with pytest.raises(TypeError, match="A_true must be a torch.Tensor"):
        unrolled_loss(outs, A_true.numpy(), S_true)
    with pytest.raises(TypeError, match="share dtype"):
        unrolled_loss(outs, A_true, S_true.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        unrolled_loss([(outs[0][0], [1.0])], A_true, S_true)
    with pytest.raises(ValueError, match="non-empty"):
        unrolled_loss([(A[:0], S[:0]) for A, S in outs], A_true[:0], S_true[:0])
