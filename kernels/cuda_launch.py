"""Launch compiled Numba CUDA kernels on torch tensors without Numba's per-call dispatch.

Why: a Numba launch types every argument, wraps every array (a torch tensor
first becomes a Numba device array through ``__cuda_array_interface__``) and
builds the parameter list in Python, tens of µs per array. A learned-MU
layer makes a handful of launches over ~20 arrays per forward + backward, so
that host time exceeded the kernels' time on an H200 (``bench_nalmu``).
This module does the same work once per argument *signature*: the kernel is
compiled through Numba (``dispatcher.compile``, its own cache), and each call
only packs the parameters the way Numba's ``_Kernel._prepare_args`` does
(verified against it in ``tests/test_cuda_launch.py``) and calls
``cuda.core.launch``, as Numba does.

The parameter layout (numba-cuda 0.30) of an array argument is ``meminfo,
parent, nitems, itemsize, data, *shape, *strides`` (strides in bytes, C
strides for contiguous data); ``float32``/``float64`` scalars are C
floats/doubles, ``int64`` a C ``int64_t``, booleans Python bools. The
fast path is used only for the numba-cuda minor version it was checked
against (:data:`ABI_VERSION`), outside the simulator, and unless
``FASTMU_CUDA_FAST_LAUNCH=0``; otherwise :func:`launch` converts tensors
and goes through Numba's usual launch.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import numpy as np

#: numba-cuda (major, minor) whose kernel parameter layout this module reproduces
ABI_VERSION = (0, 30)

_FLOAT_NP = {"float32": np.float32, "float64": np.float64}


@functools.lru_cache(maxsize=1)
def _numba_cuda_version() -> tuple[int, int]:
    try:
        import numba_cuda

        major, minor = numba_cuda.__version__.split(".")[:2]
        return int(major), int(minor)
    except Exception:  # pragma: no cover - a numba without the numba-cuda package
        return (0, 0)


def fast_launch_available() -> bool:
    """Whether :func:`launch` packs parameters itself (see the module docstring)."""
    import numba

    if getattr(numba.config, "ENABLE_CUDASIM", 0) or os.environ.get("FASTMU_CUDA_FAST_LAUNCH", "1") == "0":
        return False
    return _numba_cuda_version() == ABI_VERSION


_torch_types: dict[type, bool] = {}


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    t = type(x)
    r = _torch_types.get(t)
    if r is None:
        r = _torch_types[t] = t.__module__.startswith("torch") and hasattr(t, "data_ptr")
    return r


_np_dtypes: dict[Any, np.dtype] = {}


def np_dtype(x: Any) -> np.dtype:
    """The NumPy dtype of a Numba device array or a torch tensor."""
    dt = x.dtype
    r = _np_dtypes.get(dt)
    if r is None:
        r = _np_dtypes[dt] = np.dtype(str(dt).replace("torch.", "")) if is_torch(x) else np.dtype(dt)
    return r


def is_c_contiguous(x: Any) -> bool:
    """C-contiguity of a Numba device array or a torch tensor."""
    return bool(x.is_contiguous()) if is_torch(x) else bool(x.is_c_contiguous())


def _c_strides(shape: tuple[int, ...], itemsize: int) -> list[int]:
    strides = [0] * len(shape)
    acc = itemsize
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = acc
        acc *= shape[i]
    return strides


_types: dict[tuple, Any] = {}


def arg_type(x: Any) -> Any:
    """The Numba type a kernel argument is compiled for (as Numba's ``typeof`` gives it)."""
    array = is_torch(x) or hasattr(x, "__cuda_array_interface__")
    if array and not is_c_contiguous(x):
        raise ValueError("fast launch needs C-contiguous arrays")
    # building a Numba type costs ~10 µs: memoise by what it depends on
    key = (type(x), x.dtype, len(x.shape)) if array else (type(x),)
    ty = _types.get(key)
    if ty is None:
        ty = _types[key] = _make_type(x, array)
    return ty


def _make_type(x: Any, array: bool) -> Any:
    from numba import types

    if array:
        dt = np_dtype(x)
        return types.Array(types.float32 if dt == np.float32 else types.float64 if dt == np.float64
                           else getattr(types, dt.name), len(x.shape), "C")
    if isinstance(x, (bool, np.bool_)):
        return types.boolean
    if isinstance(x, np.float32):
        return types.float32
    if isinstance(x, (float, np.float64)):
        return types.float64
    if isinstance(x, (int, np.integer)):
        return types.int64
    raise TypeError(f"fast launch cannot pass an argument of type {type(x).__name__}")


_tails: dict[tuple, tuple[int, list[int]]] = {}


def _array_tail(shape: Any, isz: int) -> tuple[int, list[int]]:
    """``(nitems, [*shape, *C strides in bytes])`` of an array, memoised by shape: a layer
    launches the same few shapes over and over."""
    key = (shape, isz)
    tail = _tails.get(key)
    if tail is None:
        dims = tuple(int(v) for v in shape)
        n = 1
        for v in dims:
            n *= v
        if len(_tails) > 4096:
            _tails.clear()
        tail = _tails[key] = (n, [*dims, *_c_strides(dims, isz)])
    return tail


def _plan(argtypes: tuple) -> tuple[str, ...]:
    """One code per parameter: ``"A"`` array, ``"f"`` float32, ``"d"`` float64, ``"q"`` int64,
    ``"b"`` boolean (comparing Numba types per call costs more than the packing itself)."""
    from numba import types

    codes = []
    for ty in argtypes:
        if isinstance(ty, types.Array):
            codes.append("A")
        elif ty == types.float32:
            codes.append("f")
        elif ty == types.float64:
            codes.append("d")
        elif ty == types.int64:
            codes.append("q")
        elif ty == types.boolean:
            codes.append("b")
        else:
            raise TypeError(f"fast launch cannot pass {ty}")
    return tuple(codes)


def _pack(plan: tuple[str, ...], args: tuple) -> list:
    out: list = []
    for code, x in zip(plan, args):
        if code == "A":
            if is_torch(x):
                isz = x.element_size()
                n, tail = _array_tail(x.shape, isz)
                ptr = x.data_ptr() if n else 0
            else:  # a Numba device array (or anything with the CUDA array interface)
                isz = np_dtype(x).itemsize
                n, tail = _array_tail(tuple(x.shape), isz)
                ptr = x.__cuda_array_interface__["data"][0] if n else 0
            out += (0, 0, n, isz, ptr)
            out += tail
        elif code == "b":
            out.append(bool(x))
        elif code == "f":
            out.append(ctypes.c_float(x))
        elif code == "d":
            out.append(ctypes.c_double(x))
        else:
            out.append(ctypes.c_int64(x))
    return out


def pack(argtypes: tuple, args: tuple) -> list:
    """The kernel parameters for ``args`` of ``argtypes``, laid out as Numba lays them out."""
    return _pack(_plan(argtypes), args)


class _Compiled:
    """One compiled overload: its cuda.core kernel per device."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.argtypes = tuple(kernel.argument_types)
        self.plan = _plan(self.argtypes)
        self._fn: dict[int, Any] = {}

    def function(self, dev: int | None = None) -> Any:
        """The kernel on device ``dev`` (default: Numba's current context's), loaded there
        on first use (the caller has made that device current)."""
        if dev is None:
            from numba.cuda.cudadrv import devices

            dev = devices.get_context().device.id
        fn = self._fn.get(dev)
        if fn is None:
            fn = self._fn[dev] = self.kernel._codelibrary.get_cufunc().kernel
        return fn


_compiled: dict[tuple, _Compiled] = {}
_streams: dict[int, Any] = {}
#: (dispatcher, cheap per-argument keys) → its compiled overload: typing the arguments
#: the way Numba does costs µs per argument, and a launch site passes the same kinds
_by_signature: dict[tuple, _Compiled] = {}


def _cheap_key(x: Any) -> Any:
    """What an argument's Numba type depends on, cheaply; raises like :func:`arg_type`."""
    if is_torch(x):
        if not x.is_contiguous():
            raise ValueError("fast launch needs C-contiguous arrays")
        return (x.dtype, x.dim())
    if hasattr(x, "__cuda_array_interface__"):
        return arg_type(x)
    return type(x)


def _dims(d: Any) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(int(v) for v in d) + (1,) * (3 - len(d))  # type: ignore[return-value]


def stream_handle(stream: Any) -> int:
    """The raw handle of a stream given as an int or a Numba stream object."""
    if stream is None or isinstance(stream, int):
        return int(stream or 0)
    h = stream.handle
    if isinstance(h, ctypes.c_void_p):  # older Numba streams
        return int(h.value or 0)
    return int(h)  # a cuda-bindings CUstream (numba-cuda ≥ 0.20) converts with int()


def _overload(dispatcher: Any, args: tuple) -> _Compiled:
    """The compiled overload of ``dispatcher`` for ``args`` (typed once per signature)."""
    sig = (id(dispatcher), *map(_cheap_key, args))
    comp = _by_signature.get(sig)
    if comp is None:
        argtypes = tuple(arg_type(a) for a in args)
        key = (id(dispatcher), argtypes)
        comp = _compiled.get(key)
        if comp is None:
            comp = _compiled[key] = _Compiled(dispatcher.compile(argtypes))
        _by_signature[sig] = comp
    return comp


def _stream(stream: Any) -> Any:
    """A non-owning stream object for a raw handle or a Numba stream, as the driver launch takes it."""
    ptr = stream_handle(stream)
    st = _streams.get(ptr)
    if st is None:
        from numba.cuda.cudadrv.driver import ExperimentalStream

        if len(_streams) > 64:  # non-owning wrappers of raw handles: cheap to rebuild
            _streams.clear()
        st = _streams[ptr] = ExperimentalStream.from_handle(ptr)
    return st


def _numba_launch(dispatcher: Any, grid: Any, block: Any, stream: Any, shared: int, args: tuple) -> None:
    """Numba's own launch, torch tensors converted to Numba views first."""
    from numba import cuda

    conv = [cuda.as_cuda_array(a.detach(), sync=False) if is_torch(a) else a for a in args]
    if isinstance(stream, int):
        stream = cuda.external_stream(stream) if stream else 0
    dispatcher[grid, block, stream, shared](*conv)


def launch(dispatcher: Any, grid: Any, block: Any, stream: Any, shared: int, *args: Any) -> None:
    """``dispatcher[grid, block, stream, shared](*args)``, with torch tensors passed as they are.

    ``stream`` is a raw CUDA stream handle (0: the default stream) or a Numba
    stream. Arrays are C-contiguous Numba device arrays or CUDA tensors on
    the current device.
    """
    if not fast_launch_available():
        _numba_launch(dispatcher, grid, block, stream, shared, args)
        return
    from cuda.core import LaunchConfig
    from cuda.core import launch as core_launch

    comp = _overload(dispatcher, args)
    # the device of the first tensor (made current by the caller), without asking Numba
    dev = next((a.device.index for a in args if is_torch(a)), None)
    config = LaunchConfig(grid=_dims(grid), block=_dims(block), shmem_size=int(shared))
    core_launch(_stream(stream), config, comp.function(dev), *_pack(comp.plan, args))


class Launcher:
    """One launch site whose grid, block, shared memory and stream are fixed: ``site(*args)``.

    For a loop that launches the same kernel many times on arguments of one
    signature (a model's layers): the overload, the loaded function, the
    stream object and the launch configuration are resolved at the first
    call, and the second call's parameter list is kept as a template: a later
    call on arrays of the same shapes only swaps in their data pointers and
    the scalars, and launches (other shapes are packed in full). A site used
    once costs what :func:`launch` costs. Every call must pass the kinds the first one passed
    (same dtypes, ranks and scalar types). Numba device arrays go through
    Numba's launch, as does everything when the fast path is off
    (:func:`fast_launch_available`), through :func:`launch`.
    """

    __slots__ = ("dispatcher", "grid", "block", "stream", "shared", "_fast", "_st", "_config", "_fn", "_plan",
                 "_nargs", "_launch", "_template", "_arrays", "_scalars", "_session", "_prev", "_prev_params")

    def __init__(self, dispatcher: Any, grid: Any, block: Any, stream: Any, shared: int = 0) -> None:
        self.dispatcher, self.grid, self.block, self.stream, self.shared = dispatcher, grid, block, stream, int(shared)
        self._fast: bool | None = None
        self._nargs: int | None = None  # set when resolved
        self._session, self._prev, self._prev_params = False, None, None

    def _resolve(self, args: tuple) -> None:
        from cuda.core import LaunchConfig
        from cuda.core import launch as core_launch

        self._launch = core_launch
        comp = _overload(self.dispatcher, args)
        dev = next((a.device.index for a in args if is_torch(a)), None)
        self._plan, self._nargs = comp.plan, len(args)
        self._st = _stream(self.stream)
        self._config = LaunchConfig(grid=_dims(self.grid), block=_dims(self.block), shmem_size=self.shared)
        self._fn = comp.function(dev)
        self._template = None

    def _index(self, args: tuple, params: list) -> None:
        """Keep ``params`` (packed for ``args``) as the template later calls update in place
        of a full packing: where each argument's parameters sit in the list (an array's
        data pointer is its fifth, after meminfo, parent, nitems, itemsize; a scalar is one)."""
        self._template = params
        arrays, scalars, pos = [], [], 0
        for i, (code, x) in enumerate(zip(self._plan, args)):
            if code == "A":
                if params[pos + 2]:  # an empty array keeps its null pointer
                    arrays.append((i, pos + 4, x.shape))
                else:
                    arrays.append((i, -1, x.shape))
                pos += 5 + 2 * len(x.shape)
            else:
                scalars.append((i, pos, {"b": bool, "f": ctypes.c_float, "d": ctypes.c_double,
                                         "q": ctypes.c_int64}[code]))
                pos += 1
        self._arrays, self._scalars = tuple(arrays), tuple(scalars)

    def _params(self, args: tuple) -> list:
        prev = self._prev
        if prev is None:
            params = self._template.copy()
        else:  # within a session an array object passed again keeps its pointer: skip its checks
            params = self._prev_params.copy()
        for i, slot, shape in self._arrays:
            x = args[i]
            if prev is not None and x is prev[i]:
                continue
            if x.shape != shape:
                return _pack(self._plan, args)  # another shape: the full packing
            if not x.is_contiguous():
                raise ValueError("fast launch needs C-contiguous arrays")
            if slot >= 0:
                params[slot] = x.data_ptr()
        for i, slot, conv in self._scalars:
            params[slot] = conv(args[i])
        if self._session:
            self._prev, self._prev_params = args, params
        return params

    def session(self) -> None:
        """Start a session: until :meth:`end_session`, an array passed at the same position as
        in this site's previous launch, as the same object, is taken to have kept its data
        pointer (its shape, contiguity and pointer are not read again: in a model's layer loop
        X and the scratch arrays are). Only for a span with no foreign code in it (one
        forward or backward of a layer stack): ``set_()``, ``resize_()`` or ``.data =`` on
        such an array inside the span would go unnoticed."""
        self._session, self._prev = True, None

    def end_session(self) -> None:
        """End the session: forget the previous launch's arrays (and drop the references)."""
        self._session, self._prev, self._prev_params = False, None, None

    def __call__(self, *args: Any) -> None:
        if self._fast is None:
            self._fast = is_torch(args[0]) and fast_launch_available()
        if not self._fast:
            if is_torch(args[0]):
                launch(self.dispatcher, self.grid, self.block, self.stream, self.shared, *args)
            else:
                self.dispatcher[self.grid, self.block, self.stream, self.shared](*args)
            return
        if self._nargs is None:
            self._resolve(args)
            params = _pack(self._plan, args)
        elif len(args) != self._nargs:
            raise TypeError(f"this launch site takes {self._nargs} arguments, got {len(args)}")
        elif self._template is None:  # a second call: the site is in a loop, worth a template
            params = _pack(self._plan, args)
            self._index(args, params)
        else:
            params = self._params(args)
        self._launch(self._st, self._config, self._fn, *params)


__all__ = [
    "ABI_VERSION", "Launcher", "arg_type", "fast_launch_available", "is_c_contiguous", "is_torch", "launch",
    "np_dtype", "pack", "stream_handle",
]
