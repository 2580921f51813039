"""Where the time of one call goes: host time per operation and, on a GPU, kernel time.

A fused model that is slower than expected on a GPU is either waiting on
its kernels or on the host that launches them. :func:`profile_call` runs a
callable under ``torch.profiler`` (CUPTI records every kernel of the
process, Numba's included) and reduces the trace to the numbers that
decide it: wall time, summed kernel time on the device, kernel count, and
the operations that cost the host most.
"""
from __future__ import annotations

import time
from typing import Any, Callable


def profile_call(fn: Callable[[], Any], device: str = "cpu", rows: int = 25) -> dict[str, Any]:
    """Profile one call of ``fn`` (warm it up first: compilation would dominate).

    Parameters
    ----------
    fn : callable
        The work, e.g. one training step.
    device : str
        ``"cpu"`` or a CUDA device: with CUDA, kernel activity is recorded and
        the device is synchronised before the clock stops.
    rows : int
        Lines of the operator table to keep.

    Returns
    -------
    dict
        ``wall_ms``; ``device_kernel_ms`` and ``device_kernels`` (summed
        duration and number of device kernels, None on the CPU);
        ``device_busy_fraction`` (kernel time over wall time); ``table``
        (the profiler's operator table sorted by host time, as text).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernel_us = 0.0
    kernels = 0
    if cuda:
        for ev in prof.events():
            if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA:
                # `device_time` (torch >= 2.4), `cuda_time` before
                kernel_us += float(getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0))
                kernels += 1
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    out: dict[str, Any] = {
        "wall_ms": 1e3 * wall,
        "device_kernel_ms": kernel_us / 1e3 if cuda else None,
        "device_kernels": kernels if cuda else None,
        "device_busy_fraction": (kernel_us / 1e6) / wall if cuda and wall > 0 else None,
        "table": table,
    }
    return out
