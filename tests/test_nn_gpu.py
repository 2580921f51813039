"""The learned-MU layer and NALMU on a real GPU: forward, gradcheck, gradients vs autograd.

Skipped without a CUDA GPU visible to both torch and Numba (and under the
simulator, whose device arrays are host memory). Run on a GPU machine with
``python -m pytest -m gpu tests/test_nn_gpu.py``.
"""
from __future__ import annotations

import pytest

from helpers import learned_layer_inputs, real_cuda_gpu

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

if not (torch.cuda.is_available() and real_cuda_gpu()):
    pytest.skip("needs a CUDA GPU visible to torch and Numba (simulator off)", allow_module_level=True)

from fastmu.losses import unrolled_loss  # noqa: E402
from fastmu.nn import NALMU, learned_mu_step, learned_mu_unroll  # noqa: E402
from fastmu.reference import mu_step_torch  # noqa: E402


@pytest.fixture(params=["rows", "regs"])
def staging(request):
    """The forward's staging of X; "regs" also switches the backward's passes to that layout."""
    from fastmu.kernels import cuda as kc

    saved = kc.get_config()
    kc.set_staging(request.param)
    yield request.param
    kc.set_config(**saved)


def _cuda_inputs(*shape, **kw):
    return [v.cuda() for v in learned_layer_inputs(*shape, **kw)]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("per_problem", [False, True])
# m = 67 leaves the "regs" layout's last warp partial (5 × 14 rows); the others fill theirs
@pytest.mark.parametrize("shape", [(3, 13, 5, 300), (2, 65, 4, 5000), (2, 67, 4, 700), (1, 7, 1, 1)])
def test_forward_matches_reference_on_gpu(dtype, rtol, per_problem, shape, staging):
    if dtype == torch.float32:
        # P = X Sᵀ sums t float32 products (in atomics' varying order): error grows ~√t
        rtol = rtol * max(1.0, (shape[3] / 600) ** 0.5)
    X, A, S, W = _cuda_inputs(*shape, dtype=dtype, per_problem=per_problem)
    A1, S1 = learned_mu_step(X, A, S, W)
    assert A1.is_cuda and S1.is_cuda and A1.dtype == dtype
    rA, rS = mu_step_torch(X.double(), A.double(), S.double(), W.double())
    torch.testing.assert_close(A1.double(), rA, rtol=rtol, atol=0)
    torch.testing.assert_close(S1.double(), rS, rtol=rtol, atol=0)


@pytest.mark.parametrize("per_problem", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 3, 37), (2, 9, 4, 300)])  # 300 > one 128-pixel tile
def test_gradcheck_on_gpu(per_problem, shape):
    ins = _cuda_inputs(*shape, per_problem=per_problem)
    for v in ins:
        v.requires_grad_(True)
    # fast mode (a random projection of the Jacobian) on the larger shape: full mode is
    # thousands of forward calls, each a few launches
    assert torch.autograd.gradcheck(learned_mu_step, tuple(ins), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=shape[3] > 100)


@pytest.mark.parametrize("per_problem,m", [(False, 65), (True, 65), (False, 67)])  # 67: a partial last warp
def test_gradients_match_autograd_and_cpu(per_problem, m, staging):
    """GPU gradients equal autograd through the torch reference and the CPU kernels' gradients."""
    X, A, S, W = learned_layer_inputs(3, m, 4, 2000, per_problem=per_problem, seed=3)
    g = torch.Generator().manual_seed(7)
    gA = torch.randn(A.shape, generator=g, dtype=A.dtype)
    gS = torch.randn(S.shape, generator=g, dtype=S.dtype)
    grads = []
    for f, dev in ((learned_mu_step, "cuda"), (mu_step_torch, "cuda"), (learned_mu_step, "cpu")):
        ins = [v.to(dev).requires_grad_(True) for v in (X, A, S, W)]
        A1, S1 = f(*ins)
        ((A1 * gA.to(dev)).sum() + (S1 * gS.to(dev)).sum()).backward()
        grads.append([v.grad.cpu() for v in ins])
    for mine, ref, cpu in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
        torch.testing.assert_close(mine, cpu, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


def test_gpu_backward_is_deterministic(staging):
    """The backward sums its partials in a fixed order: two backward passes over one
    forward agree bit for bit. (The forward's P/G reductions use atomics, whose order
    varies on a GPU, so two forwards may differ in the last bits.)"""
    X, A, S, W = _cuda_inputs(4, 65, 4, 3000, dtype=torch.float32, seed=9)
    ins = [v.clone().requires_grad_(True) for v in (X, A, S, W)]
    A1, S1 = learned_mu_step(*ins)
    loss = (A1 ** 2).sum() + S1.sin().sum()
    g1 = torch.autograd.grad(loss, ins, retain_graph=True)
    g2 = torch.autograd.grad(loss, ins)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_fused_nalmu_matches_plain_on_gpu():
    g = torch.Generator().manual_seed(2)
    X = (3.0 * torch.rand(2, 9, 700, generator=g, dtype=torch.float64)).cuda()
    theta = (0.2 * torch.randn(6, 9, 3, generator=g, dtype=torch.float64)).cuda()
    A_true = torch.rand(2, 9, 3, generator=g, dtype=torch.float64).cuda()
    S_true = torch.rand(2, 3, 700, generator=g, dtype=torch.float64).cuda()
    res = []
    for fused in (True, False):
        model = NALMU(6, 9, 3, fused=fused, dtype=torch.float64, device="cuda")
        with torch.no_grad():
            model.theta.copy_(theta)
        outs = model(X, return_all=True)
        loss = unrolled_loss(outs, A_true, S_true, fused=fused)  # fused: the loss's kernels too
        loss.backward()
        res.append((loss.detach(), outs[-1][1].detach(), model.theta.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_layer_runs_on_callers_stream():
    X, A, S, W = _cuda_inputs(2, 20, 3, 4000, dtype=torch.float32, seed=4)
    ref = learned_mu_step(X, A, S, W)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = learned_mu_step(X, A, S, W)
    s.synchronize()
    # equal up to the order of the forward's atomic P, G sums
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=0)


def test_nalmu_step_captures_as_cuda_graph(staging):
    """A whole forward + loss + backward of the fused NALMU captures as one CUDA graph
    (no host synchronisation, no Numba allocation inside) and its replay matches eager."""
    g = torch.Generator().manual_seed(5)
    X = (torch.rand(3, 13, 900, generator=g, dtype=torch.float64)).cuda()
    A_true = torch.rand(3, 13, 3, generator=g, dtype=torch.float64).cuda()
    S_true = torch.rand(3, 3, 900, generator=g, dtype=torch.float64).cuda()
    model = NALMU(5, 13, 3, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        model.theta.copy_((0.2 * torch.randn(5, 13, 3, generator=g, dtype=torch.float64)).cuda())

    def body():
        model.zero_grad(set_to_none=True)
        loss = unrolled_loss(model(X, return_all=True), A_true, S_true)
        loss.backward()
        return loss.detach()

    eager_loss = body()
    eager_grad = model.theta.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = body()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(model.theta.grad, eager_grad, rtol=1e-9, atol=1e-15)


def test_fast_launch_equals_numba_launch(monkeypatch, staging):
    """The layer launched with packed parameters (kernels.cuda_launch) and through Numba's
    own launch give the same forward and gradients."""
    from fastmu.kernels import cuda_launch

    if not cuda_launch.fast_launch_available():
        pytest.skip("the fast launch is off here (numba-cuda version or FASTMU_CUDA_FAST_LAUNCH)")
    X, A, S, W = _cuda_inputs(3, 20, 4, 1000, seed=6)
    res = []
    for fast in ("1", "0"):
        monkeypatch.setenv("FASTMU_CUDA_FAST_LAUNCH", fast)
        ins = [v.clone().requires_grad_(True) for v in (X, A, S, W)]
        A1, S1 = learned_mu_step(*ins)
        ((A1 ** 2).sum() + S1.sin().sum()).backward()
        res.append([A1.detach(), S1.detach()] + [v.grad for v in ins])
    # not bitwise: the forward accumulates P, G with atomics in whatever order the blocks finish
    # (on an H100 the two runs differed by 1.6e-10 relative, 1.5e-16 absolute)
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("per_problem", [False, True])
def test_unroll_matches_chained_layers_on_gpu(per_problem, staging):
    """The stack as one autograd node (one launch plan, reused scratch, ping-pong gradient
    buffers) against chained per-layer Functions: every layer's outputs and the gradients
    w.r.t. X, A, S and W, with upstream on some layers' A and S only."""
    L = 4
    X, A, S, W = _cuda_inputs(3, 13, 3, 700, per_problem=per_problem, seed=8)
    g = torch.Generator().manual_seed(9)
    Ws = (torch.rand((L, *W.shape), generator=g, dtype=X.dtype) + 0.5).cuda()
    res = []
    for run in ("unroll", "chain"):
        ins = [v.clone().requires_grad_(True) for v in (X, A, S, Ws)]
        if run == "unroll":
            outs = learned_mu_unroll(*ins, return_all=True)
        else:
            outs, a, s = [], ins[1], ins[2]
            for w in ins[3].unbind(0):
                a, s = learned_mu_step(ins[0], a, s, w)
                outs.append((a, s))
        loss = sum((l + 1.0) * outs[l][0].square().sum() for l in range(L)) + outs[1][1].sin().sum()
        loss.backward()
        res.append([v.detach() for pair in outs for v in pair] + [v.grad for v in ins])
    for a, b in zip(*res):  # the forward's atomic P, G sums run in varying order
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_unroll_gradcheck_on_gpu():
    X, A, S, W = _cuda_inputs(2, 5, 3, 37, seed=10)
    Ws = torch.stack([W, 1.3 * W, 0.8 * W])
    ins = [v.requires_grad_(True) for v in (X, A, S, Ws)]

    def f(X, A, S, Ws):
        return [v for pair in learned_mu_unroll(X, A, S, Ws, return_all=True) for v in pair]

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_unroll_runs_on_callers_stream():
    X, A, S, W = _cuda_inputs(2, 20, 3, 4000, dtype=torch.float32, seed=11)
    Ws = torch.stack([W] * 5)
    ref = learned_mu_unroll(X, A, S, Ws)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = learned_mu_unroll(X, A, S, Ws)
    s.synchronize()
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 1e-4, 1e-6)])
def test_fused_loss_matches_torch_ops_on_gpu(dtype, rtol, atol):
    """The loss's CUDA kernels (kernels/cuda_cosine.py) against the loss in torch ops, with a
    zero truth component and a zero estimated one, on a shape with a partial last block."""
    g = torch.Generator().manual_seed(9)
    L, b, m, n, t = 4, 3, 65, 4, 5000
    outs = [(torch.rand(b, m, n, generator=g, dtype=dtype).cuda(), torch.rand(b, n, t, generator=g, dtype=dtype).cuda())
            for _ in range(L)]
    A_true = torch.rand(b, m, n, generator=g, dtype=dtype).cuda()
    S_true = torch.rand(b, n, t, generator=g, dtype=dtype).cuda()
    A_true[1, :, 2] = 0.0
    outs[2][1][0, 1] = 0.0
    res = []
    for fused in (True, False):
        leaves = [(A.clone().requires_grad_(True), S.clone().requires_grad_(True)) for A, S in outs]
        loss = unrolled_loss(leaves, A_true, S_true, fused=fused)
        loss.backward()
        res.append([loss.detach()] + [x.grad for pair in leaves[1:] for x in pair])
    for mine, ref in zip(*res):
        torch.testing.assert_close(mine, ref, rtol=rtol, atol=atol)
