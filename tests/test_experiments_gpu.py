"""The paper's experiments on a real GPU: every method runs on CUDA tensors and agrees with the CPU.

Skipped without a CUDA GPU visible to torch and Numba (and under the simulator).
Run on a GPU machine with ``python -m pytest -m gpu tests/test_experiments_gpu.py``.
"""
from __future__ import annotations

import pytest

from helpers import real_cuda_gpu

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

if not (torch.cuda.is_available() and real_cuda_gpu()):
    pytest.skip("needs a CUDA GPU visible to torch and Numba (simulator off)", allow_module_level=True)

import numpy as np  # noqa: E402

from fastmu.experiments import METHODS, ExperimentConfig, run_paper  # noqa: E402

TINY = dict(size=16, n_train=8, n_test=3, nalmu_layers=4, dnmf_layers=2, snmf_layers=2, epochs=2,
            batch_size=4, mu_iters=50, cd_iters=20, dtype="float64")


def test_run_paper_on_cuda_matches_cpu(tmp_path):
    res = {dev: run_paper(ExperimentConfig(device=dev, **TINY), tmp_path / dev, progress=False, log=None)
           for dev in ("cpu", "cuda")}
    assert res["cuda"].machine["device"] == "cuda" and "gpu" in res["cuda"].machine
    for set_name in ("test_simple", "test_realistic"):
        for kind in METHODS:
            a = res["cpu"].scores[set_name][kind]
            b = res["cuda"].scores[set_name][kind]
            # float64 throughout; training and the solvers follow the same sequence of
            # steps on both devices, so the scores agree far below their spread
            np.testing.assert_allclose(b["cos_A"], a["cos_A"], rtol=1e-6, atol=1e-8, err_msg=f"{set_name} {kind}")
            np.testing.assert_allclose(b["cos_S"], a["cos_S"], rtol=1e-6, atol=1e-8, err_msg=f"{set_name} {kind}")
