"""The read-pattern probe (fastmu.benchmarks.read_patterns) in Numba's CUDA simulator.

Its timings only mean something if each pattern reads every value of X exactly once:
the sum of what the kernel read must equal X's sum, for partial warps (rows past m),
partial tiles (pixels past t), several pixels per lane, both tile orders, and more
blocks than a problem has tiles.
"""
from __future__ import annotations


import numpy as np
import pytest

from helpers import require_cudasim

pytestmark = pytest.mark.cudasim

require_cudasim()

from fastmu.benchmarks import read_patterns  # noqa: E402


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("ppl,blocks", [(1, 2), (2, 3), (3, 5)])
def test_tiles_read_every_value_once(contiguous, ppl, blocks):
    from numba import cuda

    rng = np.random.default_rng(ppl)
    # m = 10 with 4 rows per thread: the third warp has 2 rows past m; t = 150 is no
    # multiple of any tile width; with ppl = 3 (96 pixels a tile) 2 tiles meet 5 blocks
    X = rng.integers(1, 50, size=(2, 10, 150)).astype(np.float32)
    total = read_patterns.check_coverage(cuda.to_device(X), 4, ppl, contiguous, blocks)
    assert total == float(X.astype(np.float64).sum())


def test_linear_reads_every_value_once():
    from numba import cuda

    X = np.arange(1, 1001, dtype=np.float32)
    assert read_patterns.check_linear(cuda.to_device(X), blocks=3, threads=32) == float(X.sum())
