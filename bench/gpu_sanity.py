"""Every CUDA kernel family once, on tiny shapes, checked against the reference: the
program for NVIDIA's compute-sanitizer (shared-memory races, out-of-bounds accesses).

On a GPU machine::

    compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/gpu_sanity.py
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/gpu_sanity.py

Covers MU in block, grid and flat mode with each staging of X ("rows", "tile",
"regs"; "regs" with 4 rows per thread, so 13 rows leave a partial last warp;
two blocks per problem in grid mode; in flat mode three problems and the
block count of one SM, so that blocks' tile ranges cross problems), and the
learned layer's forward and backward
with torch tensors in both layouts of the backward ("regs" again with a
partial last warp), and the paper's loss on its kernels. Under Numba's CUDA
simulator the MU part runs (the tests do so); the torch part needs a GPU.
Exits 1 when a result disagrees with the reference.
"""
from __future__ import annotations

import sys

import numpy as np

B, M, N, T = 2, 13, 3, 100
ITERS = 3


def _report(line: str, ok: bool, failures: list[str]) -> None:
    print(line)
    if not ok:  # a NaN error fails too
        failures.append(line)


def run_mu(stagings: tuple[str, ...] = ("rows", "tile", "regs"),
           modes: tuple[str, ...] = ("block", "grid", "flat")) -> list[str]:
    """MU through ``mu_run`` for each (staging, mode); the failures, as lines."""
    from numba import cuda

    from fastmu.kernels import cuda as kc
    from fastmu.reference import mu_numpy

    rng = np.random.default_rng(0)
    problems = {}
    for b in (B, 3):
        X = rng.random((b, M, N)) @ rng.random((b, N, T)) + 0.01 * rng.random((b, M, T))
        A0 = 0.5 + rng.random((b, M, N))
        S0 = 0.5 + rng.random((b, N, T))
        problems[b] = (X, A0, S0, *mu_numpy(X, A0, S0, ITERS, 1e-12))
    failures = []
    saved = kc.get_config()
    sms = kc._multiprocessors
    try:
        for staging in stagings:
            for mode in modes:
                kc.set_config(**saved)
                kc.set_staging(staging)
                kc.set_mode(mode)
                kc._multiprocessors = sms
                X, A0, S0, Ar, Sr = problems[B]
                if staging == "regs":
                    kc.set_rows_per_thread(4)  # 4 warps of 4 rows for 13 rows: the last one partial
                if mode == "grid":
                    kc.set_blocks_per_problem(2)
                if mode == "flat":
                    # 3 problems of 4 tiles (32 pixels) over one SM's blocks (4 for "regs", 8 for
                    # 32-thread "rows"/"tile"): ranges that cross problems
                    X, A0, S0, Ar, Sr = problems[3]
                    kc._multiprocessors = lambda: 1
                    if staging != "regs":
                        kc.set_threads(32)
                b = X.shape[0]
                dt = np.float32
                d = [cuda.to_device(np.ascontiguousarray(a, dt)) for a in (X, A0, S0)]
                W = cuda.to_device(np.ones((1, M, N), dt))
                P = cuda.device_array((b, M, N), dt)
                G = cuda.device_array((b, N, N), dt)
                kc.mu_run(d[0], d[1], d[2], W, P, G, ITERS, 1e-12, False, True)
                A1, S1 = d[1].copy_to_host(), d[2].copy_to_host()
                err = max(np.max(np.abs(A1 - Ar) / Ar), np.max(np.abs(S1 - Sr) / Sr))
                _report(f"mu {staging:4s} {mode:5s} max rel err {err:.2e}", err < 1e-3, failures)
    finally:
        kc.set_config(**saved)
        kc._multiprocessors = sms
    return failures


def run_layer(stagings: tuple[str, ...] = ("rows", "regs")) -> list[str]:
    """The learned layer's forward and backward on torch CUDA tensors, against autograd
    through the torch reference; the failures, as lines."""
    import torch

    from fastmu.kernels import cuda as kc
    from fastmu.nn import learned_mu_step
    from fastmu.reference import mu_step_torch

    g = torch.Generator().manual_seed(0)
    ins = [torch.rand(B, M, T, generator=g, dtype=torch.float64), torch.rand(B, M, N, generator=g, dtype=torch.float64) + 0.1,
           torch.rand(B, N, T, generator=g, dtype=torch.float64) + 0.1, torch.rand(M, N, generator=g, dtype=torch.float64) + 0.5]
    gA, gS = torch.randn(B, M, N, generator=g, dtype=torch.float64), torch.randn(B, N, T, generator=g, dtype=torch.float64)
    failures = []
    saved = kc.get_config()
    try:
        for staging in stagings:
            kc.set_config(**saved)
            kc.set_staging(staging)
            if staging == "regs":
                kc.set_rows_per_thread(4)  # a partial last warp in both backward passes
            grads = []
            for f in (learned_mu_step, mu_step_torch):
                xs = [v.cuda().requires_grad_(True) for v in ins]
                A1, S1 = f(*xs)
                ((A1 * gA.cuda()).sum() + (S1 * gS.cuda()).sum()).backward()
                grads.append([v.grad.cpu() for v in xs])
            torch.cuda.synchronize()
            err = max(float(((a - b).abs() / (b.abs() + 1e-12)).max()) for a, b in zip(*grads))
            _report(f"layer {staging:4s} forward+backward max rel grad err {err:.2e}", err < 1e-9, failures)
    finally:
        kc.set_config(**saved)
    return failures


def run_loss() -> list[str]:
    """The paper's loss on its CUDA kernels (a shared-memory tree reduction per component)
    against the loss in torch ops, value and gradients, float64."""
    import torch

    from fastmu.losses import unrolled_loss

    g = torch.Generator().manual_seed(3)
    outs = [(torch.rand(B, M, N, generator=g, dtype=torch.float64).cuda(),
             torch.rand(B, N, T, generator=g, dtype=torch.float64).cuda()) for _ in range(3)]
    A_true = torch.rand(B, M, N, generator=g, dtype=torch.float64).cuda()
    S_true = torch.rand(B, N, T, generator=g, dtype=torch.float64).cuda()
    res = []
    for fused in (True, False):
        leaves = [(A.clone().requires_grad_(True), S.clone().requires_grad_(True)) for A, S in outs]
        loss = unrolled_loss(leaves, A_true, S_true, fused=fused)
        loss.backward()
        res.append([loss.detach().reshape(1)] + [x.grad.flatten() for pair in leaves[1:] for x in pair])
    torch.cuda.synchronize()
    err = max(float(((a - b).abs() / (b.abs() + 1e-12)).max()) for a, b in zip(*res))
    failures: list[str] = []
    _report(f"loss forward+backward max rel err {err:.2e}", err < 1e-9, failures)
    return failures


def main() -> int:
    failures = run_mu()
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if gpu:
        failures += run_layer()
        failures += run_loss()
    else:
        print("learned layer and loss skipped: need torch with a CUDA GPU")
    for line in failures:
        print("FAILED:", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
