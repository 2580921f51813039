"""The Numba CUDA kernels, run in Numba's CUDA simulator.

Run in their own process, with the simulator switched on before Numba is
imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/

The main ``pytest`` run skips this module. Blocks of 32 threads (= 32-pixel
tiles) make the tiny problems here span several tiles, several blocks per
problem in grid mode, and several row chunks of X in the P reduction.
"""
from __future__ import annotations

import warnings

import pytest

from helpers import TINY_CUDA_BLOCKS, require_cudasim

pytestmark = pytest.mark.cudasim

require_cudasim()

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from fastmu.reference import mu_step_numpy  # noqa: E402

kc = pytest.importorskip("fastmu.kernels.cuda")

TOL = {np.float32: dict(rtol=2e-4, atol=1e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}
EPS = 1e-12


@pytest.fixture(autouse=True)
def _tiny_blocks():
    """32 threads per block, automatic mode, row staging, for every test (restored afterwards)."""
    saved = kc.get_config()
    kc.set_config(**TINY_CUDA_BLOCKS)
    yield
    kc.set_config(**saved)


@pytest.fixture(params=["rows", "tile", "regs"])
def staged(request):
    """Run a kernel test with each staging of X (see kernels.cuda.set_staging); "regs" with
    at most 4 rows per thread, so that small m spans several warps."""
    kc.set_staging(request.param)
    if request.param == "regs":
        kc.set_rows_per_thread(4)
    return request.param


def _problem(b, m, n, t, dtype, seed=0, zero_cols=()):
    rng = np.random.default_rng(seed)
    X = (rng.random((b, m, n)) @ rng.random((b, n, t)) + 0.05 * rng.random((b, m, t))).astype(dtype)
    for j in zero_cols:
        X[:, :, j] = 0
    A = (0.5 + rng.random((b, m, n))).astype(dtype)
    S = (0.5 + rng.random((b, n, t))).astype(dtype)
    return X, A, S


def _reference(X, A, S, W, n_iter):
    """float64 reference iterations (W ``None`` or (bw, m, n) broadcast over the batch)."""
    A, S = A.astype(np.float64), S.astype(np.float64)
    Wr = None if W is None else W.astype(np.float64)
    for _ in range(n_iter):
        A, S = mu_step_numpy(X.astype(np.float64), A, S, Wr, EPS)
    return A, S


def _run(X, A, S, W, n_iter, mode, bpp=None, pg=None, acc_last=True):
    """Run the kernel on device copies; return host (A, S, P, G)."""
    kc.set_mode(mode)
    kc.set_blocks_per_problem(bpp)
    b, m, t = X.shape
    n = A.shape[2]
    Wd = np.ones((1, m, n), X.dtype) if W is None else W
    dX, dA, dS, dW = (cuda.to_device(np.ascontiguousarray(a)) for a in (X, A, S, Wd))
    if pg is None:
        dP = cuda.device_array((b, m, n), X.dtype)
        dG = cuda.device_array((b, n, n), X.dtype)
        valid = False
    else:
        dP, dG = cuda.to_device(pg[0]), cuda.to_device(pg[1])
        valid = True
    kc.mu_run(dX, dA, dS, dW, dP, dG, n_iter, EPS, valid, acc_last)
    return dA.copy_to_host(), dS.copy_to_host(), dP.copy_to_host(), dG.copy_to_host()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "mode,b,bpp",
    [("block", 1, None), ("block", 3, None), ("grid", 1, 2), ("grid", 3, 3)],
)
def test_matches_reference(dtype, mode, b, bpp, staged):
    # t = 75 is not a multiple of the 32-pixel tile; m = 9 spans two staged row chunks
    # when the chunk is smaller than m (float64 at 32 threads stages 32 rows: one chunk).
    X, A, S = _problem(b, 9, 3, 75, dtype, seed=b)
    n_iter = 3
    A1, S1, P1, G1 = _run(X, A, S, None, n_iter, mode, bpp)
    Ar, Sr = _reference(X, A, S, None, n_iter)
    np.testing.assert_allclose(A1, Ar, **TOL[dtype])
    np.testing.assert_allclose(S1, Sr, **TOL[dtype])
    # P, G carried out describe the returned S
    Xd = X.astype(np.float64)
    np.testing.assert_allclose(P1, Xd @ Sr.transpose(0, 2, 1), **TOL[dtype])
    np.testing.assert_allclose(G1, Sr @ Sr.transpose(0, 2, 1), **TOL[dtype])


@pytest.mark.parametrize("staging,bpp", [("rows", None), ("tile", None), ("regs", None), ("rows", 5)])
def test_flat_mode_block_counts(monkeypatch, staging, bpp):
    """"flat" mode: 3 problems of 4 tiles on one nominal SM, so the automatic wave (8 blocks
    for "rows", 5 for "regs") gives ranges that cross problems; and more blocks asked for
    than there are tiles (15 for 12: capped, one tile per block)."""
    monkeypatch.setattr(kc, "_multiprocessors", lambda: 1)
    kc.set_staging(staging)
    if staging == "regs":
        kc.set_rows_per_thread(4)
    b, t = 3, 100
    kc.set_mode("flat")
    kc.set_blocks_per_problem(bpp)
    nb = kc._kernels_for(b, 9, t, 3, np.dtype(np.float64))[2]
    nt = 4
    ranges = [(g * b * nt // nb, (g + 1) * b * nt // nb) for g in range(nb)]
    crossing = any(lo < hi and lo // nt != (hi - 1) // nt for lo, hi in ranges)
    assert crossing == (bpp is None) and (bpp is None or nb == 12)  # 15 capped at the 12 tiles
    X, A, S = _problem(b, 9, 3, t, np.float64, seed=7)
    A1, S1, P1, G1 = _run(X, A, S, None, 2, "flat", bpp)
    Ar, Sr = _reference(X, A, S, None, 2)
    np.testing.assert_allclose(A1, Ar, **TOL[np.float64])
    np.testing.assert_allclose(S1, Sr, **TOL[np.float64])
    np.testing.assert_allclose(P1, X @ Sr.transpose(0, 2, 1), **TOL[np.float64])
    np.testing.assert_allclose(G1, Sr @ Sr.transpose(0, 2, 1), **TOL[np.float64])


def test_flat_mode_choice(monkeypatch):
    """"auto" picks "flat" only for "regs" launches (given ``resident``) whose one wave of blocks
    would get at least FLAT_MIN_TILES tiles each: W2 on an H200 (150 problems of 256 tiles of 64
    pixels, 3 blocks on each of 132 SMs), not 25 problems or one; never for launches without a
    flat kernel or with blocks per problem set. Under "flat" the learned layer's launches
    (no flat kernel) get grid mode's choice."""
    monkeypatch.setattr(kc, "_multiprocessors", lambda: 132)
    assert kc.FLAT_MIN_TILES * 396 == 99 * 256  # the threshold sits between 98 and 99 problems
    assert kc.choose_mode(150, 16384, 64, resident=3) == ("flat", 396)
    assert kc.choose_mode(99, 16384, 64, resident=3) == ("flat", 396)
    assert kc.choose_mode(98, 16384, 64, resident=3)[0] == "grid"
    assert kc.choose_mode(25, 16384, 64, resident=3) == ("grid", 15)
    assert kc.choose_mode(1, 16384, 64, resident=3) == ("grid", 256)
    assert kc.choose_mode(150, 16384, 64, resident=3, flat_ok=False)[0] == "grid"
    assert kc.choose_mode(150, 16384)[0] == "grid"  # "rows"/"tile" staging: no resident count
    kc.set_blocks_per_problem(8)
    assert kc.choose_mode(150, 16384, 64, resident=3) == ("grid", 8)
    kc.set_blocks_per_problem(None)
    kc.set_mode("grid")
    assert kc.choose_mode(150, 16384, 64, resident=3)[0] == "grid"
    kc.set_mode("flat")
    assert kc.choose_mode(150, 16384) == ("flat", min(150 * 128, 8 * 132))
    assert kc.choose_mode(150, 16384, flat_ok=False)[0] == "grid"
    kc.set_blocks_per_problem(3)
    assert kc.choose_mode(150, 16384) == ("flat", 450)
    assert kc.choose_mode(2, 40) == ("flat", 4)  # capped at the tiles there are (2 × 2)


def test_auto_flat_matches_reference(monkeypatch):
    """The automatic choice reaching "flat" (threshold lowered to 2 tiles per block so that a
    tiny problem crosses it) runs the flat kernel and matches the reference, float32 with
    the automatic 64-pixel tiles: 3 problems of 4 tiles dealt over the 5 blocks (of 96
    threads) one nominal SM holds, so that ranges cross problems."""
    monkeypatch.setattr(kc, "_multiprocessors", lambda: 1)
    monkeypatch.setattr(kc, "FLAT_MIN_TILES", 2)
    kc.set_staging("regs")
    kc.set_rows_per_thread(4)
    kc.set_pixels_per_lane(None)
    b, m, n, t = 3, 9, 3, 250
    assert kc._kernels_for(b, m, t, n, np.dtype(np.float32))[1:3] == ("flat", 5)
    X, A, S = _problem(b, m, n, t, np.float32, seed=12)
    A1, S1, P1, G1 = _run(X, A, S, None, 3, "auto")
    Ar, Sr = _reference(X, A, S, None, 3)
    np.testing.assert_allclose(A1, Ar, **TOL[np.float32])
    np.testing.assert_allclose(S1, Sr, **TOL[np.float32])
    np.testing.assert_allclose(P1, X.astype(np.float64) @ Sr.transpose(0, 2, 1), **TOL[np.float32])


def test_automatic_pixels_per_lane():
    """2 pixels per lane in float32 up to rank 4 where the buffers fit (measured on an H200 at
    m = 65, n = 4), 1 otherwise and in the learned layers' forward; a value set wins."""
    kc.set_staging("auto")
    kc.set_pixels_per_lane(None)
    assert kc.get_config()["pixels_per_lane"] is None
    assert kc.pixels_per_lane_for(np.float32, 65, 4) == 2
    assert kc.launch_layout(np.float32, 65, 4) == kc.Layout("regs", 160, 64, 13)
    assert kc.pixels_per_lane_for(np.float64, 65, 4) == 1
    assert kc.pixels_per_lane_for(np.float32, 65, 5) == 1
    assert kc.pixels_per_lane_for(np.float32, 500, 4) == 1  # 32 warps: the wider buffers do not fit
    assert kc.launch_layout(np.float32, 500, 4).tile == 32
    # the learned layers' forward (no flat kernel) keeps 32-pixel tiles unless set
    assert kc.pixels_per_lane_for(np.float32, 65, 4, auto_wide=False) == 1
    assert kc.launch_layout(np.float32, 65, 4, auto_wide=False).tile == 32
    kc.set_pixels_per_lane(4)
    assert kc.pixels_per_lane_for(np.float32, 65, 4, auto_wide=False) == 4
    assert kc.pixels_per_lane_for(np.float64, 65, 4) == 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode", ["block", "grid", "flat"])
def test_learned_weights(dtype, shared, mode):
    b, m, n, t = 2, 7, 4, 70
    X, A, S = _problem(b, m, n, t, dtype, seed=5)
    rng = np.random.default_rng(9)
    W = (0.5 + rng.random((1 if shared else b, m, n))).astype(dtype)
    A1, S1, _, _ = _run(X, A, S, W, 2, mode, 3 if mode in ("grid", "flat") else None)
    Ar, Sr = _reference(X, A, S, W if not shared else W[0], 2)
    np.testing.assert_allclose(A1, Ar, **TOL[dtype])
    np.testing.assert_allclose(S1, Sr, **TOL[dtype])


@pytest.mark.parametrize("ur", [4, 8])
@pytest.mark.parametrize("mode", ["block", "grid"])
def test_unrolled_row_loads(mode, ur, staged):
    """m = 13 is not a multiple of the unroll: the unrolled loop plus its remainder."""
    kc.set_unroll(ur)
    X, A, S = _problem(2, 13, 3, 40, np.float64, seed=11)
    A1, S1, _, _ = _run(X, A, S, None, 2, mode, 2 if mode == "grid" else None)
    Ar, Sr = _reference(X, A, S, None, 2)
    np.testing.assert_allclose(A1, Ar, **TOL[np.float64])
    np.testing.assert_allclose(S1, Sr, **TOL[np.float64])


@pytest.mark.parametrize("mode", ["block", "grid"])
def test_more_rows_than_one_staged_chunk(mode):
    """m = 37 > the 32 rows of X staged per chunk: the P reduction loops over chunks."""
    X, A, S = _problem(1, 37, 2, 40, np.float32, seed=8)
    A1, S1, P1, _ = _run(X, A, S, None, 1, mode, 2)
    Ar, Sr = _reference(X, A, S, None, 1)
    np.testing.assert_allclose(A1, Ar, **TOL[np.float32])
    np.testing.assert_allclose(S1, Sr, **TOL[np.float32])
    np.testing.assert_allclose(P1, X.astype(np.float64) @ Sr.transpose(0, 2, 1), **TOL[np.float32])


@pytest.mark.parametrize("mode", ["block", "grid"])
def test_pg_carry_across_calls(mode, staged):
    """3 then 4 iterations with the carried P, G equal 7 in one call."""
    X, A, S = _problem(2, 6, 2, 50, np.float64, seed=3)
    A7, S7, P7, G7 = _run(X, A, S, None, 7, mode, 2)
    A3, S3, P3, G3 = _run(X, A, S, None, 3, mode, 2)
    A34, S34, P34, G34 = _run(X, A3, S3, None, 4, mode, 2, pg=(P3, G3))
    for got, want in ((A34, A7), (S34, S7), (P34, P7), (G34, G7)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["block", "grid"])
def test_zero_iterations_and_no_last_accumulation(mode, staged):
    X, A, S = _problem(1, 5, 2, 40, np.float64, seed=4)
    A0, S0, P0, G0 = _run(X, A, S, None, 0, mode, 2)
    np.testing.assert_array_equal(A0, A)
    np.testing.assert_array_equal(S0, S)
    np.testing.assert_allclose(P0, X @ S.transpose(0, 2, 1), rtol=1e-12)
    np.testing.assert_allclose(G0, S @ S.transpose(0, 2, 1), rtol=1e-12)
    # accumulate_last=False changes nothing about the factors
    A2, S2, _, _ = _run(X, A, S, None, 2, mode, 2, acc_last=False)
    Ar, Sr = _reference(X, A, S, None, 2)
    np.testing.assert_allclose(A2, Ar, rtol=1e-11)
    np.testing.assert_allclose(S2, Sr, rtol=1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_pixel_columns_stay_finite(dtype, staged):
    X, A, S = _problem(2, 5, 2, 40, dtype, seed=6, zero_cols=(0, 17, 39))
    A1, S1, _, _ = _run(X, A, S, None, 4, "block")
    assert np.isfinite(A1).all() and np.isfinite(S1).all()
    Ar, Sr = _reference(X, A, S, None, 4)
    np.testing.assert_allclose(S1, Sr, **TOL[dtype])


def test_auto_mode_choice():
    # the simulator reports 2 multiprocessors: about 16 blocks in all, at most one per tile
    assert kc.choose_mode(1, 75) == ("grid", 3)
    assert kc.choose_mode(3, 75) == ("grid", 3)
    assert kc.choose_mode(8, 32 * 40) == ("grid", 2)
    assert kc.choose_mode(1, 20) == ("block", 1)  # a single tile
    kc.set_mode("block")
    assert kc.choose_mode(1, 75) == ("block", 1)
    kc.set_mode("auto")
    # unroll / occupancy: busy launches (>= 4 blocks per SM) unroll and raise occupancy
    assert kc.choose_knobs(1, 3) == (1, 512)
    assert kc.choose_knobs(8, 2) == (8, 2048)
    assert kc.choose_knobs(8, 2, "tile") == (8, 1024)  # shared memory caps the blocks per SM
    kc.set_unroll(4)
    kc.set_occupancy(1024)
    assert kc.choose_knobs(8, 2) == (4, 1024)


def test_sum_squares_and_objective():
    X, A, S = _problem(3, 5, 2, 45, np.float32, seed=7)
    x2 = kc.sum_squares(cuda.to_device(X)).copy_to_host()
    np.testing.assert_allclose(x2, (X.astype(np.float64) ** 2).sum(axis=(1, 2)), rtol=1e-6)
    Xd, Ad, Sd = (a.astype(np.float64) for a in (X, A, S))
    obj = kc.objective_from_pg(x2, A, Xd @ Sd.transpose(0, 2, 1), Sd @ Sd.transpose(0, 2, 1))
    R = Xd - Ad @ Sd
    np.testing.assert_allclose(obj, 0.5 * (R * R).sum(axis=(1, 2)), rtol=1e-5)
    r2 = kc.residual_squares(cuda.to_device(X), cuda.to_device(A), cuda.to_device(S)).copy_to_host()
    np.testing.assert_allclose(r2, (R * R).sum(axis=(1, 2)), rtol=1e-12)  # float64 sums of float32 data


def test_bad_input():
    X, A, S = _problem(1, 5, 9, 40, np.float32)
    with pytest.raises(ValueError, match="at most n = 8"):
        _run(X, A, S, None, 1, "block")
    X, A, S = _problem(1, 5, 2, 40, np.float32)
    dX = cuda.to_device(X)
    dA = cuda.to_device(A.astype(np.float64))
    args = (cuda.to_device(S), cuda.to_device(np.ones((1, 5, 2), np.float32)),
            cuda.device_array((1, 5, 2), np.float32), cuda.device_array((1, 2, 2), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        kc.mu_run(dX, dA, *args, 1, EPS, False, True)
    h = [a.astype(np.float16) for a in (X, A, S, np.ones((1, 5, 2)), np.ones((1, 5, 2)), np.ones((1, 2, 2)))]
    with pytest.raises(TypeError, match="float32 or float64"):
        kc.mu_run(*(cuda.to_device(a) for a in h), 1, EPS, False, True)
    with pytest.raises(TypeError, match="device array"):
        kc.mu_run(X, cuda.to_device(A), *args, 1, EPS, False, True)
    with pytest.raises(ValueError, match="shape"):
        kc.mu_run(dX, cuda.to_device(A[:, :4]), *args, 1, EPS, False, True)
    with pytest.raises(ValueError, match="power of two"):
        kc.set_threads(48)
    with pytest.raises(ValueError, match="mode"):
        kc.set_mode("warp")
    with pytest.raises(ValueError, match="unroll"):
        kc.set_unroll(3)
    with pytest.raises(ValueError, match="unknown CUDA kernel knob"):
        kc.set_config(colour=1)
    for bad in (100, 330, 4096):
        with pytest.raises(ValueError, match="occupancy"):
            kc.set_occupancy(bad)
    kc.set_occupancy(320)  # two 160-thread "regs" blocks per SM
    assert kc.choose_knobs(8, 2, "regs")[1] == 320
    kc.set_occupancy(None)


def test_staging_choice():
    kc.set_staging("auto")
    assert kc.choose_staging(np.float32, 65, 4) == "regs"  # the paper's shape
    assert kc.choose_staging(np.float64, 65, 4) == "regs"
    assert kc.choose_staging(np.float32, 600, 4) == "rows"  # more than 32 warps of 16 rows
    kc.set_staging("tile")
    assert kc.choose_staging(np.float32, 32, 4) == "tile"
    with pytest.raises(ValueError, match="staging='tile'"):
        kc.choose_staging(np.float32, 33, 4)  # more rows than threads
    kc.set_threads(128)
    assert kc.choose_staging(np.float32, 65, 4) == "tile"  # 65 × 129 × 4 B
    with pytest.raises(ValueError, match="staging='tile'"):
        kc.choose_staging(np.float64, 65, 4)  # 67 kB: past the 48 kB
    kc.set_staging("rows")
    assert kc.choose_staging(np.float32, 65, 4) == "rows"
    with pytest.raises(ValueError, match="staging"):
        kc.set_staging("warp")


def test_regs_layout_and_choice():
    kc.set_staging("regs")
    # the paper's shape: 5 warps of 13 rows (float32), 9 of 8 (float64), tiles of 32 pixels
    assert kc.regs_layout(np.float32, 65, 4) == (5, 13)
    assert kc.regs_layout(np.float64, 65, 4) == (9, 8)
    assert kc.regs_layout(np.float32, 65, 8) == (9, 8)  # fewer rows at a higher rank
    assert kc.launch_layout(np.float32, 65, 4) == kc.Layout("regs", 160, 32, 13)
    assert kc.launch_layout(np.float32, 3, 4) == kc.Layout("regs", 32, 32, 3)
    kc.set_rows_per_thread(4)
    assert kc.regs_layout(np.float32, 9, 3) == (3, 3)
    assert kc.regs_layout(np.float32, 512, 4) == (128, 4)
    with pytest.raises(ValueError, match="staging='regs'"):  # 128 warps > 32
        kc.choose_staging(np.float32, 512, 4)
    with pytest.raises(ValueError, match="rows per thread"):
        kc.set_rows_per_thread(0)
    kc.set_rows_per_thread(None)
    assert kc.choose_staging(np.float32, 512, 4) == "regs"  # 32 warps of 16 rows
    # one wave of blocks: resident blocks per SM × SMs (the simulator reports 2 SMs), per problem
    # (below FLAT_MIN_TILES = 64 tiles per block of the wave, which would choose "flat")
    assert kc.choose_mode(1, 32 * 300, 32, resident=3) == ("grid", 6)
    assert kc.choose_mode(4, 32 * 90, 32, resident=3) == ("grid", 1)
    assert kc.choose_mode(1, 32 * 384, 32, resident=3) == ("flat", 6)
    assert kc.choose_mode(1, 64, 32, resident=3) == ("grid", 2)  # never more blocks than tiles
    # wide tiles: 32·ppl pixels; their S columns and shares take ppl times the shared memory
    kc.set_pixels_per_lane(2)
    assert kc.launch_layout(np.float32, 65, 4) == kc.Layout("regs", 160, 64, 13)
    assert kc.choose_mode(1, 128, kc.launch_layout(np.float32, 65, 4).tile, resident=3) == ("grid", 2)
    assert kc.static_shared_bytes(np.float32, 160, 4, "regs", 2) - kc.static_shared_bytes(
        np.float32, 160, 4, "regs") == (2 * 4 * 32 + 4 * 160) * 4
    kc.set_pixels_per_lane(8)
    with pytest.raises(ValueError, match="staging='regs'"):  # 32 warps' shares of 256-pixel tiles: 144 kB
        kc.choose_staging(np.float32, 512, 4)
    kc.set_staging("auto")
    assert kc.choose_staging(np.float32, 512, 4) == "rows"
    kc.set_staging("regs")
    kc.set_pixels_per_lane(1)
    # the other stagings keep the thread count as tile width
    kc.set_staging("rows")
    assert kc.launch_layout(np.float32, 65, 4) == kc.Layout("rows", 32, 32, 0)


@pytest.mark.parametrize(
    "dtype,per_problem,staging",
    [(np.float32, False, "regs"), (np.float64, True, "regs"), (np.float64, False, "rows"), (np.float32, True, "tile"),
     (np.float32, True, "regs-wide")],
)
def test_layer_step_out_of_place(dtype, per_problem, staging):
    """One launch: A, S, P, G read only; A', S' and the P, G of S' written to fresh arrays
    ("regs-wide": tiles of 2 · 32 pixels, the second half of the last one past t)."""
    kc.set_staging(staging.split("-")[0])
    kc.set_pixels_per_lane(2 if staging.endswith("wide") else 1)
    kc.set_rows_per_thread(4)
    b, m, n, t = 2, 9, 3, 70
    X, A, S = _problem(b, m, n, t, dtype, seed=21)
    rng = np.random.default_rng(3)
    W = (0.5 + rng.random((b if per_problem else 1, m, n))).astype(dtype)
    Xd = X.astype(np.float64)
    P = (Xd @ S.astype(np.float64).transpose(0, 2, 1)).astype(dtype)
    G = (S.astype(np.float64) @ S.astype(np.float64).transpose(0, 2, 1)).astype(dtype)
    kc.set_mode("grid")
    kc.set_blocks_per_problem(2)
    d = cuda.to_device
    dX, dA, dS, dW, dP, dG = (d(a) for a in (X, A, S, W, P, G))
    Ao, So = cuda.device_array((b, m, n), dtype), cuda.device_array((b, n, t), dtype)
    Po, Go = d(np.zeros((b, m, n), dtype)), d(np.zeros((b, n, n), dtype))
    kc.layer_step(dX, dA, dS, dW, dP, dG, Ao, So, Po, Go, EPS, True)
    Ar, Sr = mu_step_numpy(Xd, A.astype(np.float64), S.astype(np.float64),
                           W.astype(np.float64) if per_problem else W[0].astype(np.float64), EPS)
    np.testing.assert_allclose(Ao.copy_to_host(), Ar, **TOL[dtype])
    np.testing.assert_allclose(So.copy_to_host(), Sr, **TOL[dtype])
    np.testing.assert_allclose(Po.copy_to_host(), Xd @ Sr.transpose(0, 2, 1), **TOL[dtype])
    np.testing.assert_allclose(Go.copy_to_host(), Sr @ Sr.transpose(0, 2, 1), **TOL[dtype])
    for dev, host in ((dA, A), (dS, S), (dP, P), (dG, G)):  # inputs untouched
        np.testing.assert_array_equal(dev.copy_to_host(), host)
    # update=False: the P, G pass over S alone
    Pz, Gz = d(np.zeros((b, m, n), dtype)), d(np.zeros((b, n, n), dtype))
    kc.layer_step(dX, dA, dS, dW, dP, dG, Ao, So, Pz, Gz, EPS, True, update=False)
    np.testing.assert_allclose(Pz.copy_to_host(), P, **TOL[dtype])
    np.testing.assert_allclose(Gz.copy_to_host(), G, **TOL[dtype])
    with pytest.raises(ValueError, match="S_out"):
        kc.layer_step(dX, dA, dS, dW, dP, dG, Ao, Ao, Po, Go, EPS, True)


def test_tile_staging_with_several_threads_per_row():
    """m = 9 ≤ 32 / 3: three threads share each row of P (atomics into the block's P)."""
    kc.set_staging("tile")
    X, A, S = _problem(2, 9, 4, 90, np.float64, seed=12)
    A1, S1, P1, G1 = _run(X, A, S, None, 3, "grid", 2)
    Ar, Sr = _reference(X, A, S, None, 3)
    np.testing.assert_allclose(A1, Ar, **TOL[np.float64])
    np.testing.assert_allclose(S1, Sr, **TOL[np.float64])
    np.testing.assert_allclose(P1, X @ Sr.transpose(0, 2, 1), **TOL[np.float64])


def test_m_too_large_for_shared_memory():
    kc.set_threads(1024)
    X = np.ones((1, 2000, 8), np.float64)
    d = cuda.to_device
    with pytest.raises(ValueError, match="shared memory") as err:
        kc.mu_run(d(X), d(np.ones((1, 2000, 8))), d(np.ones((1, 8, 8))), d(np.ones((1, 2000, 8))),
                  d(np.ones((1, 2000, 8))), d(np.ones((1, 8, 8))), 1, EPS, False, True)
    assert "backend='cpu'" in str(err.value) and "factorise Xᵀ" in str(err.value)  # the ways out


# ----------------------------------------------------------------------------- engine / solver


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mu_backend_cuda_host_arrays(dtype):
    """fastmu.mu(X_numpy, backend="cuda"): host -> device -> host, same result as the CPU backend."""
    import fastmu

    rng = np.random.default_rng(11)
    X = (rng.random((2, 6, 3)) @ rng.random((2, 3, 70))).astype(dtype)
    kw = dict(n_iter=4, random_state=0, init="random")
    A_g, S_g = fastmu.mu(X, 3, backend="cuda", **kw)
    A_c, S_c = fastmu.mu(X, 3, backend="cpu", **kw)
    assert isinstance(A_g, np.ndarray) and A_g.dtype == dtype and A_g.shape == (2, 6, 3)
    np.testing.assert_allclose(A_g, A_c, **TOL[dtype])
    np.testing.assert_allclose(S_g, S_c, **TOL[dtype])
    # 2-D in, 2-D out, and the tolerance path (objective from P, G) runs
    A2, S2 = fastmu.mu(X[0], 3, backend="cuda", n_iter=4, tol=1e-9, check_every=2, random_state=0)
    assert A2.shape == (6, 3) and S2.shape == (3, 70)


@pytest.mark.parametrize("shape", [(6, 40), (40, 6)])
def test_estimator_backend_cuda(shape):
    """fastmu.NMF(backend="cuda") on host arrays, a wide X and a tall one (run on Xᵀ): the same
    fit as on the CPU backend, with the tol path (the norm's decrease) running on the device."""
    import fastmu

    rng = np.random.default_rng(13)
    X = rng.random((shape[0], 3)) @ rng.random((3, shape[1]))
    kw = dict(n_components=3, init="random", random_state=0, max_iter=12, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter reached: ConvergenceWarning
        gpu, cpu = fastmu.NMF(backend="cuda", **kw), fastmu.NMF(backend="cpu", **kw)
        W_g, W_c = gpu.fit_transform(X), cpu.fit_transform(X)
    assert gpu.n_iter_ == cpu.n_iter_ == 12
    np.testing.assert_allclose(W_g, W_c, **TOL[np.float64])
    np.testing.assert_allclose(gpu.components_, cpu.components_, **TOL[np.float64])


def test_mu_backend_cuda_default_layout():
    """With the default staging ("auto"), fastmu.mu(backend="cuda") runs the "regs" layout
    (three warps of rows at m = 6 and 2 rows per thread) and matches the CPU backend."""
    import fastmu

    kc.set_config(staging="auto", rows_per_thread=2)
    assert kc.launch_layout(np.float32, 6, 3).staging == "regs"
    rng = np.random.default_rng(12)
    X = (rng.random((2, 6, 3)) @ rng.random((2, 3, 70))).astype(np.float32)
    kw = dict(n_iter=4, random_state=0, init="random")
    A_g, S_g = fastmu.mu(X, 3, backend="cuda", **kw)
    A_c, S_c = fastmu.mu(X, 3, backend="cpu", **kw)
    np.testing.assert_allclose(A_g, A_c, **TOL[np.float32])
    np.testing.assert_allclose(S_g, S_c, **TOL[np.float32])


def test_engine_objective_and_callbacks():
    from fastmu.cuda_engine import CUDAEngine
    from fastmu.reference import objective_numpy

    X, A, S = _problem(2, 5, 2, 40, np.float64, seed=12)
    eng = CUDAEngine(*(CUDAEngine.adopt(a, None) for a in (X, A, S)), None, EPS)
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, A, S), rtol=1e-10)
    eng.run(2)
    eng.run(1)
    A3, S3 = (CUDAEngine.release(a, "numpy", X) for a in eng.factors())
    Ar, Sr = _reference(X, A, S, None, 3)
    np.testing.assert_allclose(A3, Ar, rtol=1e-11)
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, Ar, Sr), rtol=1e-9)
    # a copy is independent of the state
    C = CUDAEngine.copy(eng.A)
    eng.run(1)
    np.testing.assert_array_equal(C.copy_to_host(), A3)


def test_engine_learned_weights_and_torch_cpu():
    import torch

    from fastmu.cuda_engine import CUDAEngine

    X, A, S = _problem(2, 5, 2, 40, np.float32, seed=13)
    W = (0.5 + np.random.default_rng(1).random((5, 2))).astype(np.float32)
    Xt = torch.from_numpy(X)
    dX = CUDAEngine.adopt(Xt, None)
    eng = CUDAEngine(dX, CUDAEngine.adopt(A, dX), CUDAEngine.adopt(S, dX), W, EPS)
    eng.run(2)
    At = CUDAEngine.release(eng.A, "torch", Xt)
    assert isinstance(At, torch.Tensor) and At.device.type == "cpu"
    Ar, _ = _reference(X, A, S, W, 2)
    np.testing.assert_allclose(At.numpy(), Ar, **TOL[np.float32])


def test_engine_bad_input():
    from fastmu.cuda_engine import CUDAEngine

    with pytest.raises(TypeError, match="float32 or float64"):
        CUDAEngine.adopt(np.ones((1, 3, 4), np.int32), None)
    dX = CUDAEngine.adopt(np.ones((1, 3, 4), np.float32), None)
    with pytest.raises(TypeError, match="dtype"):
        CUDAEngine.adopt(np.ones((1, 3, 2), np.float64), dX)
    with pytest.raises(ValueError, match="at most 8"):
        CUDAEngine(dX, CUDAEngine.adopt(np.ones((1, 3, 9), np.float32), dX),
                   CUDAEngine.adopt(np.ones((1, 9, 4), np.float32), dX), None, EPS)
    with pytest.raises(TypeError, match="Numba device arrays"):
        CUDAEngine(np.ones((1, 3, 4), np.float32), dX, dX, None, EPS)


def test_backward_follows_the_forward_layout_within_limits():
    kb = pytest.importorskip("fastmu.kernels.cuda_backward")
    kc.set_staging("rows")
    assert kb.backward_layout(np.float32, 65, 4) is None  # one thread per pixel column
    kc.set_staging("regs")
    # the forward's 5 × 13 where it covers m exactly, else its own 11-row default (no spills)
    assert kb.backward_layout(np.float32, 65, 4) == kc.regs_layout(np.float32, 65, 4) == (5, 13)
    assert kc.regs_layout(np.float32, 100, 4) == (7, 15)
    assert kb.backward_layout(np.float32, 100, 4) == (10, 10)
    assert kb.backward_layout(np.float64, 65, 4) == kc.regs_layout(np.float64, 65, 4)
    assert kb.regs_shared_bytes(np.float32, 65, 4, 6, 11) <= 48 * 1024
    assert kb.backward_layout(np.float64, 512, 8) is None  # its shared memory would not fit
    assert kb.backward_layout(np.float32, 65, 9) is None  # above the forward's MAX_N
    kc.set_rows_per_thread(4)
    assert kb.backward_layout(np.float32, 9, 3) == (3, 3)
    kc.set_rows_per_thread(None)
    kc.set_staging("auto")  # the default resolves as the forward's launch does
    assert kb.backward_layout(np.float32, 65, 4) == (5, 13)
    assert kb.backward_layout(np.float32, 600, 4) is None  # the forward takes "rows" there


@pytest.mark.parametrize("dtype,mode,bpp", [(np.float32, "grid", 2), (np.float64, "block", None)])
def test_regs_prefetch_matches_reference(dtype, mode, bpp):
    """Loading the next tile ahead (set_prefetch) changes no result: several tiles per block,
    the last one partial."""
    kc.set_staging("regs")
    kc.set_rows_per_thread(4)
    kc.set_prefetch(True)
    try:
        X, A, S = _problem(2, 9, 3, 200, dtype, seed=31)
        A1, S1, P1, G1 = _run(X, A, S, None, 3, mode, bpp)
    finally:
        kc.set_prefetch(False)
    Ar, Sr = _reference(X, A, S, None, 3)
    np.testing.assert_allclose(A1, Ar, **TOL[dtype])
    np.testing.assert_allclose(S1, Sr, **TOL[dtype])
    np.testing.assert_allclose(P1, X.astype(np.float64) @ Sr.transpose(0, 2, 1), **TOL[dtype])
    with pytest.raises(ValueError, match="prefetch"):
        kc.set_prefetch("yes")


@pytest.mark.parametrize("dtype,mode,bpp,ppl,prefetch", [
    (np.float32, "grid", 2, 2, False), (np.float64, "flat", 3, 3, False), (np.float32, "grid", 1, 2, True)])
def test_regs_wide_tiles_match_reference(dtype, mode, bpp, ppl, prefetch):
    """Tiles of ppl · 32 pixels (set_pixels_per_lane) change no result beyond rounding: t = 200
    leaves the last wide tile partial (some of its lanes' pixels past t), m = 9 at 4 rows per
    thread a partial last warp; grid mode with several wide tiles per block, flat mode with
    tile ranges that cross problems, and prefetching the next wide tile."""
    kc.set_staging("regs")
    kc.set_rows_per_thread(4)
    kc.set_pixels_per_lane(ppl)
    kc.set_prefetch(prefetch)
    assert kc.launch_layout(dtype, 9, 3).tile == 32 * ppl
    X, A, S = _problem(2, 9, 3, 200, dtype, seed=37)
    A1, S1, P1, G1 = _run(X, A, S, None, 3, mode, bpp)
    Ar, Sr = _reference(X, A, S, None, 3)
    np.testing.assert_allclose(A1, Ar, **TOL[dtype])
    np.testing.assert_allclose(S1, Sr, **TOL[dtype])
    np.testing.assert_allclose(P1, X.astype(np.float64) @ Sr.transpose(0, 2, 1), **TOL[dtype])
    np.testing.assert_allclose(G1, Sr @ Sr.transpose(0, 2, 1), **TOL[dtype])
    with pytest.raises(ValueError, match="pixels per lane"):
        kc.set_pixels_per_lane(0)
    with pytest.raises(ValueError, match="pixels per lane"):
        kc.set_pixels_per_lane(kc.MAX_PIXELS_PER_LANE + 1)


def test_sanitizer_program_agrees_with_the_reference():
    """bench/gpu_sanity.py, the program compute-sanitizer runs on a GPU, in the simulator:
    the regs layout with a partial last warp in grid mode, rows in block mode, and rows in
    flat mode with tile ranges that cross problems."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_sanity.py"
    spec = importlib.util.spec_from_file_location("gpu_sanity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.run_mu(stagings=("regs",), modes=("grid",)) == []
    assert mod.run_mu(stagings=("rows",), modes=("block", "flat")) == []


@pytest.mark.parametrize("dtype,mode,bpp", [(np.float32, "grid", 2), (np.float64, "block", None)])
def test_regs_lane_reduction_in_several_rounds(dtype, mode, bpp, monkeypatch):
    """The "regs" sweep sums its P and G partials over lanes through a buffer of a few
    entries per round: with 3 per round, P (2 rows × 5 components per thread) takes four
    rounds and G (components 0, 2, 4 of the first warp: 15 sums) five; the results match."""
    monkeypatch.setattr(kc, "_REGS_REDUCE_BUDGET", 2 * 33 * 8 * 3)  # 2 warps, 3 entries
    kc._build.cache_clear()
    kc.set_staging("regs")
    kc.set_rows_per_thread(2)
    try:
        assert kc.regs_reduce_entries(64, np.dtype(dtype).itemsize) == (3 if dtype == np.float64 else 6)
        X, A, S = _problem(2, 4, 5, 100, dtype, seed=41)  # 2 warps × 2 rows, n = 5
        A1, S1, P1, G1 = _run(X, A, S, None, 2, mode, bpp)
    finally:
        kc._build.cache_clear()
    Ar, Sr = _reference(X, A, S, None, 2)
    np.testing.assert_allclose(A1, Ar, **TOL[dtype])
    np.testing.assert_allclose(S1, Sr, **TOL[dtype])
    np.testing.assert_allclose(P1, X.astype(np.float64) @ Sr.transpose(0, 2, 1), **TOL[dtype])
    np.testing.assert_allclose(G1, Sr @ Sr.transpose(0, 2, 1), **TOL[dtype])


def test_float32_tol_stops_where_the_cpu_backend_does():
    """float32 tol checks read the residual itself on both backends (P and G are too coarse
    there): the same stopping iteration."""
    import fastmu

    rng = np.random.default_rng(17)
    X = (rng.random((6, 3)) @ rng.random((3, 70)) + 0.01 * rng.random((6, 70))).astype(np.float32)
    kw = dict(n_iter=40, tol=1e-2, check_every=5, random_state=0, init="random", return_n_iter=True)
    *_, n_gpu = fastmu.mu(X, 3, backend="cuda", **kw)  # (the simulator takes ~1 s per iteration here)
    *_, n_cpu = fastmu.mu(X, 3, backend="cpu", **kw)
    assert n_gpu == n_cpu < 40
