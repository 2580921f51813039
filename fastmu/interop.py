"""Array interop: recognise the caller's array type and hand results back in it.

fastmu accepts NumPy arrays (and anything ``np.asarray`` takes), torch
tensors (CPU or CUDA) and CuPy arrays. Host data crosses between NumPy and
torch without copies (they share the buffer); device data crosses between
CuPy, torch and Numba CUDA through ``__cuda_array_interface__`` / DLPack,
also without copies. Nothing here imports torch or CuPy unless the caller
already did (we look at ``sys.modules``), so NumPy users never pay for them.
"""
from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np

ArrayKind = Literal["numpy", "torch", "cupy"]


def array_kind(x: Any) -> ArrayKind:
    """Return ``"torch"``, ``"cupy"`` or ``"numpy"`` (the default for anything else)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    return "numpy"


def is_device_array(x: Any) -> bool:
    """True for arrays that live in GPU memory (CuPy arrays, CUDA tensors, Numba device arrays)."""
    kind = array_kind(x)
    if kind == "torch":
        return x.device.type == "cuda"
    if kind == "cupy":
        return True
    return hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray)


def device_of(x: Any) -> str:
    """A short device label for error messages (``"cpu"``, ``"cuda:0"``, ...)."""
    kind = array_kind(x)
    if kind == "torch":
        return str(x.device)
    if kind == "cupy":
        return f"cuda:{x.device.id}"
    return "cuda" if is_device_array(x) else "cpu"


def torch_to_numpy(x: Any) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (detached: the solver is not differentiable)."""
    return x.detach().numpy()


def numpy_to_kind(arr: np.ndarray, kind: ArrayKind, like: Any = None) -> Any:
    """Return host array ``arr`` as ``kind`` (zero-copy for torch CPU)."""
    if kind == "numpy":
        return arr
    if kind == "torch":
        import torch

        out = torch.from_numpy(arr)
        if like is not None and like.device.type != "cpu":
            out = out.to(like.device)
        return out
    import cupy

    return cupy.asarray(arr)


def torch_device(spec: Any) -> Any:
    """A torch device that exists here, or a clear error.

    Parameters
    ----------
    spec : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        Not a device name, or a CUDA device that torch does not see (torch's own
        error there is an ``AssertionError`` from deep inside its CUDA setup).
    """
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {spec!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return dev
