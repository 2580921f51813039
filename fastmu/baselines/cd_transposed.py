"""Coordinate descent on a tall X, run by the fused kernel on its transpose (CPU).

The fused CD kernel (:mod:`fastmu.kernels.cpu_cd`) streams over X's second
axis, pixels, as MU's kernels do; on a tall X (16384 × 65, pixels as rows)
it shares out rows instead, and ran up to 4.4× slower than on its
transpose (README, Architecture). CD is symmetric under transposition,
``Xᵀ ≈ Sᵀ Aᵀ`` (A's sweep on X is S's on Xᵀ: the same rows-independent
sweep, with the same Gram matrix and linear term), except for the order of
the two sweeps: the kernel on Xᵀ sweeps ``Sᵀ`` first. So
:class:`TransposedCD` keeps scikit-learn's sequence ``A₁, S₁, A₂, …`` as
:class:`fastmu.transposed.TransposedCPUEngine` keeps MU's, half an
iteration ahead:

- once, A's sweep alone on X (:func:`fastmu.kernels.cpu_cd_transposed.cd_a_half_step`);
- then the kernel on Xᵀ, whose state after the caller's k-th iteration is
  ``S_{k−1}``, ``A_k`` and the ``Xᵀ A_k``, ``A_kᵀ A_k`` that S's next sweep reads;
- ``S_k`` for the caller from those, by the kernel's own sweep, on a copy
  (:func:`~fastmu.kernels.cpu_cd_transposed.cd_sweep_from_pg`); the kernel's
  next call sweeps the same ``S_k`` itself.

The kernel reports each iteration's two sweeps' violations apart, so each
of the caller's iterations gets its own, A's sweep's plus S's, for
scikit-learn's ``tol`` rule. The iterates are scikit-learn's to rounding;
a run in slices (``tol``, callbacks, progress) is the same run as one call.
"""
from __future__ import annotations

import numpy as np


#: a tall X (``m ≥ TALL_RATIO · t``) runs on its transpose when it has at most
#: :data:`fastmu.transposed.FEW_PIXELS` columns or at least MANY_ROWS rows.
#: ``python bench/bench_tall.py --solver cd`` (2-core Xeon, float32, rank 4;
#: ``bench/results/cd_cpu_tall*.json``) timed CD on Xᵀ faster than on X as
#: given at every shape with 1600 rows or more, up to 2048 columns, by
#: 1.03–4.44× in two runs; with 200–400 columns and at most 1024 rows the two
#: measured 0.74–1.18×, with no consistent winner (README, Architecture).
TALL_RATIO = 2
MANY_ROWS = 1500


def cd_transposes(shape: tuple[int, int, int], dtype: np.dtype) -> bool:
    """Whether coordinate descent on CPU arrays runs an X of ``shape`` (b, m, t) on its transpose.

    For a tall X (:data:`TALL_RATIO`) with few columns
    (:data:`fastmu.transposed.FEW_PIXELS`) or many rows (:data:`MANY_ROWS`),
    whose transposed copy, with the kernel's own copy of it, leaves half the
    available memory free. ``FASTMU_CPU_TRANSPOSE`` switches it as it does
    MU's (:func:`fastmu.transposed.transposes`): ``0`` (off, false, no) keeps
    every X as given, ``1`` (on, true, yes) transposes every X with more rows
    than columns.
    """
    from fastmu.dispatch import _copy_affordable
    from fastmu.transposed import FEW_PIXELS, _switch

    _, m, t = (int(v) for v in shape)
    switch = _switch()
    if switch == "off":
        return False
    if switch == "on":
        tall = m > t
    else:
        tall = m >= TALL_RATIO * t and (t <= FEW_PIXELS or m >= MANY_ROWS)
    return tall and _copy_affordable(2 * m * t * int(shape[0]) * np.dtype(dtype).itemsize)


class KernelCD:
    """The fused CD kernel on X as given: ``run`` its iterations, violations summed.

    ``X (b, m, t)``, ``A (b, m, n)``, ``S (b, n, t)``: C-contiguous NumPy
    arrays of one float dtype; A and S are the kernel's state, updated in place.
    """

    transposed = False

    def __init__(self, X: np.ndarray, A: np.ndarray, S: np.ndarray, penalty: tuple[float, ...], nthreads: int):
        from fastmu.dispatch import blocked_kernel_x
        from fastmu.kernels import cpu_cd

        self._X = blocked_kernel_x(X, nthreads)
        self.A, self.S = A, S
        b, m, n = A.shape
        self._P, self._G = np.empty((b, m, n), X.dtype), np.empty((b, n, n), X.dtype)
        self._pg_valid = False
        self._pen = penalty
        self._nthreads = nthreads
        #: the kernel's schedule (:func:`fastmu.kernels.cpu.schedule`), for the thread governor
        self.schedule = cpu_cd.schedule(b, m, S.shape[2], X.itemsize, nthreads)

    def run(self, k: int, viol: np.ndarray, order: np.ndarray | None = None) -> None:
        """``k`` iterations; ``viol (k, b)`` receives each one's violation (A's sweep plus S's).
        ``order (k, 2, n)``: each iteration's orders of A's and S's components (None: natural)."""
        from fastmu.kernels import cpu_cd

        halves = np.zeros((k, viol.shape[1], 2))
        cpu_cd.cd_run(self._X, self.A, self.S, self._P, self._G, k, self._pg_valid, halves, self._nthreads,
                      self._pen, order)
        self._pg_valid = True
        viol[...] = halves[:, :, 0] + halves[:, :, 1]

    def sync(self) -> None:
        """Make ``A`` and ``S`` the current factors (they always are here)."""


class TransposedCD:
    """:class:`KernelCD`'s interface for a tall X (:func:`cd_transposes`): the kernel on ``Xᵀ``,
    half an iteration ahead (module docstring). ``A`` and ``S`` are written by :meth:`sync`.
    """

    transposed = True

    def __init__(self, X: np.ndarray, A: np.ndarray, S: np.ndarray, penalty: tuple[float, ...], nthreads: int):
        from fastmu.kernels import cpu_cd

        self.A, self.S = A, S
        self._X = X
        b, m, t = X.shape
        n = A.shape[2]
        self._n = n
        l1a, l2a, l1s, l2s = penalty
        self._a_weights, self._s_weights = (l1a, l2a), (l1s, l2s)
        self._pen = (l1s, l2s, l1a, l2a)  # on Xᵀ the kernel's "A" is Sᵀ
        self._nthreads = nthreads
        self._started = False  # A₁'s half step done, the kernel's state built (the first run)
        self._ahead = False  # the kernel holds A_k and S_{k-1} (else: A₁ and S₀, none run)
        self._stale = False
        self._between = False
        self._last_s_order = np.arange(n, dtype=np.int64)  # the order of the last S sweep (S_k's)
        self.schedule = cpu_cd.schedule(b, t, m, X.itemsize, nthreads)

    def _start(self, a_order: np.ndarray) -> np.ndarray:
        """A₁'s sweep alone on X (components in ``a_order``), and the kernel's state on Xᵀ;
        returns the sweep's violations."""
        from fastmu.dispatch import blocked_kernel_x
        from fastmu.kernels import cpu_cd_transposed

        X, A, S = self._X, self.A, self.S
        b, m, t = X.shape
        n = self._n
        A1 = A.copy()
        first_a = np.zeros(b)
        cpu_cd_transposed.cd_a_half_step(X, A1, S, *self._a_weights, first_a, a_order)
        self._Y = blocked_kernel_x(np.ascontiguousarray(X.transpose(0, 2, 1)), self._nthreads)
        # the kernel's A and S on Xᵀ: Sᵀ (b, t, n) and A₁ᵀ (b, n, m)
        self._ka = np.ascontiguousarray(S.transpose(0, 2, 1))
        self._ks = np.ascontiguousarray(A1.transpose(0, 2, 1))
        self._P, self._G = np.empty((b, t, n), X.dtype), np.empty((b, n, n), X.dtype)
        self._s_now = np.empty_like(self._ka)  # S_k, transposed
        self._started = True
        return first_a

    def run(self, k: int, viol: np.ndarray, order: np.ndarray | None = None) -> None:
        """``k`` of the caller's iterations; ``viol (k, b)`` receives each one's violation.
        ``order (k, 2, n)``: each iteration's orders of A's and S's components (None: natural)."""
        from fastmu.kernels import cpu_cd, cpu_cd_transposed

        b = viol.shape[1]
        if order is None:
            order = cpu_cd.natural_order(k, self._n)
        first_a = None if self._started else self._start(order[0, 0])
        # The kernel's iterations are (S's sweep, the next A's): the first call runs one fewer
        # (A₁ is done), and each later one starts with S_k's sweep, which the copy's of the call
        # before computed with the same order.
        inner = k if self._ahead else k - 1
        k_order = np.empty((inner, 2, self._n), np.int64)
        if inner:
            k_order[:, 0] = (order[:, 1] if not self._ahead else
                             np.concatenate([self._last_s_order[None], order[:-1, 1]]))[:inner]
            k_order[:, 1] = order[1:, 0] if not self._ahead else order[:, 0]
        halves = np.zeros((inner, b, 2))
        self._between = True  # until S_k is swept: the kernel's A is ahead of _s_now
        cpu_cd.cd_run(self._Y, self._ka, self._ks, self._P, self._G, inner, self._ahead, halves, self._nthreads,
                      self._pen, k_order)
        last_s = np.zeros(b)
        cpu_cd_transposed.cd_sweep_from_pg(self._ka, self._P, self._G, *self._s_weights, self._s_now, last_s,
                                           order[-1, 1])
        self._last_s_order = order[-1, 1].copy()
        # the sweeps in the caller's order: A's, S's, A's, ... The kernel's rows are (S's, next A's);
        # after the first call its first S sweep repeats the copy's of the call before.
        seq = halves.transpose(0, 2, 1).reshape(2 * inner, b)
        head = seq[1:] if self._ahead else np.concatenate([first_a[None], seq])
        seq = np.concatenate([head, last_s[None]])
        viol[...] = seq[0::2] + seq[1::2]
        self._ahead = True
        self._stale = True
        self._between = False

    def sync(self) -> None:
        """Write the current factors ``A_k``, ``S_k`` into ``A`` and ``S`` (after a call that was
        interrupted between its two kernels, Ctrl-C, they keep the last pair written)."""
        if self._stale and not self._between:
            self.A[...] = self._ks.transpose(0, 2, 1)
            self.S[...] = self._s_now.transpose(0, 2, 1)
            self._stale = False


def new_cd_run(X: np.ndarray, A: np.ndarray, S: np.ndarray, penalty: tuple[float, ...],
               nthreads: int) -> KernelCD | TransposedCD:
    """The kernel run for this state: on ``Xᵀ`` for a tall X (:func:`cd_transposes`), else on X."""
    cls = TransposedCD if cd_transposes(X.shape, X.dtype) else KernelCD
    return cls(X, A, S, penalty, nthreads)
