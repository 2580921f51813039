"""pytest-benchmark timings of the CUDA kernels (skipped without a CUDA GPU).

    python -m pytest bench/bench_gpu.py --benchmark-only

Each round is timed from the host around a synchronised run; the fuller
comparison with peers and bandwidth figures is ``fastmu bench --device cuda``
(:func:`fastmu.benchmarks.mu_gpu.run_gpu_benchmarks`).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("GPU benchmarks do not run in the CUDA simulator", allow_module_level=True)
try:
    from numba import cuda

    _HAVE_GPU = bool(cuda.is_available())
except Exception:  # pragma: no cover
    _HAVE_GPU = False
if not _HAVE_GPU:
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("pytest_benchmark")

from fastmu.kernels import cuda as kc  # noqa: E402

M, N, T = 65, 4, 16384
ITERS = 1000


def _setup(b):
    rng = np.random.default_rng(b)
    X = cuda.to_device((rng.random((b, M, N)) @ rng.random((b, N, T))).astype(np.float32))
    A = cuda.to_device((0.5 + rng.random((b, M, N))).astype(np.float32))
    S = cuda.to_device((0.5 + rng.random((b, N, T))).astype(np.float32))
    W = cuda.to_device(np.ones((1, M, N), np.float32))
    P = cuda.device_array((b, M, N), np.float32)
    G = cuda.device_array((b, N, N), np.float32)
    return X, A, S, W, P, G


@pytest.mark.parametrize("mode", ["block", "grid"])
@pytest.mark.parametrize("b", [1, 150], ids=["W1", "W2"])
def test_fastmu_cuda(benchmark, mode, b):
    saved = kc.get_config()["mode"]
    kc.set_mode(mode)
    X, A, S, W, P, G = _setup(b)
    ws = kc.GridWorkspace()

    def run():
        kc.mu_run(X, A, S, W, P, G, ITERS, 1e-12, False, True, 0, ws)
        cuda.synchronize()

    try:
        run()  # compile, capture graphs
        benchmark.extra_info.update(iters=ITERS, batch=b, mode=mode,
                                    model_bytes_per_iter=4 * (M * T + 2 * N * T) * b)
        benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        kc.set_mode(saved)
