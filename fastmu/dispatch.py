"""Backends: one MU logic, thin engines per device.

An *engine* owns the solver state of a batch of problems on one device and
advances it with its fused kernel. The solver (:mod:`fastmu.solver`) drives
any engine the same way::

    eng = Engine(X, A, S, W, eps, penalty)  # native arrays of the backend; A, S are owned
    eng.run(n_iter)                         # n_iter MU iterations, no return to Python between them
    eng.objective()                         # 0.5‖X − AS‖² per problem, float64 NumPy (b,)
    eng.factors()                           # (A, S) native arrays, views of the state

``penalty`` (a :class:`fastmu.penalty.Penalty`, or None for none) adds the L1
and L2 penalties of :mod:`fastmu.penalty` to the updates; ``objective()``
stays the data term ``0.5‖X − AS‖²`` either way.

Engines:

``cpu``
    Numba parallel fused kernels (:mod:`fastmu.kernels.cpu`), NumPy arrays;
    on as many threads as measures fastest (:mod:`fastmu.cpu_threads`). A
    tall X runs on its transpose (:mod:`fastmu.transposed`; :func:`new_engine`
    decides).
``torch``
    The pure-torch reference update, on whatever device the tensors live on.
``cuda``
    Numba CUDA fused kernels (:mod:`fastmu.kernels.cuda`), loaded on demand.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Protocol

import numpy as np

from fastmu import cpu_threads, fork_safety
from fastmu.interop import array_kind, is_device_array, numpy_to_kind, torch_to_numpy
from fastmu.penalty import Penalty


class Engine(Protocol):
    name: str
    #: the array namespace the engine takes and returns: "numpy", "torch" or "cuda"
    native: str

    def __init__(self, X: Any, A: Any, S: Any, W: Any, eps: float, penalty: Penalty | None = None) -> None:
        """``penalty``: the weights ``(l1_A, l2_A, l1_S, l2_S)`` of :mod:`fastmu.penalty`; None: plain MU."""

    def run(self, n_iter: int) -> None: ...

    def objective(self) -> np.ndarray: ...

    def factors(self) -> tuple[Any, Any]: ...

    @staticmethod
    def adopt(x: Any, like: Any | None) -> Any:
        """Caller array (or a host NumPy array) -> native array, zero-copy where possible.

        ``like`` is the native X (``None`` while adopting X itself): adopted
        arrays go to its device.
        """

    @staticmethod
    def release(x: Any, kind: str, like: Any) -> Any:
        """Native array -> the caller's array kind, on the caller's device."""


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _copy_affordable(nbytes: int) -> bool:
    """Whether a private copy of ``nbytes`` leaves at least half the available memory free."""
    avail = _available_memory()
    return avail is None or 2 * nbytes <= avail


def cpu_kernel_for(shape: tuple[int, int, int], n: int, dtype: Any = np.float32, nthreads: int | None = None) -> str:
    """``"tiled"`` or ``"blocked"``: the CPU kernel :func:`fastmu.mu` runs for an X of ``shape`` (b, m, t).

    The tiled kernel serves ranks up to 4 with 512-bit vectors
    (:func:`fastmu.kernels.cpu_tiled.available`), on a copy of X that must leave
    half the available memory free; a tall X with too few pixels to share out
    runs the blocked kernel, which shares out its rows
    (:func:`fastmu.kernels.cpu.row_chunks`). Where MU runs a tall X on its
    transpose (:func:`cpu_transposes`), the kernel is the one for ``Xᵀ``.

    Parameters
    ----------
    shape : (int, int, int)
        X's (b, m, t).
    n : int
        Rank.
    dtype : dtype, default float32
    nthreads : int, optional
        Numba's thread count (default: ``numba.config.NUMBA_NUM_THREADS``).

    Returns
    -------
    str
    """
    b, m, t = (int(v) for v in shape)
    if cpu_transposes(shape, dtype):  # the kernels run Xᵀ
        m, t = t, m
    return _engine_kernel((b, m, t), n, dtype, nthreads)


def _engine_kernel(shape: tuple[int, int, int], n: int, dtype: Any, nthreads: int | None) -> str:
    """:func:`cpu_kernel_for` for the X the kernels read, as given."""
    import numba

    from fastmu.kernels import cpu, cpu_tiled

    b, m, t = (int(v) for v in shape)
    itemsize = np.dtype(dtype).itemsize
    nthreads = numba.config.NUMBA_NUM_THREADS if nthreads is None else nthreads
    if not cpu_tiled.available(n) or cpu.row_chunks(b, m, t, itemsize, nthreads) > 0:
        return "blocked"
    return "tiled" if _copy_affordable(b * m * t * itemsize) else "blocked"


def cpu_transposes(shape: tuple[int, int, int], dtype: Any = np.float32, learned: bool = False) -> bool:
    """Whether :func:`fastmu.mu`'s CPU engine runs an X of ``shape`` (b, m, t) on its transpose.

    A tall X (:func:`fastmu.transposed.transposes`) whose transposed copy, with
    the kernels' own copy of it, leaves half the available memory free.
    """
    from fastmu.transposed import transposes

    nbytes = int(np.prod([int(v) for v in shape])) * np.dtype(dtype).itemsize
    return transposes(shape, learned) and _copy_affordable(2 * nbytes)


def new_engine(engine_cls: type, X: Any, A: Any, S: Any, W: Any, eps: float, penalty: Penalty | None = None) -> Any:
    """An engine of ``engine_cls`` for this state: for the CPU and a tall X, the
    transposed run of :class:`fastmu.transposed.TransposedCPUEngine` (the same
    iterates, the kernels streaming over X's rows); for CUDA, that of
    :class:`~fastmu.transposed.TransposedCUDAEngine` where X as given has too
    many rows for the kernels."""
    if engine_cls is CPUEngine and cpu_transposes(X.shape, X.dtype, learned=W is not None):
        from fastmu.transposed import TransposedCPUEngine

        return TransposedCPUEngine(X, A, S, eps, penalty)
    if getattr(engine_cls, "name", None) == "cuda":
        from fastmu.transposed import TransposedCUDAEngine, cuda_transposes

        if cuda_transposes(X.shape, A.shape[2], X.dtype, learned=W is not None):
            return TransposedCUDAEngine(X, A, S, eps, penalty)
    return engine_cls(X, A, S, W, eps, penalty=penalty)


def blocked_kernel_x(X: np.ndarray, nthreads: int) -> np.ndarray:
    """The array the blocked CPU kernels should read for ``X (b, m, t)``: X itself, or a copy.

    The copy starts on a cache line and, unless the kernels share out X's
    rows (:func:`fastmu.kernels.cpu.row_chunks`), has rows an odd number of
    cache lines long (:func:`fastmu.kernels.cpu_products.row_stride`; the
    padding is zero and never read). It is skipped where X already is so,
    and where it would take more than half the memory still available.
    """
    from fastmu.kernels import cpu, cpu_products, cpu_tiled

    b, m, t = X.shape
    by_rows = cpu.row_chunks(b, m, t, X.itemsize, nthreads) > 0
    stride = t if by_rows else cpu_products.row_stride(t, X.itemsize)
    aligned = X.ctypes.data % cpu_tiled.LINE == 0
    if not X.size or (aligned and stride == t) or not _copy_affordable(X.nbytes):
        return X
    # NumPy starts large arrays 16 bytes past a page, so most vector loads
    # straddle two cache lines: the blocked kernel measured about 1.25x faster
    # on an aligned copy (512- and 256-bit code). Rows a multiple of 4 kB
    # apart share L1 sets, which the explicit AᵀX tile (it walks down the
    # rows) measured 1.4-2.5x slower on.
    Xk = cpu_tiled.aligned_empty((b, m, stride), X.dtype)
    Xk[:, :, :t] = X
    Xk[:, :, t:] = 0
    return Xk


class CPUEngine:
    """Fused Numba CPU kernels; ``X (b, m, t)``, ``A``, ``S`` C-contiguous NumPy arrays."""

    name = "cpu"
    native = "numpy"
    #: whether the kernels run Xᵀ (:class:`fastmu.transposed.TransposedCPUEngine`: True)
    transposed = False

    def __init__(
        self, X: np.ndarray, A: np.ndarray, S: np.ndarray, W: np.ndarray | None, eps: float,
        penalty: Penalty | None = None,
    ):
        import numba

        from fastmu.kernels import cpu, cpu_tiled

        self._nthreads = numba.config.NUMBA_NUM_THREADS
        self._cpu = cpu
        b, m, t = X.shape
        n = A.shape[2]
        self.X, self.A, self.S = X, A, S
        self.W = np.ones((1, m, n), X.dtype) if W is None else np.ascontiguousarray(W, X.dtype)
        self.eps = float(eps)
        #: the penalty as the kernels take it: a plain tuple of four floats (zeros: none)
        self._penalty = cpu.penalty_tuple(penalty)
        self._pg_valid = False
        self._x2: np.ndarray | None = None
        # Rank <= 4 with 512-bit vectors: the tiled kernel, on a tiled copy of X
        # made once here (one extra X in memory); S lives in its padded copy
        # until factors() is asked for. Otherwise the blocked kernel, on X
        # itself when it is cache-line aligned, else on an aligned copy. Both
        # may run at a padded rank (kernels.cpu.padded_rank): the added zero
        # components stay exactly zero and add exact zeros to every sum. The
        # copies of X are skipped where they would take more than half the
        # memory still available: the kernels then run on the caller's X
        # (blocked_kernel_x). A tall X with too few pixels to share out runs
        # the blocked kernel, which shares out its rows instead
        # (kernels.cpu.row_chunks).
        self._tiled = _engine_kernel(X.shape, n, X.dtype, self._nthreads) == "tiled"
        nk = 4 if self._tiled else cpu.padded_rank(n)
        self._ka, self._ks, self._kw = (A, S, self.W) if nk == n else cpu.pad_rank(A, S, self.W, nk)
        with fork_safety.cpu_kernels():  # the tiled copy is a parallel kernel too
            if self._tiled:
                self._k = cpu_tiled
                self._Xt, self._ks = cpu_tiled.make_tiled(X, self._ks)
            else:
                self._k = cpu
                self.X = blocked_kernel_x(X, self._nthreads)
        self._stale = False  # factors() must copy the kernel's A, S out
        self.P = np.empty((b, m, nk), X.dtype)
        self.G = np.empty((b, nk, nk), X.dtype)
        # Schedules that open a parallel region per iteration make the threads
        # wait for each other every iteration: on a busy machine that wait can
        # be a scheduler time slice (fastmu.cpu_threads). The caller's
        # numba.set_num_threads is the most the governor uses.
        if self._tiled:
            which = cpu_tiled.schedule(b, self._Xt.shape[1], self._nthreads)
        else:
            which = cpu.schedule(b, m, t, X.itemsize, self._nthreads)
        #: the :class:`~fastmu.cpu_threads.ThreadGovernor` of the run, or None (one region per run,
        #: one thread, or ``FASTMU_ADAPTIVE_THREADS=0``)
        self.governor = cpu_threads.governor_for(which)
        self._slice = 1  # iterations per call of an ungoverned run (cpu_threads.run_in_slices)

    @property
    def kernel(self) -> str:
        """``"tiled"`` or ``"blocked"``: which CPU kernel runs the iterations."""
        return "tiled" if self._tiled else "blocked"

    def run(self, n_iter: int) -> None:
        with fork_safety.cpu_kernels():  # outside the governor: it must not time a wait for the lock
            if n_iter == 0:
                self._run(0)
            elif self.governor is None:  # slices keep Ctrl-C working in a long run
                self._slice = cpu_threads.run_in_slices(self._run, n_iter, self._slice)
            else:
                self.governor.run(self._run, n_iter)

    def _run(self, n_iter: int) -> None:
        x = self._Xt if self._tiled else self.X
        self._k.mu_run(
            x, self._ka, self._ks, self._kw, self.P, self.G,
            int(n_iter), self.eps, self._pg_valid, True, self._nthreads, self._penalty,
        )
        self._pg_valid = True
        self._stale = self._ks is not self.S or self._ka is not self.A

    def objective(self, A: np.ndarray | None = None) -> np.ndarray:
        """``0.5‖X − A S‖²`` per problem; ``A``: another A in the kernel's layout
        (``(b, m, nk)``, padded as the kernel's) in place of the current one."""
        with fork_safety.cpu_kernels():
            return self._objective(self._ka if A is None else A)

    def _objective(self, ka: np.ndarray) -> np.ndarray:
        if self.X.dtype == np.float32:  # one pass over X: see kernels.cpu.objective_from_pg
            if not self._pg_valid:
                self.run(0)  # (the tiled S is current only once a run has packed it)
            if self._tiled:  # the copy the iterations read: it stays in cache
                parts = np.empty((self._Xt.shape[0], self._k.residual_items(self._Xt)))
                self._k.residual_partials(self._Xt, ka, self._ks, parts)
            else:  # the blocked kernel's X (itself, or its aligned copy)
                parts = np.empty((ka.shape[0], -(-self.S.shape[2] // self._cpu.RESIDUAL_TILE)))
                self._cpu.residual_partials(self.X, ka, self._ks, parts)
            return 0.5 * parts.sum(axis=1)
        if not self._pg_valid:
            self.run(0)
        if self._x2 is None:
            self._x2 = np.einsum("bij,bij->b", self.X, self.X, dtype=np.float64)
        out = np.empty(self.X.shape[0], np.float64)
        self._cpu.objective_from_pg(self._x2, ka, self.P, self.G, out)  # padding adds zeros
        return out

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        if self._stale:
            n = self.A.shape[2]
            if self._ks is not self.S:  # the first n rows (and t columns) of the kernel's S
                with fork_safety.cpu_kernels():
                    self._cpu.copy_rows(self._ks, self.S)
            if self._ka is not self.A:
                self.A[...] = self._ka[:, :, :n]
            self._stale = False
        return self.A, self.S

    @staticmethod
    def adopt(x: Any, like: Any | None) -> np.ndarray:
        if array_kind(x) == "torch":
            if x.device.type != "cpu":
                raise ValueError(
                    f"backend='cpu' needs host arrays, got a tensor on {x.device}; "
                    "use backend='cuda' or 'torch', or move it with .cpu()"
                )
            x = torch_to_numpy(x)
        elif is_device_array(x):
            raise ValueError("backend='cpu' needs host arrays, got a GPU array; use backend='cuda'")
        return np.ascontiguousarray(x)

    @staticmethod
    def release(x: np.ndarray, kind: str, like: Any) -> Any:
        return numpy_to_kind(x, kind, like)  # zero-copy for torch CPU


class TorchEngine:
    """The pure-torch reference update, on the tensors' own device (the fallback)."""

    name = "torch"
    native = "torch"

    def __init__(self, X: Any, A: Any, S: Any, W: Any, eps: float, penalty: Penalty | None = None):
        if X.device.type == "cpu":  # torch's OpenMP hangs where Numba's would be killed
            fork_safety.check_cpu_kernels_usable()
        self.X, self.A, self.S, self.W, self.eps = X, A, S, W, float(eps)
        self.penalty = penalty

    def run(self, n_iter: int) -> None:
        import torch

        from fastmu.reference import mu_step_torch

        with torch.no_grad():
            A, S = self.A, self.S
            for _ in range(int(n_iter)):
                A, S = mu_step_torch(self.X, A, S, self.W, self.eps, penalty=self.penalty)
            self.A, self.S = A, S

    def objective(self) -> np.ndarray:
        import torch

        with torch.no_grad():
            R = self.X.double() - self.A.double() @ self.S.double()
            return (0.5 * (R * R).sum(dim=(-2, -1))).cpu().numpy()

    def factors(self) -> tuple[Any, Any]:
        return self.A, self.S

    @staticmethod
    def adopt(x: Any, like: Any | None) -> Any:
        import torch

        kind = array_kind(x)
        if kind == "cupy":
            x = torch.from_dlpack(x)
        elif kind == "numpy":
            x = np.ascontiguousarray(x)
            # An adopted array is only read (the solvers copy the factors they
            # update), so a read-only one (a memory map, say) is safe to wrap:
            # silence torch's warning about writing through it.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                x = torch.from_numpy(x)
        if like is not None and x.device != like.device:
            x = x.to(like.device)
        return x.contiguous()

    @staticmethod
    def release(x: Any, kind: str, like: Any) -> Any:
        if kind == "torch":
            return x
        if kind == "cupy":
            import cupy

            return cupy.from_dlpack(x)
        return x.cpu().numpy()


_ENGINES: dict[str, str] = {
    "cpu": "fastmu.dispatch:CPUEngine",
    "torch": "fastmu.dispatch:TorchEngine",
    "cuda": "fastmu.cuda_engine:CUDAEngine",
}

BACKENDS = ("auto", *_ENGINES)


def get_engine(name: str) -> type:
    """The engine class for a backend name (importing its module on demand)."""
    try:
        target = _ENGINES[name]
    except KeyError:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}") from None
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise RuntimeError(f"backend {name!r} is not available here: {exc}") from exc


def cuda_available() -> bool:
    """True when Numba can run CUDA kernels here (a GPU, or the CUDA simulator)."""
    try:
        from numba import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reports itself as unavailable
        return False


def available_backends() -> list[str]:
    """The backends that can run on this machine now."""
    out = ["cpu", "torch"]
    if cuda_available():
        out.append("cuda")
    return out
