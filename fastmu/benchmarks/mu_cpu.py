"""CPU throughput of plain MU: fastmu's fused kernels beside NumPy, torch eager and scikit-learn.

Two workloads (float32, rank 4, m = 65):

``paper``
    one 65×16384 problem (the paper's image size), 1000 iterations;
``batched``
    150 problems of 65×1024 (a whole test set of small problems), 1000 iterations.

Peers, all on the same inputs and the same start, all running exactly
``n_iter`` iterations:

``fastmu``       :func:`fastmu.mu` on the fused Numba CPU kernels (the kernel the
                 solver picks: ``tiled`` for ranks ≤ 4 with 512-bit vectors);
``fastmu-blocked`` the same call forced onto the blocked kernel
                 (``FASTMU_CPU_TILED=0``), listed where the tiled one is the default
                 for the workload (where it is not, the two would time the same code);
``fastmu-untransposed`` the same call on X as given (``FASTMU_CPU_TRANSPOSE=0``),
                 listed where fastmu runs the workload on Xᵀ (``tall``:
                 :mod:`fastmu.transposed`);
``numpy``        the plain NumPy loop (:func:`fastmu.reference.mu_numpy`), one problem
                 after another for the batch;
``torch``        torch eager on CPU, batched (``@`` on 3-D tensors is ``bmm``);
``sklearn``      ``NMF(solver="mu", tol=0, init="custom")`` (paper workload; one problem).

Work per iteration and problem: ``4·m·n·t`` FLOP (``X Sᵀ`` and ``Aᵀ X``; the
rest is O(n·t + m·n²)) and, under the one-pass traffic model,
``s·(m·t + 2·n·t)`` bytes (X read once, S read and written once; s = 4 for
float32). On a CPU with X in cache the FLOPs are the bound, so both rates are
reported.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

WORKLOADS: dict[str, dict[str, int]] = {
    "paper": dict(b=1, m=65, n=4, t=16384, n_iter=1000),
    "batched": dict(b=150, m=65, n=4, t=1024, n_iter=1000),
    # the paper's problem transposed (pixels as rows): the kernels run it on Xᵀ (fastmu.transposed)
    "tall": dict(b=1, m=16384, n=4, t=65, n_iter=1000),
}


@dataclass
class Timing:
    workload: str
    peer: str
    seconds: float  # best of the repeats, whole run of n_iter iterations
    ms_per_iter: float
    gflops: float
    gbytes_per_s: float
    speedup_of_fastmu: float  # this peer's time / fastmu's time (>1: fastmu faster)
    repeats: int


def make_problem(b: int, m: int, n: int, t: int, seed: int = 0, dtype: Any = np.float32):
    """A non-negative low-rank-plus-noise batch and a positive start, reproducible by seed."""
    rng = np.random.default_rng(seed)
    A = rng.random((b, m, n))
    S = rng.random((b, n, t)) ** 2
    X = A @ S + 0.01 * rng.random((b, m, t))
    A0 = rng.random((b, m, n)) + 0.1
    S0 = rng.random((b, n, t)) + 0.1
    return X.astype(dtype), A0.astype(dtype), S0.astype(dtype)


def cpu_kernel(n_components: int, shape: tuple[int, int, int] | None = None) -> str:
    """The CPU kernel :func:`fastmu.mu` uses for rank ``n_components`` in this process: for an
    X of ``shape`` (b, m, t) when given (:func:`fastmu.dispatch.cpu_kernel_for`), else for a wide one."""
    if shape is None:
        from fastmu.kernels import cpu_tiled

        return "tiled" if cpu_tiled.available(n_components) else "blocked"
    from fastmu.dispatch import cpu_kernel_for

    return cpu_kernel_for(shape, n_components)


def workload_kernel(name: str) -> str:
    """The CPU kernel :func:`fastmu.mu` runs for workload ``name`` here."""
    w = WORKLOADS[name]
    return cpu_kernel(w["n"], (w["b"], w["m"], w["t"]))


def workload_transposed(name: str) -> bool:
    """Whether :func:`fastmu.mu` runs workload ``name`` on Xᵀ here (:mod:`fastmu.transposed`)."""
    from fastmu.dispatch import cpu_transposes

    w = WORKLOADS[name]
    return cpu_transposes((w["b"], w["m"], w["t"]))


def _with_env(fn: Callable[[], Any], var: str, value: str) -> Callable[[], Any]:
    """``fn`` run with the environment variable ``var`` set to ``value`` (fastmu reads its
    kernel switches on every call)."""
    def run() -> Any:
        old = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[var]
            else:
                os.environ[var] = old

    return run


#: the environment switch of each fastmu variant peer
_VARIANT_ENV = {"fastmu-blocked": ("FASTMU_CPU_TILED", "0"), "fastmu-untransposed": ("FASTMU_CPU_TRANSPOSE", "0")}


def _peers(X: np.ndarray, A0: np.ndarray, S0: np.ndarray, n_iter: int, with_sklearn: bool) -> dict[str, Callable[[], Any]]:
    import fastmu
    from fastmu.reference import mu_numpy

    def fm() -> Any:
        return fastmu.mu(X, A0=A0, S0=S0, n_iter=n_iter, backend="cpu")

    peers: dict[str, Callable[[], Any]] = {"fastmu": fm}
    from fastmu.dispatch import cpu_transposes

    if cpu_kernel(A0.shape[2], X.shape) == "tiled":  # else "fastmu" already is the blocked kernel
        peers["fastmu-blocked"] = _with_env(fm, *_VARIANT_ENV["fastmu-blocked"])
    if cpu_transposes(X.shape, X.dtype):
        peers["fastmu-untransposed"] = _with_env(fm, *_VARIANT_ENV["fastmu-untransposed"])
    peers["numpy"] = lambda: [mu_numpy(X[p], A0[p], S0[p], n_iter) for p in range(X.shape[0])]
    try:
        import torch

        from fastmu.reference import mu_step_torch

        Xt, At, St = (torch.from_numpy(a) for a in (X, A0, S0))

        def torch_eager():
            with torch.no_grad():
                A, S = At, St
                for _ in range(n_iter):
                    A, S = mu_step_torch(Xt, A, S, None)
            return A, S

        peers["torch"] = torch_eager
    except ImportError:
        pass
    if with_sklearn:
        try:
            import warnings

            from sklearn.decomposition import NMF

            def sk():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 never "converges"
                    for p in range(X.shape[0]):
                        m = NMF(A0.shape[2], init="custom", solver="mu", max_iter=n_iter, tol=0)
                        m.fit_transform(X[p], W=A0[p].copy(), H=S0[p].copy())

            peers["sklearn"] = sk
        except ImportError:
            pass
    return peers


def run_workload(name: str, *, n_iter: int | None = None, repeats: int = 3, peers: tuple[str, ...] | None = None,
                 progress: bool = True) -> list[Timing]:
    """Time every peer on workload ``name``; the fastest of ``repeats`` runs counts.

    The peers take turns (one run of each per round), so a drift of the
    machine's speed during the benchmark reaches all of them alike, and each
    run starts after :data:`fastmu.benchmarks.machine.SETTLE_S` seconds of
    rest, so that the previous peer's spinning BLAS or OpenMP threads do not
    share its cores (without the rest, fastmu's runs, which followed
    NumPy's and scikit-learn's, measured up to 1.5x slower on 2 cores).
    """
    spec = dict(WORKLOADS[name])
    if n_iter is not None:
        spec["n_iter"] = n_iter
    b, m, n, t, it = spec["b"], spec["m"], spec["n"], spec["t"], spec["n_iter"]
    X, A0, S0 = make_problem(b, m, n, t)
    fns = _peers(X, A0, S0, it, with_sklearn=(b == 1))
    if b == 1 and "sklearn" not in fns and (peers is None or "sklearn" in peers):
        import warnings

        warnings.warn(f"scikit-learn is not installed: workload {name!r} runs without its sklearn peer "
                      "(pip install scikit-learn)", RuntimeWarning, stacklevel=2)
    if peers is not None:
        fns = {k: v for k, v in fns.items() if k in peers or k == "fastmu"}
    # Warm-up: Numba compilation / cache load, BLAS thread start; a few iterations.
    import fastmu

    fastmu.mu(X, A0=A0, S0=S0, n_iter=2, backend="cpu")
    for variant in ("fastmu-blocked", "fastmu-untransposed"):
        if variant in fns:  # compile / load its kernels outside the timing
            _with_env(lambda: fastmu.mu(X, A0=A0, S0=S0, n_iter=2, backend="cpu"), *_VARIANT_ENV[variant])()
    times: dict[str, list[float]] = {peer: [] for peer in fns}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(fns) * repeats, desc=f"bench {name}", unit="run", leave=False)
    from fastmu.benchmarks.machine import settle

    for _ in range(repeats):
        for peer, fn in fns.items():
            settle()  # the last peer's BLAS/OpenMP threads must not spin into this one's run
            t0 = time.perf_counter()
            fn()
            times[peer].append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
    best = {peer: min(ts) for peer, ts in times.items()}
    if bar is not None:
        bar.close()
    flop = 4.0 * m * n * t * b * it
    nbytes = 4.0 * (m * t + 2 * n * t) * b * it
    return [
        Timing(name, peer, s, 1e3 * s / it, flop / s / 1e9, nbytes / s / 1e9, s / best["fastmu"], repeats)
        for peer, s in best.items()
    ]


def format_table(rows: list[Timing]) -> str:
    head = f"{'workload':<9} {'peer':<14} {'seconds':>9} {'ms/iter':>9} {'GFLOP/s':>8} {'GB/s':>7} {'fastmu speedup':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.workload:<9} {r.peer:<14} {r.seconds:>9.3f} {r.ms_per_iter:>9.3f} {r.gflops:>8.1f} "
            f"{r.gbytes_per_s:>7.1f} {r.speedup_of_fastmu:>14.2f}x"
        )
    return "\n".join(lines)


def as_json(rows: list[Timing]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
