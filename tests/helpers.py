"""Small test problems shared by several test modules."""
from __future__ import annotations

import numpy as np


def low_rank_problem(rng, b, m, n, t, dtype=np.float64, noise=0.0):
    """X = A S (+ noise) with non-negative A, S; returns X and a random start A0, S0."""
    A = rng.random((b, m, n))
    S = rng.random((b, n, t))
    X = A @ S + noise * rng.random((b, m, t))
    A0 = rng.random((b, m, n)) + 0.1
    S0 = rng.random((b, n, t)) + 0.1
    return X.astype(dtype), A0.astype(dtype), S0.astype(dtype)


def learned_layer_inputs(b, m, n, t, dtype=None, per_problem=False, seed=0):
    """Positive torch inputs X, A, S, W of one learned-MU layer (W (m, n) or (b, m, n))."""
    import torch

    dtype = dtype or torch.float64
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(b, m, t, generator=g, dtype=dtype)
    A = torch.rand(b, m, n, generator=g, dtype=dtype) + 0.1
    S = torch.rand(b, n, t, generator=g, dtype=dtype) + 0.1
    W = torch.rand(*((b,) if per_problem else ()), m, n, generator=g, dtype=dtype) + 0.5
    return X, A, S, W


def real_cuda_gpu() -> bool:
    """True when Numba sees a real CUDA GPU (and the simulator is off)."""
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False
