"""The ``cuda`` backend: the fused Numba CUDA kernels behind the solver's engine protocol.

Interop policy:

- **CuPy arrays and torch CUDA tensors** are used in place, without copies:
  Numba views their memory through ``__cuda_array_interface__``
  (:func:`numba.cuda.as_cuda_array`), and results go back the same way
  (``cupy.asarray`` / ``torch.as_tensor`` on a Numba array are views too).
  Only X is ever used in place: the solver copies the starting factors, and
  the factors returned are views of the solver's own state.
- **Non-contiguous** device input (a slice, a transpose) is copied once to a
  C-contiguous array by the caller's own library, on the caller's device and
  stream: the kernels stream X by rows and need unit-stride pixels.
- **Streams**: kernels are queued on the caller's *current* stream, taken
  when the engine is built (``torch.cuda.current_stream(device)`` for torch,
  ``cupy.cuda.get_current_stream()`` for CuPy), so they are ordered after the
  work that produced X and before the work that reads the results; nothing
  synchronises the host except :meth:`CUDAEngine.objective` (which returns
  host numbers) and copies back to host arrays.
- **Host arrays** (NumPy, torch CPU) are copied to the current device and
  the results copied back into the caller's type.
- **Devices**: device arrays must live on Numba's current device (the one
  ``torch.cuda.set_device`` / ``cupy.cuda.Device(i).use()`` /
  ``numba.cuda.select_device`` selected); otherwise a ValueError says so.
- **Dtypes**: device arrays must be float32 or float64 (a TypeError names
  the dtype); host arrays arrive already cast by the solver.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastmu.interop import array_kind

_FLOATS = ("float32", "float64")


def _cuda() -> Any:
    from numba import cuda

    return cuda


def _is_numba_device_array(x: Any) -> bool:
    return _cuda().devicearray.is_cuda_ndarray(x)


def _tag(arr: Any, source: str, device: int | None) -> Any:
    """Remember which library's stream the array belongs to (for :meth:`CUDAEngine._stream`)."""
    try:
        arr._fastmu_source = (source, device)
    except AttributeError:  # pragma: no cover - a Numba array type without a __dict__
        pass
    return arr


def _source(arr: Any) -> tuple[str, int | None]:
    return getattr(arr, "_fastmu_source", ("numba", None))


def _current_device_id() -> int:
    return int(_cuda().get_current_device().id)


def _check_device_dtype(x: Any, kind: str, dev: int) -> None:
    dt = str(x.dtype).replace("torch.", "")
    if dt not in _FLOATS:
        raise TypeError(
            f"backend='cuda' computes in float32 or float64, got a {kind} array of dtype {dt}; "
            "cast it first (e.g. x.float() or x.astype('float32'))"
        )
    cur = _current_device_id()
    if dev != cur:
        raise ValueError(
            f"the {kind} array is on cuda:{dev} but Numba's current device is cuda:{cur}; "
            "select the array's device first (torch.cuda.set_device, cupy.cuda.Device(i).use() "
            "or numba.cuda.select_device)"
        )


class CUDAEngine:
    """Fused Numba CUDA kernels (:mod:`fastmu.kernels.cuda`) on Numba device arrays.

    Parameters
    ----------
    X, A, S
        Numba device arrays from :meth:`adopt`: ``X (b, m, t)``, ``A (b, m, n)``,
        ``S (b, n, t)``, one float dtype. ``A`` and ``S`` are owned and updated
        in place.
    W
        ``None`` (plain MU) or a ``(m, n)`` / ``(bw, m, n)`` array of any kind.
    eps
        ε added to every denominator.
    penalty
        ``None`` (plain MU) or the L1/L2 weights ``(l1_A, l2_A, l1_S, l2_S)``
        of :mod:`fastmu.penalty` (a :class:`~fastmu.penalty.Penalty` or any
        sequence of four non-negative reals), passed to every
        :func:`~fastmu.kernels.cuda.mu_run`. The objective stays the data term
        ``0.5‖X − AS‖²`` (P and G are never shifted by the penalty).
    """

    name = "cuda"
    native = "cuda"

    def __init__(
        self, X: Any, A: Any, S: Any, W: Any, eps: float, penalty: Sequence[float] | None = None,
    ) -> None:
        from fastmu.kernels import cuda as kernels

        cuda = _cuda()
        self._k = kernels
        for nm, arr in (("X", X), ("A", A), ("S", S)):
            if not _is_numba_device_array(arr):
                raise TypeError(f"CUDAEngine needs Numba device arrays (see CUDAEngine.adopt); {nm} is {type(arr).__name__}")
        b, m, _ = X.shape
        n = A.shape[2]
        if n > kernels.MAX_N:
            raise ValueError(
                f"backend='cuda' supports at most {kernels.MAX_N} components, got {n}; "
                "use backend='cpu' or backend='torch'"
            )
        self.X, self.A, self.S = X, A, S
        self._stream_obj = self._make_stream()
        s = self._stream_obj
        if W is None:
            self.W = cuda.to_device(np.ones((1, m, n), X.dtype), stream=s)
        else:
            Wd = self.adopt(W, X)
            if len(Wd.shape) == 2:
                Wd = Wd.reshape((1, *Wd.shape))
            self.W = Wd
        self.eps = float(eps)
        # refuse bad weights now, not at the first run; then keep four Python floats (a plain
        # tuple: all zeros launch the plain kernels, anything else the "_pen" ones)
        kernels.penalty_scalars(X.dtype, self.eps, penalty)
        self.penalty = kernels.NO_PENALTY if penalty is None else tuple(float(v) for v in penalty)
        self.P = cuda.device_array((b, m, n), X.dtype, stream=s)
        self.G = cuda.device_array((b, n, n), X.dtype, stream=s)
        self._pg_valid = False
        self._x2: np.ndarray | None = None
        self._ws = kernels.GridWorkspace()

    # ------------------------------------------------------------------ streams
    def _make_stream(self) -> Any:
        """The caller's current stream on X's device, as a Numba stream (0: the default stream)."""
        cuda = _cuda()
        source, dev = _source(self.X)
        ptr = 0
        if source == "torch":
            import torch

            ptr = int(torch.cuda.current_stream(dev).cuda_stream)
        elif source == "cupy":
            import cupy

            ptr = int(cupy.cuda.get_current_stream().ptr)
        return cuda.external_stream(ptr) if ptr else 0

    def _sync(self) -> None:
        s = self._stream_obj
        if s == 0:
            _cuda().synchronize()
        else:
            s.synchronize()

    # ------------------------------------------------------------------ protocol
    def run(self, n_iter: int) -> None:
        """``n_iter`` iterations queued on the caller's stream (asynchronous)."""
        self._k.mu_run(
            self.X, self.A, self.S, self.W, self.P, self.G, int(n_iter), self.eps,
            self._pg_valid, True, stream=self._stream_obj, workspace=self._ws, penalty=self.penalty,
        )
        self._pg_valid = True

    def objective(self, A: Any = None) -> np.ndarray:
        """``0.5‖X − AS‖²`` per problem (float64 NumPy): in float64 from P and G (no pass
        over X except once for ``‖X‖²``), in float32 from one pass over X (P and G are
        too coarse there: :func:`fastmu.kernels.cuda.residual_squares`). ``A``: another
        A (a device array like the engine's) in place of the current one. Synchronises
        the stream."""
        if not self._pg_valid:
            self.run(0)
        s = self._stream_obj
        A_dev = self.A if A is None else A
        if np.dtype(self.X.dtype) == np.float32:  # one pass over X: see kernels.cuda.residual_squares
            r2 = self._k.residual_squares(self.X, A_dev, self.S, stream=s).copy_to_host(stream=s)
            self._sync()
            return 0.5 * r2
        if self._x2 is None:
            self._x2 = self._k.sum_squares(self.X, stream=s).copy_to_host(stream=s)
        A = A_dev.copy_to_host(stream=s)
        P = self.P.copy_to_host(stream=s)
        G = self.G.copy_to_host(stream=s)
        self._sync()
        return self._k.objective_from_pg(self._x2, A, P, G)

    def factors(self) -> tuple[Any, Any]:
        return self.A, self.S

    # ------------------------------------------------------------------ interop
    @staticmethod
    def adopt(x: Any, like: Any | None) -> Any:
        """Caller array -> Numba device array: zero-copy for CuPy / torch CUDA, a copy for host data.

        Raises
        ------
        TypeError
            A device array whose dtype is not float32/float64.
        ValueError
            A device array on another device than Numba's current one, or than ``like``.
        """
        cuda = _cuda()
        if _is_numba_device_array(x):
            if not x.is_c_contiguous():
                raise ValueError("Numba device arrays given to backend='cuda' must be C-contiguous")
            out = x
        else:
            kind = array_kind(x)
            if kind == "torch" and x.device.type == "cuda":
                dev = x.device.index if x.device.index is not None else _current_device_id()
                _check_device_dtype(x, "torch", dev)
                x = x.detach()
                if not x.is_contiguous():  # one copy on the caller's device and stream
                    x = x.contiguous()
                out = _tag(cuda.as_cuda_array(x, sync=False), "torch", dev)
            elif kind == "cupy":
                import cupy

                dev = int(x.device.id)
                _check_device_dtype(x, "cupy", dev)
                if not x.flags.c_contiguous:
                    x = cupy.ascontiguousarray(x)
                out = _tag(cuda.as_cuda_array(x, sync=False), "cupy", dev)
            else:
                if kind == "torch":  # a CPU tensor
                    x = x.detach().numpy()
                host = np.ascontiguousarray(x)
                if host.dtype.name not in _FLOATS:
                    raise TypeError(f"backend='cuda' computes in float32 or float64, got {host.dtype}")
                src = _source(like) if like is not None else ("numba", None)
                stream = 0
                if src[0] != "numba":  # follow X's stream when X came from torch/CuPy
                    stream = CUDAEngine._stream_for(src)
                out = _tag(cuda.to_device(host, stream=stream), *src)
        if like is not None:
            a, b = _source(out), _source(like)
            if a[1] is not None and b[1] is not None and a[1] != b[1]:
                raise ValueError(f"arrays on different devices: cuda:{a[1]} and cuda:{b[1]}")
            if np.dtype(out.dtype) != np.dtype(like.dtype):
                raise TypeError(f"array of dtype {out.dtype} given with X of dtype {like.dtype}")
        return out

    @staticmethod
    def _stream_for(src: tuple[str, int | None]) -> Any:
        cuda = _cuda()
        if src[0] == "torch":
            import torch

            ptr = int(torch.cuda.current_stream(src[1]).cuda_stream)
        else:
            import cupy

            ptr = int(cupy.cuda.get_current_stream().ptr)
        return cuda.external_stream(ptr) if ptr else 0

    @staticmethod
    def release(x: Any, kind: str, like: Any) -> Any:
        """Numba device array -> the caller's kind: a view for CuPy / torch CUDA, a host copy otherwise."""
        if kind == "cupy":
            import cupy

            return cupy.asarray(x)
        if kind == "torch":
            import torch

            if like is not None and getattr(like, "device", None) is not None and like.device.type == "cuda":
                return torch.as_tensor(x, device=like.device)
            return torch.from_numpy(x.copy_to_host())
        return x.copy_to_host()

    @staticmethod
    def copy(x: Any) -> Any:
        """A new device array with the contents of ``x`` (Numba arrays have no ``.copy()``)."""
        cuda = _cuda()
        out = cuda.device_array(x.shape, x.dtype)
        out.copy_to_device(x)
        return _tag(out, *_source(x))
