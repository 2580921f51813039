"""Host time of the CUDA learned layer's Python, measured without a GPU.

An eager NALMU step on a GPU is bound by the host (``bench/results/nalmu_cuda_h100.json``:
~1.3 ms of host time per layer against 0.26 ms of kernels). This times the part
of that host time that is fastmu's own Python: ``layer_forward`` and
``layer_backward`` of :mod:`fastmu.kernels.cuda_backward` with the fast launch
(:mod:`fastmu.kernels.cuda_launch`) on CPU tensors, where the three calls that
need a device are stubbed out: compiling a kernel (``dispatcher.compile``),
loading it (``_Compiled.function``) and the driver's launch (``cuda.core.launch``).
Everything else (argument checks, layout choice, scratch allocation, argument
typing and parameter packing) runs as it does on a GPU. It is not the whole
host time of a layer: torch's allocations on a device, autograd and the
driver calls are not in it.

    python bench/layer_host_time.py [--batch 25 --m 65 --t 16384 --n 4] [--out host.json]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch


def _stub_device() -> list[int]:
    """Replace the device-facing calls; return the list that records each launch's parameter count."""
    import cuda.core as core
    from numba.cuda.dispatcher import CUDADispatcher

    from fastmu.kernels import cuda as kc
    from fastmu.kernels import cuda_launch as cl

    launches: list[int] = []

    class _Kernel:
        def __init__(self, argtypes: tuple) -> None:
            self.argument_types = argtypes

    cl.fast_launch_available = lambda: True
    CUDADispatcher.compile = lambda self, argtypes: _Kernel(argtypes)
    cl._Compiled.function = lambda self, dev=None: None
    cl._streams[0] = object()
    core.launch = lambda stream, config, fn, *params: launches.append(len(params))
    kc._multiprocessors = lambda: 132  # the H100's count: the launch shapes of a real run
    return launches


def measure(b: int, m: int, t: int, n: int, dtype: str = "float32", repeats: int = 200) -> dict[str, Any]:
    """Median host µs per ``layer_forward`` and per ``layer_backward`` call (all gradients wanted)."""
    launches = _stub_device()
    from fastmu.kernels import cuda_backward as kb

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=dt)

    X, A, S, W, P, G = r(b, m, t), r(b, m, n), r(b, n, t), r(1, m, n), r(b, m, n), r(b, n, n)
    gAo, gSo = r(b, m, n), r(b, n, t)
    gA, gS, gW, gX = torch.empty_like(A), torch.empty_like(S), torch.empty_like(W), torch.empty(1, 1, 1, dtype=dt)
    Ao, So, Po, Go = torch.empty_like(A), torch.empty_like(S), torch.zeros_like(P), torch.zeros_like(G)

    def alloc(shape: Any, d: Any) -> torch.Tensor:
        return torch.empty(tuple(int(v) for v in shape), dtype=getattr(torch, np.dtype(d).name))

    calls = {
        "forward": lambda: kb.layer_forward(X, A, S, W, P, G, 1e-9, True, True, Ao, So, Po, Go,
                                            stream=0, alloc=alloc, zeroed=True),
        "backward": lambda: kb.layer_backward(X, A, S, W, P, G, gAo, gSo, 1e-9, True, True, True, True, False,
                                              gA, gS, gW, gX, stream=0, alloc=alloc),
    }
    out: dict[str, Any] = {"shape": {"b": b, "m": m, "t": t, "n": n, "dtype": dtype}, "repeats": repeats}
    for name, call in calls.items():
        call()  # first call: typing and overload lookup
        launches.clear()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out[name] = {"median_us": 1e6 * float(np.median(times)), "launches": len(launches) // repeats,
                     "parameters": launches[: len(launches) // repeats]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--m", type=int, default=65)
    ap.add_argument("--t", type=int, default=16384)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = measure(args.batch, args.m, args.t, args.n, args.dtype, args.repeats)
    from fastmu.benchmarks.machine import machine_info

    res["machine"] = machine_info()
    for k in ("forward", "backward"):
        print(f"{k:8s} {res[k]['median_us']:7.1f} µs host time per call, {res[k]['launches']} launches "
              f"({sum(res[k]['parameters'])} kernel parameters)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
