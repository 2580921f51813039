"""The paper's cosine loss term on NVIDIA GPUs (Numba CUDA): forward and handwritten backward.

Same math, arguments and semantics as :mod:`fastmu.kernels.cpu_cosine`;
arrays are C-contiguous torch CUDA tensors (or Numba device arrays), and
``g`` is the loss's upstream gradient as a one-element array, read on the
device (no host synchronisation).

- ``forward``: one block per (problem, component); its threads stride over
  the component's entries, sum ``⟨e, t⟩`` and ``‖e‖²`` in float64 and reduce
  them in shared memory in a fixed tree order (deterministic), then thread 0
  writes the row's statistics.
- ``backward``: one thread per entry of ``E``.

Every barrier is inside a block: the kernels run in Numba's CUDA simulator.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

from numba import cuda, float64

from fastmu.kernels.cuda_launch import Launcher

#: threads per block (a power of two: the tree reduction halves it)
THREADS = 128


@functools.lru_cache(maxsize=None)
def _build(tpb: int) -> tuple[Any, Any]:
    """Compile (lazily, at the first launch) the two kernels for ``tpb`` threads per block."""

    @cuda.jit
    def forward(E, T, cols, tnorm, floor, scale, stats, j):
        q = cuda.blockIdx.x
        tx = cuda.threadIdx.x
        D1 = E.shape[1]
        D2 = E.shape[2]
        K = D2 if cols else D1
        R = D1 if cols else D2
        b = q // K
        k = q % K
        sdot = cuda.shared.array(tpb, float64)
        see = cuda.shared.array(tpb, float64)
        dot = 0.0
        ee = 0.0
        for r in range(tx, R, tpb):
            if cols:
                e = float64(E[b, r, k])
                t = float64(T[b, r, k])
            else:
                e = float64(E[b, k, r])
                t = float64(T[b, k, r])
            dot += e * t
            ee += e * e
        sdot[tx] = dot
        see[tx] = ee
        cuda.syncthreads()
        h = tpb // 2
        while h > 0:
            if tx < h:
                sdot[tx] += sdot[tx + h]
                see[tx] += see[tx + h]
            cuda.syncthreads()
            h //= 2
        if tx == 0:
            ne = math.sqrt(see[0])
            tn = tnorm[b, k]
            # NaN fails both tests and propagates (a NaN estimate must not score 0)
            c = 0.0 if ne < floor or tn < floor else sdot[0] / (ne * tn)
            stats[0, j, b, k] = c
            stats[1, j, b, k] = ne
            stats[2, j, b, k] = c * scale

    @cuda.jit
    def backward(E, T, cols, tnorm, floor, stats, j, g, scale, G):
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        B = E.shape[0]
        D1 = E.shape[1]
        D2 = E.shape[2]
        if i >= B * D1 * D2:
            return
        b = i // (D1 * D2)
        x = (i // D2) % D1
        y = i % D2
        k = y if cols else x
        ne = stats[1, j, b, k]
        tn = tnorm[b, k]
        gs = float64(g[0]) * scale
        v = 0.0  # a component below the floor has cosine 0 and no gradient
        if not (ne < floor or tn < floor):
            v = gs * (float64(T[b, x, y]) / (ne * tn) - stats[0, j, b, k] * float64(E[b, x, y]) / (ne * ne))
        G[b, x, y] = v

    return forward, backward


class CosinePlan:
    """The loss's launch sites on one stream: :meth:`forward` and :meth:`backward` as
    :func:`fastmu.kernels.cpu_cosine.cosine_forward` / ``cosine_backward``, each a
    :class:`~fastmu.kernels.cuda_launch.Launcher` per (factor shape, layout), so the
    layers of a loss only swap pointers and scalars."""

    def __init__(self, stream: Any = 0, threads: int = THREADS) -> None:
        if threads < 1 or threads & (threads - 1) or threads > 1024:
            raise ValueError(f"threads must be a power of two in [1, 1024], got {threads}")
        self.stream, self.threads = stream, int(threads)
        self._sites: dict[tuple, Launcher] = {}
        self._in_session = False

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """One loop over the layers, no foreign code inside: see
        :meth:`~fastmu.kernels.cuda_launch.Launcher.session`."""
        self._in_session = True
        for site in self._sites.values():
            site.session()
        try:
            yield
        finally:
            self._in_session = False
            for site in self._sites.values():
                site.end_session()

    def _site(self, which: int, E: Any, cols: bool) -> Launcher:
        key = (which, tuple(E.shape), bool(cols))
        site = self._sites.get(key)
        if site is None:
            B, D1, D2 = E.shape
            tpb = self.threads
            kernel = _build(tpb)[which]
            grid = B * (D2 if cols else D1) if which == 0 else (B * D1 * D2 + tpb - 1) // tpb
            site = self._sites[key] = Launcher(kernel, grid, tpb, self.stream, 0)
            if self._in_session:
                site.session()
        return site

    def forward(self, E, T, cols: bool, tnorm, floor: float, scale: float, stats, j: int) -> None:
        self._site(0, E, cols)(E, T, bool(cols), tnorm, float(floor), float(scale), stats, int(j))

    def backward(self, E, T, cols: bool, tnorm, floor: float, stats, j: int, g, scale: float, G) -> None:
        self._site(1, E, cols)(E, T, bool(cols), tnorm, float(floor), stats, int(j), g, float(scale), G)


__all__ = ["THREADS", "CosinePlan"]
