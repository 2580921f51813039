"""The CUDA learned-MU layer (forward + handwritten backward) in Numba's CUDA simulator.

Own process, simulator on before Numba is imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/test_nn_cudasim.py

torch has no CUDA tensors here, so the kernels are driven with simulator
device arrays, and a small autograd Function around them lets
``torch.autograd.gradcheck`` check them against finite differences; their
gradients are also compared with autograd through the pure-torch reference.
Blocks of 16 threads (backward; the forward kernels need ≥ 32) make the tiny problems span several pixel tiles.
"""
from __future__ import annotations

import pytest

from helpers import require_cudasim

pytestmark = pytest.mark.cudasim

require_cudasim()

import contextlib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import cuda  # noqa: E402

from fastmu.nn import functional as F  # noqa: E402

from fastmu.reference import mu_step_torch  # noqa: E402
from helpers import learned_layer_inputs

kb = pytest.importorskip("fastmu.kernels.cuda_backward")
kc = pytest.importorskip("fastmu.kernels.cuda")

EPS = 1e-12


@pytest.fixture(autouse=True)
def _tiny_blocks():
    saved_fwd = kc.get_config()
    saved_bwd = kb._threads
    kc.set_threads(32)
    kb.set_threads(16)
    yield
    kc.set_config(**saved_fwd)
    kb.set_threads(saved_bwd)


@pytest.fixture(params=["columns", "regs"])
def layout(request):
    """Both layouts of the passes over X: one thread per pixel column, or the "regs" layout
    (staging "regs"; at most 2 rows per thread, so that these small m span several warps,
    one with padding rows)."""
    if request.param == "regs":
        kc.set_staging("regs")
        kc.set_rows_per_thread(2)
    else:
        kc.set_staging("rows")  # the default "auto" would take "regs"
    return request.param


def _sim_forward(X, A, S, W3, P=None, G=None, want_pg=False):
    """numpy in, numpy out through the simulator kernels."""
    b, m, t = X.shape
    n = A.shape[2]
    d = [cuda.to_device(np.ascontiguousarray(v)) for v in (X, A, S, W3)]
    pg_valid = P is not None
    dP = cuda.to_device(P) if pg_valid else cuda.device_array((b, m, n), X.dtype)
    dG = cuda.to_device(G) if pg_valid else cuda.device_array((b, n, n), X.dtype)
    outs = [cuda.device_array(s, X.dtype) for s in ((b, m, n), (b, n, t), (b, m, n), (b, n, n))]
    kb.layer_forward(*d, dP, dG, EPS, pg_valid, want_pg, *outs)
    return [o.copy_to_host() for o in outs] + [dP.copy_to_host(), dG.copy_to_host()]


def _sim_backward(X, A, S, W3, P, G, gAo, gSo, need):
    need_gX, need_gA, need_gS, need_gW = need
    dt = X.dtype
    n = A.shape[2]
    has = gSo is not None
    d = [cuda.to_device(np.ascontiguousarray(v)) for v in (X, A, S, W3, P, G, gAo)]
    dgS = cuda.to_device(np.ascontiguousarray(gSo)) if has else cuda.device_array((1, n, 1), dt)
    dummy = cuda.device_array((1, 1, 1), dt)
    outs = [cuda.device_array(v.shape, dt) if f else dummy for v, f in ((A, need_gA), (S, need_gS), (W3, need_gW), (X, need_gX))]
    kb.layer_backward(*d, dgS, EPS, has, need_gA, need_gS, need_gW, need_gX, *outs)
    gA, gS, gW, gX = [o.copy_to_host() if f else None for o, f in zip(outs, (need_gA, need_gS, need_gW, need_gX))]
    return gX, gA, gS, gW


class _SimLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, A, S, W):
        W3 = W.unsqueeze(0) if W.dim() == 2 else W
        A1, S1, _, _, P, G = _sim_forward(*(v.detach().numpy() for v in (X, A, S, W3)))
        ctx.save_for_backward(X, A, S, W, torch.from_numpy(P), torch.from_numpy(G))
        return torch.from_numpy(A1), torch.from_numpy(S1)

    @staticmethod
    def backward(ctx, gA, gS):
        X, A, S, W, P, G = ctx.saved_tensors
        W3 = W.unsqueeze(0) if W.dim() == 2 else W
        need = tuple(bool(x) for x in ctx.needs_input_grad)
        res = _sim_backward(*(v.numpy() for v in (X, A, S, W3, P, G, gA)), gS.numpy(), need)
        gX, gA_, gS_, gW = (None if r is None else torch.from_numpy(r) for r in res)
        if gW is not None and W.dim() == 2:
            gW = gW.reshape(W.shape)
        return gX, gA_, gS_, gW


_inputs = learned_layer_inputs


@pytest.mark.parametrize(
    "dtype,rtol,staging",
    [(torch.float64, 1e-12, "rows"), (torch.float32, 2e-5, "rows"), (torch.float64, 1e-12, "tile"),
     (torch.float32, 2e-5, "regs")],
)
@pytest.mark.parametrize("per_problem", [False, True])
def test_forward_matches_reference_and_pg(dtype, rtol, staging, per_problem):
    kc.set_staging(staging)
    X, A, S, W = _inputs(2, 5, 3, 37, dtype=dtype, per_problem=per_problem)
    W3 = W.unsqueeze(0) if W.dim() == 2 else W
    A1, S1, P1, G1, P, G = _sim_forward(*(v.numpy() for v in (X, A, S, W3)), want_pg=True)
    rA, rS = mu_step_torch(X.double(), A.double(), S.double(), W.double())
    np.testing.assert_allclose(A1, rA.numpy(), rtol=rtol)
    np.testing.assert_allclose(S1, rS.numpy(), rtol=rtol)
    Xd, Sd = X.double().numpy(), S.double().numpy()
    np.testing.assert_allclose(P, Xd @ Sd.transpose(0, 2, 1), rtol=rtol * 10)
    np.testing.assert_allclose(G, Sd @ Sd.transpose(0, 2, 1), rtol=rtol * 10)
    np.testing.assert_allclose(P1, Xd @ rS.numpy().transpose(0, 2, 1), rtol=rtol * 10)
    # handing P, G in gives the same layer
    A2, S2, *_ = _sim_forward(*(v.numpy() for v in (X, A, S, W3)), P=P, G=G)
    np.testing.assert_allclose(A2, A1, rtol=rtol)
    np.testing.assert_allclose(S2, S1, rtol=rtol)


@pytest.mark.parametrize("per_problem", [False, True])
def test_gradcheck_simulator(per_problem, layout):
    X, A, S, W = _inputs(2, 3, 2, 20, per_problem=per_problem, seed=1)
    for v in (X, A, S, W):
        v.requires_grad_(True)
    # fast_mode: finite differences along random directions (a few simulator
    # launches instead of one per input entry); the full Jacobians are compared
    # with autograd through the reference in test_gradients_match_reference.
    assert torch.autograd.gradcheck(
        _SimLayer.apply, (X, A, S, W), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize("per_problem", [False, True])
@pytest.mark.parametrize("upstream", ["both", "A_only"])
def test_gradients_match_reference(per_problem, upstream, layout):
    X, A, S, W = _inputs(2, 6, 3, 40, per_problem=per_problem, seed=2)
    g = torch.Generator().manual_seed(3)
    gA = torch.randn(A.shape, generator=g, dtype=A.dtype)
    gS = torch.randn(S.shape, generator=g, dtype=S.dtype) * (upstream == "both")
    grads = []
    for f in (_SimLayer.apply, mu_step_torch):
        ins = [v.clone().requires_grad_(True) for v in (X, A, S, W)]
        A1, S1 = f(*ins)
        ((A1 * gA).sum() + (S1 * gS).sum()).backward()
        grads.append([v.grad for v in ins])
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-13)
    # the has_gSo=False path (no upstream for S') agrees as well
    if upstream == "A_only":
        W3 = W.unsqueeze(0) if W.dim() == 2 else W
        *_, P, G = _sim_forward(*(v.numpy() for v in (X, A, S, W3)))
        res = _sim_backward(*(v.numpy() for v in (X, A, S, W3)), P, G, gA.numpy(), None, (True, True, True, True))
        for mine, ref in zip(res, grads[1]):
            np.testing.assert_allclose(mine.reshape(ref.shape), ref.numpy(), rtol=1e-10, atol=1e-13)


def test_only_w_gradient_and_float32(layout):
    X, A, S, W = _inputs(2, 6, 3, 40, dtype=torch.float32, seed=4)
    W.requires_grad_(True)
    A1, S1 = _SimLayer.apply(X, A, S, W)
    (A1.sum() + S1.square().sum()).backward()
    Wr = W.detach().double().requires_grad_(True)
    rA, rS = mu_step_torch(X.double(), A.double(), S.double(), Wr)
    (rA.sum() + rS.square().sum()).backward()
    torch.testing.assert_close(W.grad.double(), Wr.grad, rtol=1e-4, atol=1e-5)


def test_regs_backward_block_counts_and_reproducibility():
    """The "regs" passes with one block looping over every tile and with one block per tile agree,
    and a repeated backward is bit-identical (fixed summation orders, no atomics)."""
    kc.set_staging("regs")
    kc.set_rows_per_thread(2)
    X, A, S, W = _inputs(2, 5, 3, 90, seed=7)  # 3 tiles of 32 pixels, the last partial
    W3 = W.unsqueeze(0)
    *_, P, G = _sim_forward(*(v.numpy() for v in (X, A, S, W3)))
    g = np.random.default_rng(8)
    gA, gS = g.standard_normal(A.shape), g.standard_normal(S.shape)
    args = [v.numpy() for v in (X, A, S, W3)] + [P, G, gA, gS, (True, True, True, True)]
    runs = {}
    for bpp in (1, None):
        kc.set_blocks_per_problem(bpp)
        runs[bpp] = _sim_backward(*args)
    again = _sim_backward(*args)
    for a, b, c in zip(runs[1], runs[None], again):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(b, c)


@pytest.mark.parametrize("layout_name", ["columns", "regs"])
def test_torch_tensor_host_path(monkeypatch, layout_name):
    """layer_forward / layer_backward given torch tensors (what the autograd layer passes with
    the fast launch): the same results as with Numba arrays. The launch itself is swapped for a
    simulator launch on zero-copy views; its parameter packing is tested in test_cuda_launch."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    if layout_name == "regs":
        kc.set_staging("regs")
        kc.set_rows_per_thread(2)

    def sim_launch(dispatcher, grid, block, stream, shared, *args):
        conv = [FakeCUDAArray(a.detach().numpy()) if isinstance(a, torch.Tensor) else a for a in args]
        dispatcher[grid, block, 0, shared](*conv)

    from fastmu.kernels import cuda_launch

    for module in (cuda_launch, kc):  # every module that launches through it
        monkeypatch.setattr(module, "launch", sim_launch)
    X, A, S, W = _inputs(2, 5, 3, 45, seed=11)
    W3 = W.unsqueeze(0).contiguous()
    b, m, t = X.shape
    n = A.shape[2]
    z = lambda *shape: torch.zeros(shape, dtype=X.dtype)  # noqa: E731
    P, G, A1, S1, P1, G1 = z(b, m, n), z(b, n, n), z(b, m, n), z(b, n, t), z(b, m, n), z(b, n, n)
    with pytest.raises(ValueError, match="zeroed"):  # atomics need zeroed outputs: the allocator's job
        kb.layer_forward(X, A, S, W3, P, G, EPS, False, True, A1, S1, P1, G1, stream=0)
    kb.layer_forward(X, A, S, W3, P, G, EPS, False, True, A1, S1, P1, G1, stream=0, zeroed=True)
    ref = _sim_forward(*(v.numpy() for v in (X, A, S, W3)), want_pg=True)
    for mine, r in zip((A1, S1, P1, G1, P, G), ref):
        np.testing.assert_allclose(mine.numpy(), r, rtol=1e-12, atol=1e-14)
    g = torch.Generator().manual_seed(12)
    gAo, gSo = torch.randn(A.shape, generator=g, dtype=X.dtype), torch.randn(S.shape, generator=g, dtype=X.dtype)
    outs = [torch.empty_like(v) for v in (A, S, W3, X)]
    kb.layer_backward(X, A, S, W3, P, G, gAo, gSo, EPS, True, True, True, True, True, *outs, stream=0,
                      alloc=lambda shape, dt: torch.empty(tuple(shape), dtype=X.dtype))
    gX, gA, gS, gW = _sim_backward(*(v.numpy() for v in (X, A, S, W3, P, G, gAo)), gSo.numpy(), (True,) * 4)
    for mine, r in zip(outs, (gA, gS, gW, gX)):
        np.testing.assert_allclose(mine.numpy(), r, rtol=1e-12, atol=1e-14)


class _SimCudaLayers(F._CudaLayers):
    """The CUDA runner of the autograd unroll with torch CPU tensors standing in for CUDA
    ones: no device context, stream 0; launches are simulated (``_sim_launches``)."""

    def device(self, X):
        return contextlib.nullcontext()

    def stream(self, X):
        return 0


@pytest.fixture
def _sim_launches(monkeypatch):
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from fastmu.kernels import cuda_launch

    launched = []

    def sim_launch(dispatcher, grid, block, stream, shared, *args):
        launched.append(dispatcher)
        conv = [FakeCUDAArray(a.detach().numpy()) if isinstance(a, torch.Tensor) else a for a in args]
        dispatcher[grid, block, 0, shared](*conv)

    for module in (cuda_launch, kc):
        monkeypatch.setattr(module, "launch", sim_launch)
    return launched


@pytest.mark.parametrize("per_problem,layout_name", [(False, "columns"), (True, "regs")])
def test_unroll_cuda_runner_matches_cpu(_sim_launches, per_problem, layout_name):
    """The stacked layers as one autograd node (``LearnedMUUnroll``) with the CUDA runner: one
    launch plan for every layer, the backward's scratch reused from layer to layer, P/G
    handed on. Outputs of every layer and gradients w.r.t. X, A, S and W equal the CPU
    unroll's (whose gradients are gradchecked in test_nn_unroll.py); so do the last layer's
    outputs of a no-grad forward."""
    if layout_name == "regs":
        kc.set_staging("regs")
        kc.set_rows_per_thread(2)
    else:
        kc.set_staging("rows")
    L = 3
    X, A, S, W = _inputs(2, 5, 3, 45, per_problem=per_problem, seed=21)
    g = torch.Generator().manual_seed(22)
    Ws = torch.rand((L, *W.shape), generator=g, dtype=X.dtype) + 0.5
    results = []
    for run in (_SimCudaLayers(), F._CpuLayers()):
        ins = [v.clone().requires_grad_(True) for v in (X, A, S, Ws)]
        out = F.LearnedMUUnroll.apply(*ins, EPS, True, True, run)
        # upstream on every layer's A, and on S of layer 2 only: layers with and without gS'
        loss = sum((l + 1.0) * out[l].square().sum() for l in range(L)) + out[L + 1].sum()
        loss.backward()
        with torch.no_grad():  # inference: the layers' outputs in two ping-pong buffers
            last = F.LearnedMUUnroll.apply(X, A, S, Ws, EPS, False, False, run)
        results.append([o.detach() for o in out] + [v.grad for v in ins] + list(last))
    assert len(_sim_launches) > 0
    for mine, ref in zip(*results):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-13)


def test_unroll_cuda_runner_gradcheck(_sim_launches):
    """gradcheck of the CUDA-runner unroll (2 layers, shared W) w.r.t. W and the starting factors."""
    X, A, S, W = _inputs(2, 3, 2, 20, seed=23)
    Ws = torch.stack([W, 1.5 * W]).requires_grad_(True)
    A.requires_grad_(True)
    S.requires_grad_(True)
    run = _SimCudaLayers()

    def f(A, S, Ws):
        return F.LearnedMUUnroll.apply(X, A, S, Ws, EPS, False, True, run)

    assert torch.autograd.gradcheck(f, (A, S, Ws), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
