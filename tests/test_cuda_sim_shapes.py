"""The Numba CUDA kernels on odd shapes, in Numba's CUDA simulator.

Run in their own process, with the simulator switched on before Numba is
imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/test_cuda_sim_shapes.py

The main ``pytest`` run skips this module. Shapes here are the ones
``tests/test_cuda_sim.py`` leaves out: one channel or one component, rank 8,
one pixel, fewer pixels than a tile, exactly a whole number of tiles, one past
a tile, ``"regs"`` warps that cover m exactly or leave a last warp with one
row, more warps than components, and ``"rows"`` chunks whose last holds one
row; plus regressions for bugs found on such shapes.
"""
from __future__ import annotations

import pytest

from helpers import TINY_CUDA_BLOCKS, require_cudasim

pytestmark = pytest.mark.cudasim

require_cudasim()

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from fastmu.reference import mu_step_numpy  # noqa: E402

kc = pytest.importorskip("fastmu.kernels.cuda")
kb = pytest.importorskip("fastmu.kernels.cuda_backward")

TOL = {np.float32: dict(rtol=3e-4, atol=1e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}
EPS = 1e-12


@pytest.fixture(autouse=True)
def _tiny_blocks():
    """32 threads per block, automatic mode, row staging, for every test (restored afterwards)."""
    saved, saved_bwd = kc.get_config(), kb._threads
    kc.set_config(**TINY_CUDA_BLOCKS)
    yield
    kc.set_config(**saved)
    kb.set_threads(saved_bwd)


def _problem(b, m, n, t, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.random((b, m, n)) @ rng.random((b, n, t)) + 0.05 * rng.random((b, m, t))).astype(dtype)
    A = (0.5 + rng.random((b, m, n))).astype(dtype)
    S = (0.5 + rng.random((b, n, t))).astype(dtype)
    return X, A, S


def _reference(X, A, S, W, n_iter):
    A, S = A.astype(np.float64), S.astype(np.float64)
    Wr = None if W is None else W.astype(np.float64)
    for _ in range(n_iter):
        A, S = mu_step_numpy(X.astype(np.float64), A, S, Wr, EPS)
    return A, S


def _run(X, A, S, W, n_iter, acc_last=True):
    """The kernels under the current knobs on device copies; host (A, S, P, G). P and G start as
    NaN, so that an entry the kernels fail to write shows."""
    b, m, t = X.shape
    n = A.shape[2]
    Wd = np.ones((1, m, n), X.dtype) if W is None else W
    dX, dA, dS, dW = (cuda.to_device(np.ascontiguousarray(a)) for a in (X, A, S, Wd))
    dP = cuda.to_device(np.full((b, m, n), np.nan, X.dtype))
    dG = cuda.to_device(np.full((b, n, n), np.nan, X.dtype))
    kc.mu_run(dX, dA, dS, dW, dP, dG, n_iter, EPS, False, acc_last)
    return dA.copy_to_host(), dS.copy_to_host(), dP.copy_to_host(), dG.copy_to_host()


def _check(X, A, S, W, n_iter, got, dtype):
    A1, S1, P1, G1 = got
    Ar, Sr = _reference(X, A, S, W, n_iter)
    np.testing.assert_allclose(A1, Ar, **TOL[dtype])
    np.testing.assert_allclose(S1, Sr, **TOL[dtype])
    np.testing.assert_allclose(P1, X.astype(np.float64) @ Sr.transpose(0, 2, 1), **TOL[dtype])
    np.testing.assert_allclose(G1, Sr @ Sr.transpose(0, 2, 1), **TOL[dtype])


# (b, m, n, t, dtype, mode, staging, knobs): knobs are set_config's, on top of the fixture's
ODD_SHAPES = [
    # everything one: one channel, one component, one pixel
    (1, 1, 1, 1, np.float64, "block", "rows", {}),
    # one channel at rank 8: one warp finishes all 8 components; t one past a tile
    (2, 1, 8, 33, np.float32, "grid", "regs", dict(blocks_per_problem=2)),
    # two warps of one row, one component (a warp with no component to finish), 64-pixel
    # tiles with prefetch, flat ranges crossing problems (4 blocks for 2 × 3 tiles)
    (2, 2, 1, 130, np.float64, "flat", "regs",
     dict(rows_per_thread=1, pixels_per_lane=2, prefetch=True, blocks_per_problem=2)),
    # one warp of exactly m = 13 rows (the "exact" build), t exactly 3 tiles, prefetch
    (1, 13, 4, 96, np.float32, "grid", "regs", dict(rows_per_thread=13, prefetch=True, blocks_per_problem=2)),
    # 4 warps of 4 rows for m = 13 (the last warp: one row), 96-pixel tiles, t one past one
    (1, 13, 3, 97, np.float64, "flat", "regs", dict(rows_per_thread=4, pixels_per_lane=3)),
    # one pixel per problem: most lanes past t
    (2, 3, 8, 1, np.float32, "grid", "regs", dict(rows_per_thread=1, blocks_per_problem=3)),
    # fewer pixels than a tile, one tile per problem dealt over flat blocks
    (4, 9, 2, 2, np.float32, "flat", "rows", {}),
    # m = 33: the second 32-row chunk of the "rows" P reduction holds one row; n = 5
    (1, 33, 5, 65, np.float32, "grid", "rows", dict(blocks_per_problem=3)),
    # m = threads ("tile": one thread per row of P), rank 7, t below one tile
    (2, 32, 7, 31, np.float64, "block", "tile", {}),
    # "tile" at 64 threads: 12 threads share each row of P; rank 8
    (3, 5, 8, 40, np.float64, "grid", "tile", dict(threads=64, blocks_per_problem=2)),
    # the automatic choices (regs, 2 pixels per lane: 3 warps of 14 rows for m = 40), t one past 2 tiles
    (1, 40, 4, 129, np.float32, "auto", "auto", dict(pixels_per_lane=None)),
]


@pytest.mark.parametrize("b,m,n,t,dtype,mode,staging,knobs", ODD_SHAPES)
def test_odd_shapes_match_reference(b, m, n, t, dtype, mode, staging, knobs):
    kc.set_config(mode=mode, staging=staging, **knobs)
    X, A, S = _problem(b, m, n, t, dtype, seed=b * 1000 + m * 10 + n)
    _check(X, A, S, None, 2, _run(X, A, S, None, 2), dtype)


def test_odd_shape_per_problem_weights_flat(monkeypatch):
    """Per-problem W with flat ranges crossing problems: 3 × 2 tiles over the 5 blocks of 3
    warps that one nominal SM holds."""
    monkeypatch.setattr(kc, "_multiprocessors", lambda: 1)
    kc.set_config(mode="flat", staging="regs", rows_per_thread=3, blocks_per_problem=None)
    b, m, n, t = 3, 7, 3, 33
    assert kc._kernels_for(b, m, t, n, np.dtype(np.float64))[1:3] == ("flat", 5)
    X, A, S = _problem(b, m, n, t, np.float64, seed=5)
    W = (0.5 + np.random.default_rng(6).random((b, m, n))).astype(np.float64)
    _check(X, A, S, W, 2, _run(X, A, S, W, 2), np.float64)


@pytest.mark.parametrize("staging", ["rows", "tile", "regs"])
def test_block_mode_zero_iterations_without_last_accumulation(staging):
    """Regression: one persistent block per problem, n_iter = 0 with P, G not valid and
    accumulate_last false left P, G zero; with n_iter = 0 they must hold X Sᵀ, S Sᵀ whatever
    accumulate_last says (as the CPU kernel and grid/flat modes do)."""
    kc.set_config(mode="block", staging=staging, rows_per_thread=2)
    X, A, S = _problem(2, 5, 2, 40, np.float64, seed=4)
    A0, S0, P0, G0 = _run(X, A, S, None, 0, acc_last=False)
    np.testing.assert_array_equal(A0, A)
    np.testing.assert_array_equal(S0, S)
    np.testing.assert_allclose(P0, X @ S.transpose(0, 2, 1), rtol=1e-12)
    np.testing.assert_allclose(G0, S @ S.transpose(0, 2, 1), rtol=1e-12)


@pytest.mark.parametrize("staging", ["regs"])
def test_more_problems_than_grid_rows(monkeypatch, staging):
    """Regression: grid-mode launches put the problems on the grid's y axis, which CUDA caps at
    65 535 blocks (the simulator does not). Past the cap (lowered here to 2) the MU run deals
    the same blocks per problem over flat mode's 1-D grid, ‖X‖² loops over problems, and the
    learned layer, whose launches have no flat form, says so instead of failing to launch."""
    monkeypatch.setattr(kc, "_MAX_GRID_Y", 2)
    grids = []

    class Spy:  # records the grid of each launch
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, config):
            grids.append(config[0])
            return self.kernel[config]

    def spy_launch(kernel, grid, *args):
        grids.append(grid)
        return launch(kernel, grid, *args)

    launch = kc.launch
    monkeypatch.setattr(kc, "launch", spy_launch)
    kc.set_config(mode="grid", staging=staging, rows_per_thread=4, blocks_per_problem=2)
    b, m, n, t = 3, 5, 3, 40
    X, A, S = _problem(b, m, n, t, np.float64, seed=3)
    _check(X, A, S, None, 2, _run(X, A, S, None, 2), np.float64)
    k = kc._build("float64", 32, 1)
    monkeypatch.setattr(k, "sumsq", Spy(k.sumsq))
    x2 = kc.sum_squares(cuda.to_device(X)).copy_to_host()
    np.testing.assert_allclose(x2, (X**2).sum(axis=(1, 2)), rtol=1e-12)
    assert grids and all(not isinstance(g, tuple) or len(g) == 1 or g[1] <= 2 for g in grids), grids
    with pytest.raises(ValueError, match="at most 2 problems"):
        kb.LayerPlan(b, m, t, n, np.float64, 1)
    d = cuda.to_device
    P, G = d(np.zeros((b, m, n))), d(np.zeros((b, n, n)))
    with pytest.raises(ValueError, match="at most 2 problems"):
        kc.layer_step(d(X), d(A), d(S), d(np.ones((1, m, n))), P, G, d(A), d(S), P, G, EPS, True)


# ----------------------------------------------------------------------------- the learned layer


@pytest.mark.parametrize("b,m,n,t,dtype,staging,rows,bwd_threads", [
    (2, 1, 8, 33, np.float64, "regs", None, 16),  # one channel, rank 8, t one past a tile
    (2, 17, 5, 2, np.float64, "rows", None, 7),  # two pixels; backward tiles of 7 threads
    (2, 9, 2, 33, np.float32, "regs", 4, 32),  # 3 warps, the last of one row
])
def test_layer_forward_backward_odd_shapes(b, m, n, t, dtype, staging, rows, bwd_threads):
    """The learned layer's forward and backward (each pass's layout) against autograd through
    the torch reference, on odd shapes."""
    import torch

    from fastmu.reference import mu_step_torch

    kc.set_config(staging=staging, rows_per_thread=rows)
    kb.set_threads(bwd_threads)
    rng = np.random.default_rng(b + m + n + t)
    X = rng.random((b, m, t)).astype(dtype)
    A = (0.1 + rng.random((b, m, n))).astype(dtype)
    S = (0.1 + rng.random((b, n, t))).astype(dtype)
    W = (0.5 + rng.random((1, m, n))).astype(dtype)
    gAo, gSo = rng.standard_normal((b, m, n)).astype(dtype), rng.standard_normal((b, n, t)).astype(dtype)
    d = [cuda.to_device(v) for v in (X, A, S, W)]
    dP, dG = cuda.device_array((b, m, n), dtype), cuda.device_array((b, n, n), dtype)
    outs = [cuda.device_array(s, dtype) for s in ((b, m, n), (b, n, t), (b, m, n), (b, n, n))]
    kb.layer_forward(*d, dP, dG, EPS, False, True, *outs)
    A1, S1, P1, G1 = (o.copy_to_host() for o in outs)
    grads = [cuda.device_array(v.shape, dtype) for v in (A, S, W, X)]
    kb.layer_backward(*d, dP, dG, cuda.to_device(gAo), cuda.to_device(gSo), EPS, True,
                      True, True, True, True, *grads)
    gA, gS, gW, gX = (g.copy_to_host() for g in grads)

    ins = [torch.from_numpy(v.astype(np.float64)).requires_grad_(True) for v in (X, A, S, W[0])]
    rA, rS = mu_step_torch(*ins, eps=EPS)
    ((rA * torch.from_numpy(gAo.astype(np.float64))).sum()
     + (rS * torch.from_numpy(gSo.astype(np.float64))).sum()).backward()
    rtol, grtol = (1e-10, 1e-9) if dtype == np.float64 else (2e-4, 3e-3)

    def close(got, want, tol, scale=None):
        scale = np.abs(want).max() if scale is None else scale
        assert np.isfinite(got).all()
        assert np.abs(got.astype(np.float64) - want).max() <= tol * scale

    rS_ = rS.detach().numpy()
    close(A1, rA.detach().numpy(), rtol)
    close(S1, rS_, rtol)
    close(P1, X.astype(np.float64) @ rS_.transpose(0, 2, 1), rtol)
    close(G1, rS_ @ rS_.transpose(0, 2, 1), rtol)
    close(gX, ins[0].grad.numpy(), grtol)
    close(gS, ins[2].grad.numpy(), grtol)
    close(gW[0], ins[3].grad.numpy(), grtol)
    # at n = 1 or 2 A' barely depends on A (A cancels exactly at n = 1), so the A gradient is a
    # difference of nearly equal terms: measured against the W gradient's scale
    close(gA, ins[1].grad.numpy(), grtol, max(np.abs(ins[1].grad.numpy()).max(), np.abs(gW).max()))
