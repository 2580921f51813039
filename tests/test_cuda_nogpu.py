"""``backend="cuda"`` without a GPU (and without the simulator) fails with a clear error."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fastmu.dispatch import cuda_available


@pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or cuda_available(),
    reason="a GPU or the CUDA simulator is available here",
)
def test_backend_cuda_without_gpu_is_a_clear_error():
    import fastmu

    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        fastmu.mu(np.ones((4, 10)), 2, backend="cuda")
