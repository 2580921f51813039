"""The fast kernel launch packs parameters exactly as Numba's own launch does.

No GPU needed: Numba's ``_Kernel._prepare_args`` (the code every Numba launch
runs) is called on the same arguments, with its device-array wrapping
replaced by a view carrying the tensor's pointer, shape and strides, and its
parameter list is compared with :func:`fastmu.kernels.cuda_launch.pack`.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the real Numba CUDA target's launch code, not the simulator's", allow_module_level=True)

torch = pytest.importorskip("torch")
disp = pytest.importorskip("numba.cuda.dispatcher")
devarr = pytest.importorskip("numba.cuda.cudadrv.devicearray")

from numba import types  # noqa: E402

from fastmu.kernels import cuda_launch as cl  # noqa: E402


class _Wrapped:
    """What ``wrap_arg(x).to_device(...)`` hands to ``_prepare_args``: a strided view of x."""

    def __init__(self, x):
        self.x = x

    def to_device(self, retr, stream=0):
        x = self.x
        isz = x.element_size()
        layout = devarr._StridedLayoutShim(
            strides_in_bytes=None if x.is_contiguous() else tuple(s * isz for s in x.stride()),
            is_contiguous_c=x.is_contiguous(), is_contiguous_f=False, is_contiguous_any=x.is_contiguous(),
        )
        return devarr._StridedMemoryViewShim(
            ptr=x.data_ptr() if x.numel() else 0, shape=tuple(x.shape), dtype=np.dtype(str(x.dtype)[6:]),
            size=x.numel(), _layout=layout,
        )


def _numba_params(monkeypatch, args):
    monkeypatch.setattr(disp, "wrap_arg", lambda v: _Wrapped(v))

    class _Self:
        extensions = []

    out: list = []
    for a in args:
        disp._Kernel._prepare_args(_Self(), cl.arg_type(a), a, 0, [], out)
    return out


def _norm(params):
    return [(type(p).__name__, p.value) if isinstance(p, ctypes._SimpleCData) else (type(p).__name__, p)
            for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_matches_numba_prepare_args(monkeypatch, dtype):
    args = (
        torch.rand(3, 5, 7, dtype=dtype),
        torch.rand(2, 4, dtype=dtype),
        torch.empty(0, 5, 4, dtype=dtype),  # a zero-size array (null pointer)
        torch.rand(1, 5, 1, dtype=dtype),  # size-1 dimensions
        np.float32(0.5) if dtype == torch.float32 else np.float64(0.5),
        True,
        False,
        7,
    )
    argtypes = tuple(cl.arg_type(a) for a in args)
    assert argtypes[0] == types.Array(types.float32 if dtype == torch.float32 else types.float64, 3, "C")
    assert argtypes[4:] == ((types.float32 if dtype == torch.float32 else types.float64),
                            types.boolean, types.boolean, types.int64)
    assert _norm(cl.pack(argtypes, args)) == _norm(_numba_params(monkeypatch, args))


def test_arg_types_and_refusals():
    assert cl.np_dtype(torch.ones(2, dtype=torch.float64)) == np.float64
    assert cl.is_c_contiguous(torch.ones(3, 4)) and not cl.is_c_contiguous(torch.ones(3, 4).T)
    with pytest.raises(ValueError, match="C-contiguous"):
        cl.arg_type(torch.ones(3, 4).T)
    with pytest.raises(TypeError, match="cannot pass"):
        cl.arg_type("a string")


def test_fast_path_only_for_the_checked_numba_cuda(monkeypatch):
    monkeypatch.setattr(cl, "_numba_cuda_version", lambda: cl.ABI_VERSION)
    assert cl.fast_launch_available()
    monkeypatch.setenv("FASTMU_CUDA_FAST_LAUNCH", "0")
    assert not cl.fast_launch_available()
    monkeypatch.delenv("FASTMU_CUDA_FAST_LAUNCH")
    monkeypatch.setattr(cl, "_numba_cuda_version", lambda: (0, 31))
    assert not cl.fast_launch_available()


def test_stream_handles():
    class _S:
        def __init__(self, h):
            self.handle = h

    assert cl.stream_handle(0) == 0 and cl.stream_handle(None) == 0 and cl.stream_handle(1234) == 1234
    assert cl.stream_handle(_S(77)) == 77
    assert cl.stream_handle(_S(ctypes.c_void_p(88))) == 88
    assert cl.stream_handle(_S(ctypes.c_void_p(None))) == 0


@pytest.fixture
def fake_driver(monkeypatch):
    """The fast path with the device stubbed: a dispatcher whose ``compile`` records the
    argument types, and a driver launch that records ``(stream, config, function, params)``;
    returns ``(dispatcher, compiled, launched, loads)``."""
    core = pytest.importorskip("cuda.core")
    compiled: list = []
    launched: list = []
    loads: list = []

    class _Kernel:
        def __init__(self, argtypes):
            self.argument_types = argtypes

    class _Dispatcher:
        def compile(self, argtypes):
            compiled.append(argtypes)
            return _Kernel(argtypes)

    monkeypatch.setattr(cl, "fast_launch_available", lambda: True)
    monkeypatch.setattr(core, "launch", lambda st, cfg, fn, *params: launched.append((st, cfg, fn, params)))
    monkeypatch.setattr(cl._Compiled, "function", lambda self, dev=None: loads.append(dev) or "kernel")
    monkeypatch.setitem(cl._streams, 0, "stream")
    return _Dispatcher(), compiled, launched, loads


def test_launch_compiles_once_per_signature_and_packs(fake_driver):
    """``launch`` types a launch site's arguments once per kind (dtype, rank, scalar type),
    then only packs: the parameters handed to the driver are ``pack``'s."""
    d, compiled, launched, _ = fake_driver
    x, y = torch.rand(2, 3), torch.rand(4, 5)
    cl.launch(d, (2, 1), 32, 0, 0, x, np.float32(1.5), True)
    cl.launch(d, (2, 1), 32, 0, 0, y, np.float32(2.5), False)  # same kinds: no new overload
    assert len(compiled) == 1
    assert (launched[1][0], launched[1][2]) == ("stream", "kernel")
    assert _norm(list(launched[1][3])) == _norm(cl.pack(compiled[0], (y, np.float32(2.5), False)))
    cl.launch(d, 1, 32, 0, 0, x.double(), np.float32(1.5), True)  # another dtype: another overload
    cl.launch(d, 1, 32, 0, 0, x, 1.5, True)  # a Python float is a float64 parameter
    assert len(compiled) == 3
    assert compiled[2][1] == types.float64
    with pytest.raises(ValueError, match="C-contiguous"):
        cl.launch(d, 1, 32, 0, 0, x.T, np.float32(1.5), True)


def test_launcher_resolves_once_and_swaps_pointers(fake_driver):
    """A ``Launcher`` (one launch site in a loop) types and loads once; each later call hands
    the driver exactly ``pack``'s parameters for its own arguments: new data pointers and
    scalars, a full packing when a shape changes, and refusals as ``launch`` gives them."""
    d, compiled, launched, loads = fake_driver
    site = cl.Launcher(d, (3, 2), 64, 0, 128)
    empty = torch.empty(0, 5)
    calls = [
        (torch.rand(2, 3), np.float32(1.5), True, empty, 7),  # resolved, packed
        (torch.rand(2, 3), np.float32(2.5), False, empty, 8),  # packed, kept as the template
        (torch.rand(2, 3), np.float32(3.5), True, empty, 9),  # same shapes: pointers and scalars swapped
        (torch.rand(4, 1), np.float32(0.5), True, torch.rand(2, 5), 10),  # new shapes: packed in full
        (torch.rand(2, 3), np.float32(4.5), False, empty, 11),  # the template again
    ]
    for args in calls:
        site(*args)
    assert len(compiled) == 1 and len(loads) == 1
    for (st, cfg, fn, params), args in zip(launched, calls):
        assert (st, fn) == ("stream", "kernel")
        assert _norm(list(params)) == _norm(cl.pack(compiled[0], args))
    assert len(launched) == len(calls) and all(cfg is launched[0][1] for _, cfg, _, _ in launched)
    with pytest.raises(ValueError, match="C-contiguous"):
        site(torch.rand(3, 2).T, np.float32(1.5), True, empty, 7)
    with pytest.raises(TypeError, match="takes 5 arguments"):
        site(torch.rand(2, 3), np.float32(1.5), True)


def test_launcher_without_the_fast_path_uses_launch(monkeypatch):
    """With the fast path off, torch tensors go through :func:`launch` (which converts them)."""
    seen: list = []
    monkeypatch.setattr(cl, "fast_launch_available", lambda: False)
    monkeypatch.setattr(cl, "launch", lambda *a: seen.append(a))
    site = cl.Launcher("kernel", 4, 32, 0, 0)
    x = torch.rand(2, 2)
    site(x, 1.0)
    assert seen == [("kernel", 4, 32, 0, 0, x, 1.0)]


def test_launcher_session_reuses_pointers_of_the_same_arrays(fake_driver):
    """In a session, an array passed again as the same object keeps its packed pointer and
    the others are swapped in: every call still hands the driver ``pack``'s parameters. Out of
    a session (and after one ends) each array is read again, so a tensor whose storage was
    replaced in between (``.data =``) is launched with its new pointer."""
    d, compiled, launched, _ = fake_driver
    site = cl.Launcher(d, 2, 32, 0, 0)
    x, y = torch.rand(3, 4), torch.rand(2, 5)
    site(x, y, np.float32(1.0))
    site(x, y, np.float32(1.0))  # the template
    site.session()
    calls = [(x, y, np.float32(2.0)), (x, torch.rand(2, 5), np.float32(3.0)), (torch.rand(3, 4), y, np.float32(4.0)),
             (x, y, np.float32(5.0)), (torch.rand(4, 4), y, np.float32(6.0))]  # the last: a new shape
    for args in calls:
        site(*args)
    for (_, _, _, params), args in zip(launched[2:], calls):
        assert _norm(list(params)) == _norm(cl.pack(compiled[0], args))
    site.end_session()
    x.data = torch.rand(3, 4)  # same object, new storage
    site(x, y, np.float32(1.0))
    assert _norm(list(launched[-1][3])) == _norm(cl.pack(compiled[0], (x, y, np.float32(1.0))))
