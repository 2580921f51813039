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

``--step`` also times whole NALMU training steps (``--layers`` layers) through
the same stubbed CUDA path (:data:`STEPS`): forward + backward from upstream
gradients at every layer, as ``bench_nalmu.py``, with the stack as one
autograd node (``fused``, what the models run) or one node per layer
(``chain``); and a step with the paper's loss, computed by its CUDA kernels
(``fused_loss``; their launches stubbed too) or in torch ops
(``fused_torch_loss``). Autograd and torch's tensor ops
are then included, on CPU tensors; the figures are host time per step and
the number of torch (aten) ops per step, counted below autograd. A CPU
tensor of several MB costs an mmap to allocate, which a GPU's caching
allocator does not, so the step timing uses ``--step-t`` pixels (default
256): the host work of a CUDA step does not depend on t.

    python bench/layer_host_time.py [--batch 25 --m 65 --t 16384 --n 4] [--step] [--out host.json]
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


#: the steps ``--step`` times: (name, layer implementation, objective, loss on its kernels)
STEPS = (
    ("fused", "fused", "upstream", None),
    ("chain", "chain", "upstream", None),
    ("fused_loss", "fused", "loss", True),
    ("fused_torch_loss", "fused", "loss", False),
)


def measure_step(b: int, m: int, t: int, n: int, layers: int, dtype: str = "float32",
                 repeats: int = 20) -> dict[str, Any]:
    """Median host ms per NALMU training step through the stubbed CUDA path, and aten ops per
    step, for the variants of :data:`STEPS` (:mod:`fastmu.benchmarks.nalmu`): the model from
    fixed upstream gradients (the stack as one node, ``fused``, or one node per layer,
    ``chain``), and a whole step with the paper's loss, computed on its CUDA kernels
    (:mod:`fastmu.kernels.cuda_cosine`, stubbed like the layers') or in torch ops.
    The variants' steps take turns."""
    import contextlib

    _stub_device()
    from fastmu import losses
    from fastmu.benchmarks.nalmu import make_step
    from fastmu.nn import models

    # The stubbed kernels write nothing, so the factors are uninitialised memory, which the
    # model's check of its output would refuse. That check (on a GPU: a few small reads and
    # one synchronisation per forward) is left out of these host times.
    models.check_finite_output = lambda *args: None
    from fastmu.benchmarks.opcount import AtenOpCounter
    from fastmu.kernels.cuda_cosine import CosinePlan
    from fastmu.nn import functional as F

    class _HostCuda(F._CudaLayers):  # CPU tensors stand in for CUDA ones
        def device(self, X):
            return contextlib.nullcontext()

        def stream(self, X):
            return 0


    F._runner = lambda X: _HostCuda()
    losses._cosine_runner = lambda x: CosinePlan(0)
    out: dict[str, Any] = {"shape": {"b": b, "m": m, "t": t, "n": n, "layers": layers, "dtype": dtype},
                           "repeats": repeats}
    steps = {}
    for name, impl, objective, loss_fused in STEPS:
        step, _ = make_step(impl, b, m, t, n, layers, dtype, "cpu", 0, objective=objective, loss_fused=loss_fused)
        step()  # typing, overload lookup, first allocations
        with AtenOpCounter() as count:
            step()
        steps[name] = step
        out[name] = {"impl": impl, "objective": objective, "loss_on_kernels": loss_fused, "aten_ops": count.ops,
                     "aten_ops_per_layer": count.ops / layers}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    for name in steps:
        ms = 1e3 * float(np.median(times[name]))
        out[name].update(median_ms=ms, per_layer_us=1e3 * ms / layers)
    out["chain_over_fused"] = out["chain"]["median_ms"] / out["fused"]["median_ms"]
    out["torch_loss_over_kernel_loss"] = out["fused_torch_loss"]["median_ms"] / out["fused_loss"]["median_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--m", type=int, default=65)
    ap.add_argument("--t", type=int, default=16384)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--step", action="store_true", help="also time whole NALMU steps (see measure_step)")
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--step-t", type=int, default=256, help="pixels per problem for --step (see the docstring)")
    ap.add_argument("--step-repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = measure(args.batch, args.m, args.t, args.n, args.dtype, args.repeats)
    from fastmu.benchmarks.machine import machine_info

    res["machine"] = machine_info()
    for k in ("forward", "backward"):
        print(f"{k:8s} {res[k]['median_us']:7.1f} µs host time per call, {res[k]['launches']} launches "
              f"({sum(res[k]['parameters'])} kernel parameters)")
    if args.step:
        st = res["step"] = measure_step(args.batch, args.m, args.step_t, args.n, args.layers, args.dtype,
                                        args.step_repeats)
        for name, *_ in STEPS:
            r = st[name]
            print(f"step {name:16s} {r['median_ms']:7.2f} ms host time per {args.layers}-layer step "
                  f"({r['per_layer_us']:.0f} µs per layer), {r['aten_ops']} torch ops "
                  f"({r['aten_ops_per_layer']:.1f} per layer)")
        print(f"chain / fused host time: {st['chain_over_fused']:.2f}×; with the loss, torch ops / kernels: "
              f"{st['torch_loss_over_kernel_loss']:.2f}×")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
