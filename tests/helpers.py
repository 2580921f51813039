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


def require_cudasim() -> None:
    """Skip the calling test module unless Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1``
    must be set before Numba is imported, so the simulator tests run in a process of their own)."""
    import os

    import pytest

    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip(
            "CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/",
            allow_module_level=True,
        )


#: the simulator tests' CUDA kernel knobs (fastmu.kernels.cuda.set_config): 32 threads per block
#: (32-pixel tiles), so that tiny problems span several tiles and blocks, automatic mode, X staged
#: in row chunks
TINY_CUDA_BLOCKS = dict(threads=32, mode="auto", blocks_per_problem=None, staging="rows", rows_per_thread=None,
                        prefetch=False, pixels_per_lane=1)


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


def record_calls(monkeypatch, module, *names):
    """Wrap ``module``'s functions ``names`` so that each call appends its name to the returned list.

    For the kernels' Python-level schedule choice: a test asserts which
    compiled schedule its shape ran, whatever the machine's thread count.
    """
    calls = []
    for name in names:
        fn = getattr(module, name)

        def spy(*args, _fn=fn, _name=name):
            calls.append(_name)
            return _fn(*args)

        monkeypatch.setattr(module, name, spy)
    return calls


def schedule_shapes(nthreads, unit, min_units=2):
    """``{schedule: (b, t)}`` that the column kernels run problem-major and block-parallel on ``nthreads``.

    ``unit`` is the kernel's unit of pixels (a column block, or a tile) and
    ``min_units`` the units per thread below which it keeps to problem-major
    (``kernels.cpu._problem_major``). Problem-major: twice as many problems as
    threads. Block-parallel: ``nthreads + 1`` problems (not a multiple of the
    threads, fewer than four per thread) of ``min_units + 1/3`` units each;
    with one thread there is none.
    """
    return {"problem_major": (2 * nthreads, unit // 2 + 9),
            "block_parallel": (nthreads + 1, min_units * unit + unit // 3)}


def run_tiled(X, A, S, W=None, n_iter=1, penalty=None, state=None, accumulate_last=True):
    """``n_iter`` iterations of ``cpu_tiled.mu_run`` (rank 4) on a copy of A; returns
    (A, S, state). ``state`` = (Xt, Sp, P, G) carries on from an earlier call;
    ``penalty`` None calls the kernel without the argument, as before penalties existed."""
    import numba

    from fastmu import EPS
    from fastmu.kernels import cpu, cpu_tiled

    b, m, t = X.shape
    A = A.copy()
    W = np.ones((1, m, 4), X.dtype) if W is None else W
    if state is None:
        Xt, Sp = cpu_tiled.make_tiled(X, S)
        P, G, valid = np.empty((b, m, 4), X.dtype), np.empty((b, 4, 4), X.dtype), False
    else:
        (Xt, Sp, P, G), valid = state, True
    args = (Xt, A, Sp, W, P, G, n_iter, EPS, valid, accumulate_last, numba.config.NUMBA_NUM_THREADS)
    cpu_tiled.mu_run(*args) if penalty is None else cpu_tiled.mu_run(*args, penalty)
    S_out = np.empty(S.shape, X.dtype)
    cpu.copy_rows(Sp, S_out)
    return A, S_out, (Xt, Sp, P, G)
