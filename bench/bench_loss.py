"""The paper's loss alone, forward + backward: on its kernels vs in torch ops, side by side.

``L`` layers' outputs ``(A_l, S_l)`` (leaf tensors, as a model's outputs would
arrive), the truth, ``unrolled_loss(...).backward()``; the two ways take turns
step by step after a warm-up, and the median step is the figure. On CUDA each
step ends with a synchronisation; host time and aten-op counts come from one
extra step each.

    python bench/bench_loss.py [--device cpu|cuda] [--layers 50 --batch 25 --m 65 --t 4096 --n 4]
                               [--repeats 9] [--out bench/results/loss_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch


def run(device: str, layers: int, batch: int, m: int, t: int, n: int, dtype: str, repeats: int) -> dict[str, Any]:
    from fastmu.benchmarks.opcount import AtenOpCounter
    from fastmu.losses import unrolled_loss

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    outs = [(torch.rand(batch, m, n, generator=g, dtype=dt).to(device).requires_grad_(True),
             torch.rand(batch, n, t, generator=g, dtype=dt).to(device).requires_grad_(True)) for _ in range(layers)]
    A_true = torch.rand(batch, m, n, generator=g, dtype=dt).to(device)
    S_true = torch.rand(batch, n, t, generator=g, dtype=dt).to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(fused: bool) -> float:
        for A, S in outs:
            A.grad = S.grad = None
        loss = unrolled_loss(outs, A_true, S_true, fused=fused)
        loss.backward()
        return float(loss.detach())


    res: dict[str, Any] = {"workload": {"device": device, "layers": layers, "batch": batch, "m": m, "t": t, "n": n,
                                        "dtype": dtype, "repeats": repeats}}
    variants = {"kernels": True, "torch_ops": False}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, fused in variants.items():
        value = step(fused)  # warm-up: compile, first touch
        sync()
        with AtenOpCounter() as count:
            step(fused)
        res[name] = {"loss": value, "aten_ops": count.ops}
    for _ in range(repeats):
        for name, fused in variants.items():
            sync()
            t0 = time.perf_counter()
            step(fused)
            sync()
            times[name].append(time.perf_counter() - t0)
    for name in variants:
        res[name].update(median_ms=1e3 * statistics.median(times[name]), min_ms=1e3 * min(times[name]),
                         times_ms=[1e3 * x for x in times[name]])
    res["torch_ops_over_kernels"] = res["torch_ops"]["median_ms"] / res["kernels"]["median_ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--m", type=int, default=65)
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = run(a.device, a.layers, a.batch, a.m, a.t, a.n, a.dtype, a.repeats)
    from fastmu.benchmarks.machine import machine_info

    res["machine"] = machine_info()
    if a.device.startswith("cuda"):
        res["device_name"] = torch.cuda.get_device_name()
    w = res["workload"]
    print(f"paper's loss, {w['layers']} layers, batch {w['batch']}, {w['m']}×{w['t']}, n={w['n']}, {w['dtype']}, "
          f"{w['device']}: forward + backward")
    for name in ("kernels", "torch_ops"):
        r = res[name]
        print(f"  {name:9s} {r['median_ms']:8.2f} ms median ({r['min_ms']:.2f} min), {r['aten_ops']} torch ops, "
              f"loss {r['loss']:.6f}")
    print(f"  torch ops / kernels: {res['torch_ops_over_kernels']:.2f}×")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"  written to {a.out}")


if __name__ == "__main__":
    main()
