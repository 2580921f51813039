"""MU on a tall X, run by the CPU kernels on its transpose.

fastmu's CPU kernels stream over X's second axis (pixels). A tall X (many
rows, few columns: 16384 × 65, pixels as rows) gives them few pixels to
stream over; on its transpose the same iterations ran 1.7–3.5× faster
(:data:`FEW_PIXELS`). MU is symmetric under transposition,
``Xᵀ ≈ Sᵀ Aᵀ``, except for the order of the two updates: the kernels on
``Xᵀ`` update ``Sᵀ`` first. So :class:`TransposedCPUEngine` keeps MU's
sequence ``A₁, S₁, A₂, …`` by running the kernels half an iteration ahead:

- once, before the first iteration, A's update alone on X
  (:func:`fastmu.kernels.cpu_transposed.a_half_step`);
- then the kernels on Xᵀ, whose state after the k-th call is ``S_{k−1}``,
  ``A_k`` and the ``Xᵀ A_k``, ``A_kᵀ A_k`` that S's next update reads;
- ``S_k`` for the caller (factors, objective) from those, by the kernels'
  own update (:func:`~fastmu.kernels.cpu_transposed.a_update_from_pg`), on
  a copy; the next call's first iteration computes the same ``S_k`` itself.

The iterates are MU's, the objective is measured at ``(A_k, S_k)``, and a
run in slices is the same as one run (the kernels' state does not depend on
where the caller stops). A new call from the returned factors is not the
same to the bit: its first A update is the half step's, which sums
``X Sᵀ`` in another order than the kernels, so the two sequences differ
by rounding; on X as given such a restart repeats the sequence exactly.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from fastmu import fork_safety
from fastmu.penalty import NONE, Penalty

#: a tall X (``m ≥ TALL_RATIO · t``) runs on its transpose when it has at most
#: FEW_PIXELS columns, or at most WIDE_PIXELS and at least MANY_ROWS and
#: WIDE_RATIO · t rows. ``python bench/bench_tall.py`` (2-core Xeon, float32,
#: rank 4; ``bench/results/mu_cpu_tall*.json``, two runs) timed MU on Xᵀ at
#: 1.7–3.5× the speed of X as given with 65–120 columns in both runs, and at
#: 1.3–2.4× with 256–768 columns and 4096–16384 rows; between those, runs
#: disagreed (0.80× and 1.46× at 2000 × 500), and 1024 columns measured
#: 0.79–1.49× on one problem, 0.73–0.92× on two (README, Architecture).
TALL_RATIO = 2
FEW_PIXELS = 128
WIDE_PIXELS = 768
MANY_ROWS = 2000
WIDE_RATIO = 4
_OFF = ("0", "off", "false", "no")
_ON = ("1", "on", "true", "yes")


def transposes(shape: tuple[int, int, int], learned: bool = False) -> bool:
    """Whether the CPU engine runs an X of ``shape`` (b, m, t) on its transpose.

    For a tall X with few columns (:data:`TALL_RATIO`, :data:`FEW_PIXELS`,
    :data:`WIDE_PIXELS`, :data:`MANY_ROWS`, :data:`WIDE_RATIO`) of plain or penalised MU; not for
    learned W (the learned layers weight A's update, which on Xᵀ is not the
    one the kernels weight). ``FASTMU_CPU_TRANSPOSE=0`` (or off, false, no)
    turns it off and ``=1`` (on, true, yes) on for every X with more rows
    than columns; other values warn and mean the default, ``auto`` (read on
    every call, for A/B runs). The memory check is :func:`fastmu.dispatch.cpu_transposes`'.
    """
    _, m, t = (int(v) for v in shape)
    flag = os.environ.get("FASTMU_CPU_TRANSPOSE", "auto").strip().lower()
    if flag in _OFF:
        return False
    if learned:
        return False
    if flag in _ON:
        return m > t
    if flag not in ("", "auto"):
        warnings.warn(f"FASTMU_CPU_TRANSPOSE={os.environ['FASTMU_CPU_TRANSPOSE']!r} is not one of 0/1, "
                      "off/on, false/true, no/yes or auto: using auto", RuntimeWarning, stacklevel=2)
    return m >= TALL_RATIO * t and (
        t <= FEW_PIXELS or (t <= WIDE_PIXELS and m >= max(MANY_ROWS, WIDE_RATIO * t)))


class TransposedCPUEngine:
    """The ``cpu`` engine for a tall X (:func:`transposes`): the fused kernels on ``Xᵀ``.

    The engine interface of :mod:`fastmu.dispatch`; ``X (b, m, t)``, ``A``,
    ``S`` C-contiguous NumPy arrays, A and S owned (they hold the factors
    :meth:`factors` returns).
    """

    name = "cpu"
    native = "numpy"
    transposed = True

    def __init__(self, X: np.ndarray, A: np.ndarray, S: np.ndarray, eps: float, penalty: Penalty | None = None):
        from fastmu.dispatch import CPUEngine
        from fastmu.kernels import cpu, cpu_transposed

        self._ops = cpu_transposed
        self.X, self.A, self.S = X, A, S
        self.eps = float(eps)
        self._penalty = cpu.penalty_tuple(penalty)
        pen = penalty if penalty is not None else NONE
        # A₁ now: the transposed kernels' first iteration is an S update
        A1 = np.empty_like(A)
        with fork_safety.cpu_kernels():
            self._ops.a_half_step(X, A, S, self.eps, self._penalty, A1)
        Y = np.ascontiguousarray(X.transpose(0, 2, 1))
        self._inner = CPUEngine(
            Y, np.ascontiguousarray(S.transpose(0, 2, 1)), np.ascontiguousarray(A1.transpose(0, 2, 1)),
            None, eps, pen.transposed() if pen.active else None,
        )
        self._ahead = False  # the kernels hold A_k and S_{k-1} (else: still A₁ and S₀, none run)
        self._s_now: np.ndarray | None = None  # S_k in the kernels' layout (b, t, nk), once ahead
        self._stale = False  # A, S must be copied out of the kernels' state
        self._start_objective: np.ndarray | None = None

    @property
    def kernel(self) -> str:
        """``"tiled"`` or ``"blocked"``: which CPU kernel runs the iterations (on Xᵀ)."""
        return self._inner.kernel

    @property
    def governor(self) -> Any:
        """The transposed run's :class:`~fastmu.cpu_threads.ThreadGovernor`, or None."""
        return self._inner.governor

    def run(self, n_iter: int) -> None:
        n_iter = int(n_iter)
        if n_iter == 0:
            if not self._ahead:
                self._inner.run(0)  # compiles, and forms Xᵀ A₁, A₁ᵀ A₁ for the first S update
            return
        # A₁ is already done: the first call runs one transposed iteration fewer
        self._inner.run(n_iter if self._ahead else n_iter - 1)
        self._ahead = True
        inner = self._inner
        s_now = np.empty_like(inner._ka)
        with fork_safety.cpu_kernels():
            # S_k from the carried P = Xᵀ A_k, G = A_kᵀ A_k: S's weights are A's on Xᵀ
            self._ops.a_update_from_pg(inner._ka, inner._kw, inner.P, inner.G, self.eps,
                                       inner._penalty, s_now)
        self._s_now = s_now
        self._stale = True

    def objective(self) -> np.ndarray:
        if self._ahead:
            return self._inner.objective(self._s_now)
        if self._start_objective is None:  # at (A₀, S₀), which the kernels never hold
            from fastmu.kernels import cpu

            parts = np.empty((self.X.shape[0], -(-self.X.shape[2] // cpu.RESIDUAL_TILE)))
            with fork_safety.cpu_kernels():  # a kernel, not NumPy: OpenBLAS's threads would spin on
                cpu.residual_partials(self.X, self.A, self.S, parts)
            self._start_objective = 0.5 * parts.sum(axis=1)
        return self._start_objective.copy()

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        if self._stale:
            n = self.A.shape[2]
            _, At = self._inner.factors()  # (Sᵀ of the iteration before, Aᵀ)
            self.A[...] = At.transpose(0, 2, 1)
            self.S[...] = self._s_now[:, :, :n].transpose(0, 2, 1)
            self._stale = False
        return self.A, self.S

    @staticmethod
    def adopt(x: Any, like: Any | None) -> np.ndarray:
        from fastmu.dispatch import CPUEngine

        return CPUEngine.adopt(x, like)

    @staticmethod
    def release(x: np.ndarray, kind: str, like: Any) -> Any:
        from fastmu.dispatch import CPUEngine

        return CPUEngine.release(x, kind, like)


def cuda_transposes(shape: tuple[int, int, int], n: int, dtype: Any, learned: bool = False) -> bool:
    """Whether the CUDA engine runs an X of ``shape`` (b, m, t) on its transpose: only where
    X as given does not fit the kernels' shared memory (too many rows) and ``Xᵀ`` does.

    The kernels have not been timed on a tall X that fits, so this turns an
    error into a run and claims no speed. ``FASTMU_CPU_TRANSPOSE``'s off
    values turn it off here too.
    """
    from fastmu.kernels import cuda as kc

    _, m, t = (int(v) for v in shape)
    flag = os.environ.get("FASTMU_CPU_TRANSPOSE", "auto").strip().lower()
    if learned or flag in _OFF or m <= t or n > kc.MAX_N:
        return False
    try:
        kc.choose_staging(dtype, m, n)
        return False  # X as given fits
    except ValueError:
        pass
    try:
        kc.choose_staging(dtype, t, n)
    except ValueError:
        return False  # neither fits: X as given raises its clear error
    return True


class TransposedCUDAEngine:
    """The ``cuda`` engine for a tall X too large for the kernels as given
    (:func:`cuda_transposes`): the fused CUDA kernels on ``Xᵀ``, half an iteration
    ahead, as :class:`TransposedCPUEngine` (the same logic, on device arrays).
    """

    name = "cuda"
    native = "cuda"
    transposed = True

    def __init__(self, X: Any, A: Any, S: Any, eps: float, penalty: Penalty | None = None):
        from numba import cuda

        from fastmu.cuda_engine import CUDAEngine, _source, _tag
        from fastmu.kernels import cuda_transposed

        self._ops = cuda_transposed
        self.X, self.A, self.S = X, A, S
        self.eps = float(eps)
        pen = penalty if penalty is not None else NONE
        self._penalty = tuple(float(v) for v in pen)
        b, m, t = X.shape
        n = A.shape[2]
        src = _source(X)
        stream = CUDAEngine._stream_for(src) if src[0] in ("torch", "cupy") else 0
        self._stream = stream

        def empty(shape: tuple[int, ...]) -> Any:
            return _tag(cuda.device_array(shape, X.dtype, stream=stream), *src)

        A1 = empty((b, m, n))
        self._ops.a_half_step(X, A, S, self.eps, self._penalty, A1, stream=stream)
        Y, B, R = empty((b, t, m)), empty((b, t, n)), empty((b, n, m))
        self._ops.transpose(X, Y, stream=stream)
        self._ops.transpose(S, B, stream=stream)
        self._ops.transpose(A1, R, stream=stream)
        self._inner = CUDAEngine(Y, B, R, None, eps, pen.transposed() if pen.active else None)
        self._s_now = empty((b, t, n))
        self._ahead = False
        self._stale = False
        self._start_objective: np.ndarray | None = None

    def run(self, n_iter: int) -> None:
        n_iter = int(n_iter)
        if n_iter == 0:
            if not self._ahead:
                self._inner.run(0)
            return
        self._inner.run(n_iter if self._ahead else n_iter - 1)
        self._ahead = True
        inner = self._inner
        # S's weights are A's on Xᵀ: the inner engine's first two
        self._ops.a_update_from_pg(inner.A, inner.P, inner.G, self.eps, inner.penalty, self._s_now,
                                   stream=self._stream)
        self._stale = True

    def objective(self) -> np.ndarray:
        if self._ahead:
            return self._inner.objective(self._s_now)
        if self._start_objective is None:  # at (A₀, S₀), which the kernels never hold
            from fastmu.kernels import cuda as kc

            r2 = kc.residual_squares(self.X, self.A, self.S, stream=self._stream).copy_to_host(stream=self._stream)
            self._inner._sync()
            self._start_objective = 0.5 * r2
        return self._start_objective.copy()

    def factors(self) -> tuple[Any, Any]:
        if self._stale:
            self._ops.transpose(self._inner.S, self.A, stream=self._stream)  # (b, n, m) -> (b, m, n)
            self._ops.transpose(self._s_now, self.S, stream=self._stream)  # (b, t, n) -> (b, n, t)
            self._stale = False
        return self.A, self.S

    @staticmethod
    def adopt(x: Any, like: Any | None) -> Any:
        from fastmu.cuda_engine import CUDAEngine

        return CUDAEngine.adopt(x, like)

    @staticmethod
    def release(x: Any, kind: str, like: Any) -> Any:
        from fastmu.cuda_engine import CUDAEngine

        return CUDAEngine.release(x, kind, like)

    @staticmethod
    def copy(x: Any) -> Any:
        from fastmu.cuda_engine import CUDAEngine

        return CUDAEngine.copy(x)
