"""The CUDA kernels of the fused loss (kernels/cuda_cosine.py) in Numba's CUDA simulator.

Own process, simulator on before Numba is imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/test_loss_cudasim.py

The whole loss (``unrolled_loss``) runs with its CUDA runner, torch CPU tensors standing in
for CUDA ones and launches simulated; value and gradients must equal the loss in torch ops.
Blocks of 8 threads: several loop trips per thread in the forward's row sums, a tree
reduction of several levels, and a backward grid of several blocks with a partial last one.
"""
from __future__ import annotations

import pytest

from helpers import require_cudasim

pytestmark = pytest.mark.cudasim

require_cudasim()

import torch  # noqa: E402

from fastmu import losses  # noqa: E402

cuda_cosine = pytest.importorskip("fastmu.kernels.cuda_cosine")


@pytest.fixture
def sim_runner(monkeypatch):
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from fastmu.kernels import cuda_launch

    launched = []

    def sim_launch(dispatcher, grid, block, stream, shared, *args):
        launched.append(grid)
        conv = [FakeCUDAArray(a.detach().numpy()) if isinstance(a, torch.Tensor) else a for a in args]
        dispatcher[grid, block, 0, shared](*conv)

    monkeypatch.setattr(cuda_launch, "launch", sim_launch)
    monkeypatch.setattr(losses, "_cosine_runner", lambda x: cuda_cosine.CosinePlan(0, threads=8))
    return launched


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 1e-4, 1e-6)])
def test_cuda_loss_matches_torch_ops(sim_runner, dtype, rtol, atol):
    g = torch.Generator().manual_seed(0)
    L, b, m, n, t = 3, 2, 5, 3, 37
    outs = [(torch.rand(b, m, n, generator=g, dtype=dtype), torch.rand(b, n, t, generator=g, dtype=dtype))
            for _ in range(L)]
    A_true, S_true = torch.rand(b, m, n, generator=g, dtype=dtype), torch.rand(b, n, t, generator=g, dtype=dtype)
    A_true[1, :, 2] = 0.0  # a zero truth component
    outs[2][1][0, 1] = 0.0  # a zero estimated component
    results = []
    for fused in (True, False):
        leaves = [(A.clone().requires_grad_(True), S.clone().requires_grad_(True)) for A, S in outs]
        loss = losses.unrolled_loss(leaves, A_true, S_true, reduction="sum", fused=fused)
        loss.backward()
        results.append([loss.detach()] + [x.grad for pair in leaves[1:] for x in pair])  # layer 1: v = 0
    assert len(sim_runner) == 4 * (L - 1)  # forward and backward, A and S, of the scored layers
    for mine, ref in zip(*results):
        torch.testing.assert_close(mine, ref, rtol=rtol, atol=atol)
    # the zero estimated component (layer 3's S, row 1 of problem 0) passes no gradient
    assert bool((results[0][4][0, 1] == 0).all()) and bool(results[0][4].abs().sum() > 0)
