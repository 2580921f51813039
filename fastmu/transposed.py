"""MU on a tall X, run by the kernels on its transpose (CPU; on CUDA where its rows do not fit).

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
from fastmu.cuda_engine import CUDAEngine
from fastmu.dispatch import CPUEngine
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


def _switch() -> str:
    """``FASTMU_CPU_TRANSPOSE`` read now: ``"off"``, ``"on"`` or ``"auto"`` (unknown values warn)."""
    raw = os.environ.get("FASTMU_CPU_TRANSPOSE", "auto")
    flag = raw.strip().lower()
    if flag in _OFF:
        return "off"
    if flag in _ON:
        return "on"
    if flag not in ("", "auto"):
        warnings.warn(f"FASTMU_CPU_TRANSPOSE={raw!r} is not one of 0/1, off/on, false/true, no/yes or auto: "
                      "using auto", RuntimeWarning, stacklevel=3)
    return "auto"


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
    switch = _switch()
    if switch == "off" or learned:
        return False
    if switch == "on":
        return m > t
    return m >= TALL_RATIO * t and (
        t <= FEW_PIXELS or (t <= WIDE_PIXELS and m >= max(MANY_ROWS, WIDE_RATIO * t)))


def cuda_transposes(shape: tuple[int, int, int], n: int, dtype: Any, learned: bool = False) -> bool:
    """Whether the CUDA engine runs an X of ``shape`` (b, m, t) on its transpose: only where
    X as given does not fit the kernels' shared memory (too many rows) and ``Xᵀ`` does.

    The kernels have not been timed on a tall X that fits, so this turns an
    error into a run and claims no speed. ``FASTMU_CPU_TRANSPOSE``'s off
    values turn it off here too.
    """
    from fastmu.kernels import cuda as kc

    _, m, t = (int(v) for v in shape)
    if learned or m <= t or n > kc.MAX_N or _switch() == "off":
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


class _HalfAhead:
    """The logic both transposed engines share: an engine on ``Xᵀ`` (``self._inner``) half an
    iteration ahead of the caller's MU sequence (module docstring).

    A subclass builds ``self._inner`` from ``A₁`` (after the half step), sets
    ``self._s_now`` (S_k in the inner engine's A layout) and provides
    ``_next_s`` (S_k from the inner engine's carried P, G), ``_start_objective_value``
    (the objective at the start, which the inner engine never holds) and
    ``_copy_out`` (A and S from the inner state into the caller's layout).
    """

    transposed = True
    _base: type  # the engine class whose adopt/release serve this one

    def _init_state(self) -> None:
        self._ahead = False  # the kernels hold A_k and S_{k-1} (else: still A₁ and S₀, none run)
        self._stale = False  # A, S must be copied out of the kernels' state
        self._start_objective: np.ndarray | None = None

    def run(self, n_iter: int) -> None:
        n_iter = int(n_iter)
        if n_iter == 0:
            if not self._ahead:
                self._inner.run(0)  # compiles, and forms Xᵀ A₁, A₁ᵀ A₁ for the first S update
            return
        # A₁ is already done: the first call runs one transposed iteration fewer
        self._inner.run(n_iter if self._ahead else n_iter - 1)
        self._ahead = True
        self._next_s()
        self._stale = True

    def objective(self) -> np.ndarray:
        if self._ahead:
            return self._inner.objective(self._s_now)
        if self._start_objective is None:
            self._start_objective = self._start_objective_value()
        return self._start_objective.copy()

    def factors(self) -> tuple[Any, Any]:
        if self._stale:
            self._copy_out()
            self._stale = False
        return self.A, self.S

    @classmethod
    def adopt(cls, x: Any, like: Any | None) -> Any:
        return cls._base.adopt(x, like)

    @classmethod
    def release(cls, x: Any, kind: str, like: Any) -> Any:
        return cls._base.release(x, kind, like)


class TransposedCPUEngine(_HalfAhead):
    """The ``cpu`` engine for a tall X (:func:`transposes`): the fused kernels on ``Xᵀ``.

    The engine interface of :mod:`fastmu.dispatch`; ``X (b, m, t)``, ``A``,
    ``S`` C-contiguous NumPy arrays, A and S owned (they hold the factors
    :meth:`factors` returns).
    """

    name = "cpu"
    native = "numpy"
    _base = CPUEngine

    def __init__(self, X: np.ndarray, A: np.ndarray, S: np.ndarray, eps: float, penalty: Penalty | None = None):
        from fastmu.kernels import cpu, cpu_transposed

        self._ops = cpu_transposed
        self.X, self.A, self.S = X, A, S
        self.eps = float(eps)
        pen = penalty if penalty is not None else NONE
        # A₁ now: the transposed kernels' first iteration is an S update
        A1 = np.empty_like(A)
        with fork_safety.cpu_kernels():
            self._ops.a_half_step(X, A, S, self.eps, cpu.penalty_tuple(penalty), A1)
        Y = np.ascontiguousarray(X.transpose(0, 2, 1))
        self._inner = CPUEngine(
            Y, np.ascontiguousarray(S.transpose(0, 2, 1)), np.ascontiguousarray(A1.transpose(0, 2, 1)),
            None, eps, pen.transposed() if pen.active else None,
        )
        self._s_now = np.empty_like(self._inner._ka)  # S_k in the kernels' layout (b, t, nk), padded
        self._init_state()

    @property
    def kernel(self) -> str:
        """``"tiled"`` or ``"blocked"``: which CPU kernel runs the iterations (on Xᵀ)."""
        return self._inner.kernel

    @property
    def governor(self) -> Any:
        """The transposed run's :class:`~fastmu.cpu_threads.ThreadGovernor`, or None."""
        return self._inner.governor

    def _next_s(self) -> None:
        inner = self._inner
        with fork_safety.cpu_kernels():
            # S_k from the carried P = Xᵀ A_k, G = A_kᵀ A_k: S's weights are A's on Xᵀ
            self._ops.a_update_from_pg(inner._ka, inner._kw, inner.P, inner.G, self.eps, inner._penalty,
                                       self._s_now)

    def _start_objective_value(self) -> np.ndarray:
        from fastmu.kernels import cpu

        parts = np.empty((self.X.shape[0], -(-self.X.shape[2] // cpu.RESIDUAL_TILE)))
        with fork_safety.cpu_kernels():  # a kernel, not NumPy: OpenBLAS's threads would spin on
            cpu.residual_partials(self.X, self.A, self.S, parts)
        return 0.5 * parts.sum(axis=1)

    def _copy_out(self) -> None:
        n = self.A.shape[2]
        _, At = self._inner.factors()  # (Sᵀ of the iteration before, Aᵀ)
        self.A[...] = At.transpose(0, 2, 1)
        self.S[...] = self._s_now[:, :, :n].transpose(0, 2, 1)


class TransposedCUDAEngine(_HalfAhead):
    """The ``cuda`` engine for a tall X too large for the kernels as given
    (:func:`cuda_transposes`): the fused CUDA kernels on ``Xᵀ``, half an iteration
    ahead, as :class:`TransposedCPUEngine` (the same logic, on device arrays).
    """

    name = "cuda"
    native = "cuda"
    _base = CUDAEngine

    def __init__(self, X: Any, A: Any, S: Any, eps: float, penalty: Penalty | None = None):
        from numba import cuda

        from fastmu.cuda_engine import _source, _tag
        from fastmu.kernels import cuda_transposed

        self._ops = cuda_transposed
        self.X, self.A, self.S = X, A, S
        self.eps = float(eps)
        pen = penalty if penalty is not None else NONE
        b, m, t = X.shape
        n = A.shape[2]
        src = _source(X)
        stream = CUDAEngine._stream_for(src) if src[0] in ("torch", "cupy") else 0
        self._stream = stream

        def empty(shape: tuple[int, ...]) -> Any:
            return _tag(cuda.device_array(shape, X.dtype, stream=stream), *src)

        A1 = empty((b, m, n))
        self._ops.a_half_step(X, A, S, self.eps, tuple(float(v) for v in pen), A1, stream=stream)
        Y, B, R = empty((b, t, m)), empty((b, t, n)), empty((b, n, m))
        self._ops.transpose(X, Y, stream=stream)
        self._ops.transpose(S, B, stream=stream)
        self._ops.transpose(A1, R, stream=stream)
        self._inner = CUDAEngine(Y, B, R, None, eps, pen.transposed() if pen.active else None)
        self._s_now = empty((b, t, n))
        self._init_state()

    def _next_s(self) -> None:
        inner = self._inner
        # S's weights are A's on Xᵀ: the inner engine's first two
        self._ops.a_update_from_pg(inner.A, inner.P, inner.G, self.eps, inner.penalty, self._s_now,
                                   stream=self._stream)

    def _start_objective_value(self) -> np.ndarray:
        from fastmu.kernels import cuda as kc

        r2 = kc.residual_squares(self.X, self.A, self.S, stream=self._stream).copy_to_host(stream=self._stream)
        self._inner._sync()
        return 0.5 * r2

    def _copy_out(self) -> None:
        self._ops.transpose(self._inner.S, self.A, stream=self._stream)  # (b, n, m) -> (b, m, n)
        self._ops.transpose(self._s_now, self.S, stream=self._stream)  # (b, t, n) -> (b, n, t)

    @staticmethod
    def copy(x: Any) -> Any:
        return CUDAEngine.copy(x)
