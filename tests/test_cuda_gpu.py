"""The CUDA backend on a real GPU: zero-copy CuPy/torch interop, streams, both launch designs.

Skipped without a CUDA GPU (and under the simulator, which has no streams
and no CuPy/torch device memory). Run on a lent GPU machine with
``python -m pytest -m gpu tests/test_cuda_gpu.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import real_cuda_gpu

pytestmark = pytest.mark.gpu

if not real_cuda_gpu():
    pytest.skip("needs a real CUDA GPU (numba.cuda.is_available() is False or the simulator is on)",
                allow_module_level=True)

from numba import cuda  # noqa: E402

import fastmu  # noqa: E402
from fastmu.cuda_engine import CUDAEngine  # noqa: E402
from fastmu.kernels import cuda as kc  # noqa: E402
from fastmu.reference import mu_numpy  # noqa: E402

EPS = 1e-12


@pytest.fixture(autouse=True)
def _restore_config():
    saved = kc.get_config()
    yield
    kc.set_config(**saved)


def _problem(b, m, n, t, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((b, m, n)) @ rng.random((b, n, t)) + 0.01 * rng.random((b, m, t))
    A = 0.5 + rng.random((b, m, n))
    S = 0.5 + rng.random((b, n, t))
    return X, A, S


def _run_kernel(X, A, S, n_iter, dtype):
    d = [cuda.to_device(np.ascontiguousarray(a, dtype)) for a in (X, A, S)]
    b, m, t = X.shape
    n = A.shape[2]
    W = cuda.to_device(np.ones((1, m, n), dtype))
    P = cuda.device_array((b, m, n), dtype)
    G = cuda.device_array((b, n, n), dtype)
    kc.mu_run(d[0], d[1], d[2], W, P, G, n_iter, EPS, False, True)
    return d[1].copy_to_host(), d[2].copy_to_host()


@pytest.mark.parametrize("mode", ["block", "grid"])
@pytest.mark.parametrize(
    "dtype,rtol,staging",
    [(np.float32, 2e-3, "rows"), (np.float64, 1e-10, "rows"), (np.float32, 2e-3, "tile"),
     (np.float32, 2e-3, "regs"), (np.float64, 1e-10, "regs")],
)
def test_w1_shape_matches_reference(mode, dtype, rtol, staging):
    """One 65×16384 rank-4 problem, 30 iterations, against float64 NumPy, with each
    staging of X (the whole tile fits shared memory in float32 at 128 threads)."""
    kc.set_mode(mode)
    kc.set_staging(staging)
    X, A, S = _problem(1, 65, 4, 16384)
    A1, S1 = _run_kernel(X, A, S, 30, dtype)
    Ar, Sr = mu_numpy(X, A, S, 30, EPS)
    np.testing.assert_allclose(A1, Ar, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(S1, Sr, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("staging,dtype,rtol", [("regs", np.float32, 5e-3), ("regs", np.float64, 1e-9),
                                                 ("rows", np.float64, 1e-9)])
def test_flat_mode_matches_reference(staging, dtype, rtol):
    """"flat" mode on a real GPU: 7 problems whose tiles do not divide evenly over one wave of
    blocks (ranges cross problems), 130 iterations, so the CUDA-graph path runs too."""
    kc.set_mode("flat")
    kc.set_staging(staging)
    X, A, S = _problem(7, 65, 4, 3000, seed=3)
    A1, S1 = _run_kernel(X, A, S, 130, dtype)
    Ar, Sr = mu_numpy(X, A, S, 130, EPS)
    np.testing.assert_allclose(A1, Ar, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(S1, Sr, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("mode,staging", [("block", "rows"), ("block", "tile"), ("grid", "regs"),
                                          ("flat", "regs"), ("flat", "rows")])
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 5e-3), (np.float64, 1e-9)])
def test_penalised_kernels_match_reference(mode, staging, dtype, rtol):
    """The ``_pen`` twin kernels on a real GPU: L1 and L2 weights on both factors, 130
    iterations (the graph path too), against the penalised float64 NumPy reference."""
    from fastmu.penalty import Penalty

    pen = Penalty(0.02, 0.1, 0.03, 0.2)
    kc.set_mode(mode)
    kc.set_staging(staging)
    X, A, S = _problem(3, 65, 4, 3000, seed=5)
    d = [cuda.to_device(np.ascontiguousarray(a, dtype)) for a in (X, A, S)]
    W = cuda.to_device(np.ones((1, 65, 4), dtype))
    P, G = cuda.device_array((3, 65, 4), dtype), cuda.device_array((3, 4, 4), dtype)
    kc.mu_run(d[0], d[1], d[2], W, P, G, 130, EPS, False, True, penalty=tuple(pen))
    Ar, Sr = mu_numpy(X, A, S, 130, EPS, penalty=pen)
    np.testing.assert_allclose(d[1].copy_to_host(), Ar, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(d[2].copy_to_host(), Sr, rtol=rtol, atol=1e-6)


def test_graphs_equal_direct_launches():
    pytest.importorskip("cupy")
    kc.set_mode("grid")
    X, A, S = _problem(2, 65, 4, 4096, seed=1)
    kc.set_graphs(False)
    A0, S0 = _run_kernel(X, A, S, 300, np.float64)
    kc.set_graphs(True)
    A1, S1 = _run_kernel(X, A, S, 300, np.float64)
    # grid mode adds partial P, G with atomics, whose order varies run to run:
    # equal up to rounding, not bit for bit
    np.testing.assert_allclose(A1, A0, rtol=1e-10)
    np.testing.assert_allclose(S1, S0, rtol=1e-10)


@pytest.mark.parametrize("threads", [32, 128, 256, 1024])
def test_thread_counts(threads):
    kc.set_threads(threads)
    X, A, S = _problem(3, 65, 4, 3000, seed=2)
    for mode in ("block", "grid"):
        kc.set_mode(mode)
        A1, S1 = _run_kernel(X, A, S, 5, np.float64)
        Ar, Sr = mu_numpy(X, A, S, 5, EPS)
        np.testing.assert_allclose(S1, Sr, rtol=1e-10)


def test_cupy_zero_copy_and_stream():
    cp = pytest.importorskip("cupy")
    X, _, _ = _problem(3, 20, 3, 500, seed=3)
    Xc = cp.asarray(X, dtype=cp.float32)
    assert CUDAEngine.adopt(Xc, None).__cuda_array_interface__["data"][0] == Xc.data.ptr
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        A, S = fastmu.mu(Xc, 3, n_iter=50, random_state=0, backend="cuda")
        assert isinstance(A, cp.ndarray) and A.dtype == cp.float32
        R = float(cp.linalg.norm(Xc - A @ S) / cp.linalg.norm(Xc))
    A_h, S_h = fastmu.mu(X.astype(np.float32), 3, n_iter=50, random_state=0, backend="cpu")
    np.testing.assert_allclose(cp.asnumpy(A), A_h, rtol=2e-3, atol=1e-6)
    assert R < 0.2


def test_torch_zero_copy_stream_and_noncontiguous():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    X, _, _ = _problem(2, 20, 3, 400, seed=4)
    Xt = torch.tensor(X, device="cuda")
    assert CUDAEngine.adopt(Xt, None).__cuda_array_interface__["data"][0] == Xt.data_ptr()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        A, S = fastmu.mu(Xt, 3, n_iter=40, random_state=0, backend="cuda")
    s.synchronize()
    assert isinstance(A, torch.Tensor) and A.is_cuda and A.dtype == torch.float64
    A_h, S_h = fastmu.mu(X, 3, n_iter=40, random_state=0, backend="cpu")
    np.testing.assert_allclose(A.cpu().numpy(), A_h, rtol=1e-9)
    # a non-contiguous view is copied once and gives the same answer
    Xnc = torch.tensor(np.ascontiguousarray(X.transpose(0, 2, 1)), device="cuda").transpose(1, 2)
    assert not Xnc.is_contiguous()
    A2, _ = fastmu.mu(Xnc, 3, n_iter=40, random_state=0, backend="cuda")
    np.testing.assert_allclose(A2.cpu().numpy(), A_h, rtol=1e-9)


def test_device_dtype_refused():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    with pytest.raises(TypeError, match="float16|half"):
        fastmu.mu(torch.ones((1, 4, 10), device="cuda", dtype=torch.float16), 2, backend="cuda")
    with pytest.raises(TypeError, match="float32 or float64"):
        CUDAEngine.adopt(torch.ones((1, 4, 10), device="cuda", dtype=torch.float16), None)


def test_arrays_on_different_devices():
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    X = torch.rand((1, 4, 50), device="cuda:0")
    A0 = torch.rand((1, 4, 2), device="cuda:1")
    S0 = torch.rand((1, 2, 50), device="cuda:1")
    with pytest.raises(ValueError, match="device"):
        fastmu.mu(X, A0=A0, S0=S0, backend="cuda")


@pytest.mark.parametrize("shape", [(600, 65), (65, 600)])
@pytest.mark.parametrize("wide_tiles", [1, 2])
def test_estimator_on_cuda_tensors(shape, wide_tiles):
    """fastmu.NMF on torch CUDA tensors (tall X runs on Xᵀ): CUDA tensors out, the same fit as
    on the CPU; with wide "regs" tiles (2 pixels per lane) too."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")
    kc.set_pixels_per_lane(wide_tiles)
    rng = np.random.default_rng(4)
    X = rng.random((shape[0], 4)) @ rng.random((4, shape[1])) + 0.01 * rng.random(shape)
    kw = dict(n_components=4, init="random", random_state=0, tol=0, max_iter=200)
    gpu = fastmu.NMF(**kw)
    W = gpu.fit_transform(torch.from_numpy(X).cuda())
    assert W.is_cuda and gpu.components_.is_cuda and W.dtype == torch.float64
    cpu = fastmu.NMF(**kw)
    W_cpu = cpu.fit_transform(X)
    np.testing.assert_allclose(W.cpu().numpy(), W_cpu, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(gpu.components_.cpu().numpy(), cpu.components_, rtol=1e-8, atol=1e-10)
    assert gpu.transform(torch.from_numpy(X[:5]).cuda()).is_cuda


def test_float32_tol_reads_the_residual_and_stops_where_the_cpu_does():
    """float32 tol checks on the device read the residual itself (kernels.cuda.residual_squares):
    the objective equals the float64 residual near an exact fit, and a fit stops where the CPU's
    does (the float32 P/G sum's error would pass the decrease a check looks for)."""
    rng = np.random.default_rng(8)
    A = rng.random((2, 65, 4)) + 0.1
    S = rng.random((2, 4, 5000))
    X = (A @ S + 1e-4 * rng.random((2, 65, 5000))).astype(np.float32)
    eng = CUDAEngine(CUDAEngine.adopt(X, None), *(cuda.to_device(f.astype(np.float32)) for f in (A, S)), None,
                     fastmu.EPS)
    eng.run(2)
    A2, S2 = (f.copy_to_host().astype(np.float64) for f in eng.factors())
    want = 0.5 * ((X.astype(np.float64) - A2 @ S2) ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(eng.objective(), want, rtol=1e-2)
    X1 = X[0] + 0.01 * rng.random((65, 5000)).astype(np.float32)
    kw = dict(n_iter=3000, tol=1e-6, random_state=0, init="random", return_n_iter=True)
    n_gpu, n_cpu = fastmu.mu(X1, 4, backend="cuda", **kw)[2], fastmu.mu(X1, 4, backend="cpu", **kw)[2]
    assert abs(n_gpu - n_cpu) <= 10 and n_cpu < 3000  # rounding may move a stop by one check, not more


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-3), (np.float64, 1e-9)])
def test_tall_x_too_large_for_the_kernels_runs_on_its_transpose(dtype, rtol):
    """16384 × 65 pixels as rows: A' and P of 16384 rows do not fit a block's shared memory,
    so fastmu.mu runs Xᵀ half an iteration ahead (fastmu.transposed.TransposedCUDAEngine):
    MU's iterates, a torch CUDA tensor in and out, the tol stop where the CPU's run stops."""
    torch = pytest.importorskip("torch")
    from fastmu.penalty import Penalty
    from fastmu.transposed import cuda_transposes

    X, A0, S0 = _problem(2, 16384, 4, 65)
    X, A0, S0 = (a.astype(dtype) for a in (X, A0, S0))
    assert cuda_transposes(X.shape, 4, dtype)
    A, S = fastmu.mu(X, A0=A0, S0=S0, n_iter=50, backend="cuda", l2_S=0.01)
    Ar, Sr = mu_numpy(*(a.astype(np.float64) for a in (X, A0, S0)), 50,
                      penalty=Penalty(0.0, 0.0, 0.0, 0.01))
    np.testing.assert_allclose(A, Ar, rtol=rtol, atol=rtol * np.abs(Ar).max())
    np.testing.assert_allclose(S, Sr, rtol=rtol, atol=rtol * np.abs(Sr).max())
    Xt = torch.from_numpy(X[0]).cuda()
    kw = dict(n_iter=2000, tol=1e-5, random_state=0, init="random", return_n_iter=True)
    A_g, S_g, n_gpu = fastmu.mu(Xt, 4, **kw)
    assert A_g.is_cuda and S_g.is_cuda and A_g.shape == (16384, 4)
    n_cpu = fastmu.mu(X[0], 4, **kw)[2]
    assert abs(n_gpu - n_cpu) <= 10 and n_cpu < 2000
