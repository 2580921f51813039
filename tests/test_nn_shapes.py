"""The learned layers on odd shapes and settings (CPU): the fused kernels against plain torch autograd.

A randomized sweep (b 1..5; m 1..70 and tall 128..257; n 1..16; t 1..4097,
t = 1 and primes included; 1..6 layers; float32 and float64; W shared or per
problem; any subset of X, A, S, W requiring grad; upstream gradients on the
last layer or on any of them; the three entry points, NALMU and ALMU with a
frozen or trained front, the cosine loss; 1, 2 and 3 Numba threads; the
explicit 256-bit tiles too, under ``FASTMU_CPU_ZMM=0``) found no disagreement
beyond rounding. What it did show is where a comparison must not be read
naively:

- the gradient w.r.t. A is a cancellation: ``A'`` is invariant to the scale
  of A up to ε, so at rank 1 the whole of ``∂A'/∂A`` is ε-sized and both
  implementations return rounding noise (checked here only from n = 2 on);
- below the smallest normal number the kernels flush to zero (kernels/fpenv.py),
  where torch keeps subnormals: data far too small for ε (README, ScaleWarning).

Kept here: the shapes of that sweep that the other test files do not cover
(m < n, one pixel, ranks past a multiple of 4 and above 8, t across the
backward's 1024-pixel blocks and the forward's chunks, odd batches on the
block-parallel backward, a tall X on the row-parallel forward, zero data and
zero weights), a float64 gradcheck on one of them, and the thread count.
"""
from __future__ import annotations

import numba
import pytest
import torch

from fastmu import ALMU, NALMU
from fastmu.losses import unrolled_loss
from fastmu.nn import learned_mu_step, learned_mu_unroll
from fastmu.nn.functional import learned_mu_step_pg
from fastmu.reference import mu_step_torch

D = torch.float64


def _inputs(b, m, n, t, L, per_problem, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(b, m, t, generator=g, dtype=D)
    A = torch.rand(b, m, n, generator=g, dtype=D) + 0.1
    S = torch.rand(b, n, t, generator=g, dtype=D) + 0.1
    Ws = torch.rand(L, *((b,) if per_problem else ()), m, n, generator=g, dtype=D) + 0.5
    return [v.to(dtype) for v in (X, A, S, Ws)]


def _upstream(b, m, n, t, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, m, n, generator=g, dtype=D), torch.randn(b, n, t, generator=g, dtype=D))
            for _ in range(L)]


def _run(entry, X, A, S, Ws, ups, wanted="XASW"):
    """Every layer's outputs and the gradients of ``Σ_l <A_l, gA_l> + <S_l, gS_l>`` w.r.t. ``wanted``."""
    ins = [v.detach().clone().requires_grad_(name in wanted) for v, name in zip((X, A, S, Ws), "XASW")]
    Xi, Ai, Si, Wi = ins
    if entry == "unroll":
        outs = learned_mu_unroll(Xi, Ai, Si, Wi, return_all=True)
    elif entry == "step_pg":  # the per-layer Function handing P, G on
        outs, a, s, pg = [], Ai, Si, None
        for l in range(Wi.shape[0]):
            a, s, pg = learned_mu_step_pg(Xi, a, s, Wi[l].contiguous(), pg=pg, want_pg=l < Wi.shape[0] - 1)
            outs.append((a, s))
    else:
        step = learned_mu_step if entry == "step" else mu_step_torch
        outs, a, s = [], Ai, Si
        for l in range(Wi.shape[0]):
            a, s = step(Xi, a, s, Wi[l])
            outs.append((a, s))
    loss = sum((a * gA.to(a.dtype)).sum() + (s * gS.to(s.dtype)).sum() for (a, s), (gA, gS) in zip(outs, ups))
    grads = torch.autograd.grad(loss, [v for v in ins if v.requires_grad])
    return [v.detach() for pair in outs for v in pair], list(grads)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# (b, m, n, t, L): what each adds, see the module docstring
ODD = [
    (1, 1, 8, 1, 3),      # one channel, one pixel, rank above m
    (5, 3, 7, 17, 4),     # odd batch: block-parallel backward; rank 4 + 3
    (3, 13, 6, 1031, 3),  # t past the backward's 1024-pixel block, chunked forward
    (2, 70, 9, 1025, 2),  # rank above 8; two pixel blocks, problem-major
    (1, 9, 3, 4099, 1),   # one problem: several blocks per forward chunk
    (3, 2, 2, 2, 6),      # tiny, six layers
    (1, 130, 5, 300, 2),  # tall X: the row-parallel forward
]


@pytest.mark.parametrize("per_problem", [False, True])
@pytest.mark.parametrize("shape", ODD, ids=[f"b{b}m{m}n{n}t{t}L{L}" for b, m, n, t, L in ODD])
def test_odd_shapes_match_autograd_float64(shape, per_problem):
    b, m, n, t, L = shape
    X, A, S, Ws = _inputs(b, m, n, t, L, per_problem)
    ups = _upstream(b, m, n, t, L)
    ref_out, ref_g = _run("torch", X, A, S, Ws, ups)
    for entry in ("unroll", "step_pg"):
        out, grads = _run(entry, X, A, S, Ws, ups)
        for mine, ref in zip(out + grads, ref_out + ref_g):
            assert mine.shape == ref.shape
            assert _rel(mine, ref) < 1e-10, entry


@pytest.mark.parametrize("shape", [(5, 3, 7, 17, 4), (3, 13, 6, 1031, 3), (1, 130, 5, 300, 2)])
def test_odd_shapes_float32_close_to_float64(shape):
    """float32 kernels against the float64 reference, to a tolerance that grows with depth."""
    b, m, n, t, L = shape
    X, A, S, Ws = _inputs(b, m, n, t, L, per_problem=True)
    ups = _upstream(b, m, n, t, L)
    ref_out, ref_g = _run("torch", X, A, S, Ws, ups)
    out, grads = _run("unroll", *(v.float() for v in (X, A, S, Ws)), ups)
    for mine, ref in zip(out, ref_out):
        assert mine.dtype == torch.float32 and _rel(mine, ref) < 1e-5 * (1 + L)
    for mine, ref in zip(grads, ref_g):
        assert _rel(mine, ref) < 1e-4 * (1 + L)


@pytest.mark.parametrize("wanted", ["W", "X", "AS"])
def test_subsets_and_rank_one(wanted):
    """Any subset of the inputs, at rank 1 too (where gA is rounding noise: compared when n > 1 only)."""
    for shape in [(4, 65, 1, 33, 2), (3, 4, 5, 257, 3)]:
        b, m, n, t, L = shape
        X, A, S, Ws = _inputs(b, m, n, t, L, per_problem=False, seed=3)
        ups = _upstream(b, m, n, t, L, seed=4)
        _, ref = _run("torch", X, A, S, Ws, ups, wanted)
        _, mine = _run("unroll", X, A, S, Ws, ups, wanted)
        for name, a, r in zip([c for c in "XASW" if c in wanted], mine, ref):
            if name == "A" and n == 1:
                continue
            assert _rel(a, r) < 1e-10, (shape, name)


def test_zero_data_and_zero_weights():
    """An all-zero problem, a zero channel, a zero pixel and zero entries of W: same values and
    gradients as the reference, all finite."""
    b, m, n, t, L = 3, 6, 5, 40, 3
    X, A, S, Ws = _inputs(b, m, n, t, L, per_problem=True, seed=5)
    X[1] = 0
    X[0, 2] = 0
    X[2, :, 7] = 0
    Ws[Ws < 0.7] = 0
    ups = _upstream(b, m, n, t, L, seed=6)
    ref_out, ref_g = _run("torch", X, A, S, Ws, ups)
    out, grads = _run("unroll", X, A, S, Ws, ups)
    for mine, ref in zip(out + grads, ref_out + ref_g):
        assert torch.isfinite(mine).all()
        assert _rel(mine, ref) < 1e-10


def test_gradcheck_odd_shape():
    """float64 gradcheck through a stack with m < n, one channel, two pixels, W per problem."""
    ins = [v.requires_grad_(True) for v in _inputs(3, 1, 6, 2, 2, per_problem=True, seed=7)]

    def f(X, A, S, Ws):
        return [v for pair in learned_mu_unroll(X, A, S, Ws, return_all=True) for v in pair]

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one Numba thread")
@pytest.mark.parametrize("shape", [(3, 13, 6, 1031, 3), (1, 130, 5, 300, 2), (5, 3, 7, 17, 2)])
def test_thread_count_does_not_change_results(shape):
    """Bit for bit, forward and backward, on one thread and on all (the schedule is the same).

    On two threads the shapes run block-parallel, row-parallel and block-parallel (forward)."""
    b, m, n, t, L = shape
    X, A, S, Ws = _inputs(b, m, n, t, L, per_problem=False, dtype=torch.float32, seed=8)
    ups = _upstream(b, m, n, t, L, seed=9)
    before = numba.get_num_threads()
    runs = []
    try:
        for k in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(k)
            out, grads = _run("unroll", X, A, S, Ws, ups)
            runs.append(out + grads)
    finally:
        numba.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("kind", ["nalmu", "almu", "almu_frozen"])
@pytest.mark.parametrize("shape", [(3, 3, 7, 17), (1, 70, 2, 1025)])
def test_models_on_odd_shapes_match_plain_autograd(kind, shape):
    """The models and the fused loss against fused=False and the loss in torch ops: loss, factors and
    the gradients of every trained parameter and of X (a single problem given as 2-D X)."""
    b, m, n, t = shape
    g = torch.Generator().manual_seed(10)
    A_true = torch.rand(b, m, n, generator=g, dtype=D)
    S_true = torch.rand(b, n, t, generator=g, dtype=D)
    X = A_true @ S_true + 0.01 * torch.rand(b, m, t, generator=g, dtype=D)
    if b == 1:
        X, A_true, S_true = X[0], A_true[0], S_true[0]
    torch.manual_seed(0)
    if kind == "nalmu":
        model = NALMU(3, m, n, dtype=D)
        theta = [model.theta]
    else:
        model = ALMU(2, 2, m, n, hidden=(5, 3), dtype=D)
        theta = [model.front.theta, *model.mlps.weights]
        if kind == "almu_frozen":
            model.freeze_front()
    with torch.no_grad():
        for p in theta:
            p.uniform_(-0.3, 0.3, generator=g)
    res = []
    for fused in (True, False):
        model.fused = fused
        Xi = X.clone().requires_grad_(True)
        outs = model(Xi, return_all=True)
        loss = unrolled_loss(outs, A_true, S_true, fused=fused)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [*params, Xi])
        res.append([loss.detach(), *(v.detach() for pair in outs for v in pair), *grads])
    for mine, ref in zip(*res):
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-11 * float(ref.abs().max()))
