"""NALMU training-step benchmark: fused kernels vs the same model in plain torch autograd.

One *step* = forward of an ``n_layers`` NALMU on a batch and the backward
from upstream gradients at every layer's ``(A_l, S_l)`` — what the paper's
layer-weighted loss delivers in training — so every layer receives both
``gA'`` and ``gS'``.

``objective="upstream"`` (default, the model alone): fixed random upstream
gradients, ``torch.autograd.backward(outputs, grads)``.
``objective="loss"`` (a whole training step): the paper's loss
(:func:`fastmu.losses.unrolled_loss`) and ``loss.backward()``. ``fused`` and
``chain`` compute it with its fused kernels (one autograd node, a launch per
factor and layer), ``plain`` in torch ops (about 70 ops per layer), as each
kind of user would.

The variants share inputs, parameters and upstream; only the layer implementation differs:

``fused``
    ``NALMU(fused=True)``: the layers as one autograd node on the fused
    kernels (:func:`fastmu.nn.learned_mu_unroll`).
``chain``
    The same kernels as one autograd node *per layer*
    (:func:`fastmu.nn.learned_mu_step_pg` in a loop): what ``fused`` was
    before the stack became one node, kept to measure what that saves.
``plain``
    ``NALMU(fused=False)``: :func:`fastmu.reference.mu_step_torch` with autograd.

Time
    Wall time of a step, after one warm-up step (Numba compile/cache load,
    first touch of memory). Steps of the variants alternate, so both see the
    same machine state; the median over ``repeats`` is the figure, the minimum
    is reported beside it. On CUDA every step ends with a synchronisation.

Peak memory
    CUDA: ``torch.cuda.max_memory_allocated`` during one step, minus the
    memory allocated before it (X, parameters).
    CPU: torch's allocator statistics do not see Numba's scratch arrays and
    ``tracemalloc`` sees neither, so we measure the process's resident set:
    each model runs in a fresh subprocess that builds the inputs, runs a
    warm-up step, resets the kernel's RSS high-water mark
    (``/proc/self/clear_refs`` ← 5), runs one step and reports ``VmHWM``
    minus the ``VmRSS`` just before the step. glibc's malloc is pinned to
    return every block ≥ 64 KiB to the OS on free
    (``MALLOC_MMAP_THRESHOLD_=65536``; its default adaptive threshold would
    keep freed warm-up blocks resident and make the figure depend on
    history). The figure is what the step added on top of its inputs:
    activations saved for backward, gradients and scratch.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

__all__ = ["IMPLS", "run_nalmu_benchmark", "step_peak_rss_bytes"]

#: the layer implementations compared (module docstring)
IMPLS = ("fused", "chain", "plain")


def _problem(batch: int, m: int, t: int, n: int, dtype: str, device: str, seed: int):
    """A random low-rank batch ``X = A* S*`` and its factors (deterministic in ``seed``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    A = torch.rand(batch, m, n, generator=g, dtype=torch.float64)
    A = A / A.norm(dim=1, keepdim=True)
    S = torch.rand(batch, n, t, generator=g, dtype=torch.float64)
    X = A @ S
    return (X.to(device=device, dtype=dt).contiguous(), A.to(device=device, dtype=dt), S.to(device=device, dtype=dt))


def make_step(
    impl: str, batch: int, m: int, t: int, n: int, n_layers: int, dtype: str, device: str, seed: int,
    objective: str = "upstream", graph: bool = False, loss_fused: bool | None = None,
):
    """``(step, model)``: ``step()`` runs one forward + backward of the ``impl`` variant
    (:data:`IMPLS`) and returns a check value (the loss, or Σ|∂/∂θ|) as a float,
    which synchronises the device.

    With ``graph`` (CUDA only) the forward + backward is captured once as a
    CUDA graph (after two warm-up steps on a side stream, as torch's
    whole-network capture recipe does) and ``step()`` replays it: no
    Python, no launch overhead, only device time. ``loss_fused`` (objective
    ``"loss"``): the loss's kernels or its torch ops; default: kernels except
    for ``plain``.
    """
    import torch

    from fastmu.losses import unrolled_loss
    from fastmu.nn import NALMU, constant_init, learned_mu_step_pg

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if loss_fused is None:
        loss_fused = impl != "plain"
    X, A_true, S_true = _problem(batch, m, t, n, dtype, device, seed)
    model = NALMU(n_layers, m, n, fused=impl != "plain", dtype=getattr(torch, dtype), device=device)
    with torch.no_grad():  # a trained-looking W (not all ones), the same for both models
        g = torch.Generator().manual_seed(seed + 1)
        model.theta.copy_(0.1 * torch.randn(model.theta.shape, generator=g, dtype=torch.float64))

    if objective not in ("upstream", "loss"):
        raise ValueError(f"objective must be 'upstream' or 'loss', got {objective!r}")
    g = torch.Generator().manual_seed(seed + 2)
    dt = getattr(torch, dtype)
    v = torch.arange(n_layers, dtype=torch.float64) / max(n_layers - 1, 1)  # the loss's layer weights
    ups = [
        (
            (vl * torch.randn(batch, m, n, generator=g, dtype=torch.float64)).to(device=device, dtype=dt),
            (vl * 1e-3 * torch.randn(batch, n, t, generator=g, dtype=torch.float64)).to(device=device, dtype=dt),
        )
        for vl in v.tolist()
    ]
    # v_1 = 0: the first layer gets no direct upstream, as with the loss
    seeds = [(k, j, up[j]) for k, up in enumerate(ups) if k > 0 for j in (0, 1)]  # (layer, A=0/S=1, grad)

    def chain(X: torch.Tensor) -> list:
        A, S = constant_init(X, n)
        outs, pg = [], None
        for l, W in enumerate(model.weights().unbind(0)):
            A, S, pg = learned_mu_step_pg(X, A, S, W, model.eps, pg, want_pg=l < n_layers - 1)
            outs.append((A, S))
        return outs

    forward = chain if impl == "chain" else (lambda X: model(X, return_all=True))

    def body() -> torch.Tensor:  # no host synchronisation: capturable
        model.zero_grad(set_to_none=True)
        outs = forward(X)
        if objective == "loss":
            loss = unrolled_loss(outs, A_true, S_true, fused=loss_fused)
            loss.backward()
            return loss.detach()
        torch.autograd.backward([outs[k][j] for k, j, _ in seeds], [gr for _, _, gr in seeds])
        return model.theta.grad.abs().sum()

    if not graph:
        return (lambda: float(body())), model
    if not str(device).startswith("cuda"):
        raise ValueError(f"graph=True needs a CUDA device, got {device!r}")
    dev = torch.device(device)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(2):  # kernels compiled and loaded, gradients allocated, before capture
            body()
    torch.cuda.current_stream(dev).wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        check = body()

    def replay() -> float:
        cuda_graph.replay()
        return float(check)

    return replay, model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_peak_rss_bytes(
    impl: str, batch: int, m: int, t: int, n: int, n_layers: int, dtype: str, seed: int, objective: str = "upstream"
) -> int:
    """Peak resident memory one CPU step adds (run this in a fresh process; see the module doc)."""
    step, _ = make_step(impl, batch, m, t, n, n_layers, dtype, "cpu", seed, objective)
    step()  # warm-up: compile / load caches, touch code pages
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _proc_status("VmRSS")
    step()
    return _proc_status("VmHWM") - before


def _cpu_peak_in_subprocess(impl: str, **kw: Any) -> int | None:
    code = (
        "import json, sys;"
        "from fastmu.benchmarks.nalmu import step_peak_rss_bytes;"
        "print(json.dumps(step_peak_rss_bytes(**json.loads(sys.argv[1]))))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    args = json.dumps(dict(impl=impl, **kw))
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, args], env=env, capture_output=True, text=True, check=True, timeout=1800
        )
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover
        err = getattr(exc, "stderr", "") or str(exc)
        raise RuntimeError(f"memory measurement subprocess failed: {err[-2000:]}") from exc
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def run_nalmu_benchmark(
    batch: int = 25,
    m: int = 65,
    t: int = 4096,
    n_layers: int = 50,
    device: str = "cpu",
    *,
    n: int = 4,
    dtype: str = "float32",
    repeats: int = 5,
    measure_memory: bool = True,
    seed: int = 0,
    objective: str = "upstream",
    cuda_graph: bool = False,
    impls: tuple[str, ...] = IMPLS,
) -> dict[str, Any]:
    """Time and peak memory of a NALMU training step, fused vs plain autograd, in one run.

    Parameters
    ----------
    batch, m, t, n_layers, n
        Workload: ``batch`` problems of ``m × t``, rank ``n``, ``n_layers`` layers.
    device : str
        ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:0"``).
    dtype : {"float32", "float64"}
    repeats : int
        Timed steps per model (after one warm-up each).
    measure_memory : bool
        Also measure peak memory (CPU: two extra subprocesses).
    seed : int
    objective : {"upstream", "loss"}
        Model forward+backward from fixed upstream gradients at every layer,
        or a whole training step with the paper's loss (module docstring).
    cuda_graph : bool
        CUDA only: time replays of each model's step captured as a CUDA
        graph (:func:`make_step`), which removes host overhead from both.
        Peak memory is then not measured (a replay allocates nothing; the
        graph's pool is reserved at capture): use an eager run for it.
    impls : tuple of str
        The variants to run (:data:`IMPLS`; ``"fused"`` and ``"plain"`` always run).

    Returns
    -------
    dict
        ``workload`` (the parameters), one entry per variant (``time_s``
        median, ``time_min_s``, ``times_s``, ``peak_bytes``, ``check``),
        ``speedup`` (plain/fused median time), ``speedup_min`` (ratio of the
        fastest steps), ``memory_ratio`` (fused/plain peak), with ``chain``
        also ``speedup_chain`` (plain/chain) and ``unroll_gain``
        (chain/fused), ``memory_method``, ``device_name``.
    """
    import torch

    from fastmu.training import torch_device

    torch_device(device)
    kw = dict(batch=batch, m=m, t=t, n=n, n_layers=n_layers, dtype=dtype, seed=seed, objective=objective)
    if cuda_graph:
        if not device.startswith("cuda"):
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device!r}")
        measure_memory = False
    names = [v for v in IMPLS if v in set(impls) | {"fused", "plain"}]
    steps = {}
    losses = {}
    for name in names:
        step, _ = make_step(name, device=device, graph=cuda_graph, **kw)
        losses[name] = step()  # warm-up
        _sync(device)
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)

    peaks: dict[str, int | None] = {name: None for name in names}
    method = None
    if measure_memory:
        if device.startswith("cuda"):
            method = "torch.cuda.max_memory_allocated during one step minus allocated before it"
            for name in names:
                steps[name]()  # make sure grads exist, so both start from the same state
                _sync(device)
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                steps[name]()
                _sync(device)
                peaks[name] = int(torch.cuda.max_memory_allocated() - base)
        else:
            method = (
                "fresh subprocess per model: VmHWM after one step (reset via /proc/self/clear_refs) "
                "minus VmRSS before it, glibc MALLOC_MMAP_THRESHOLD_=65536"
            )
            del steps
            for name in names:
                peaks[name] = _cpu_peak_in_subprocess(name, **kw)

    kernel_config = None
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(device))
        from fastmu.kernels import cuda as kcuda

        kernel_config = kcuda.get_config()  # the staging decides the backward's layout too
    else:
        try:
            from fastmu.benchmarks.machine import cpu_model

            device_name = cpu_model()
        except ImportError:  # pragma: no cover
            device_name = "cpu"
    res: dict[str, Any] = {
        "benchmark": "nalmu_train_step",
        "workload": dict(kw, device=device, repeats=repeats, cuda_graph=cuda_graph, impls=names),
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "memory_method": method,
        "cuda_kernel_config": kernel_config,
    }
    for name in names:
        res[name] = {
            "time_s": statistics.median(times[name]),  # median: co-tenant load on shared machines
            "time_min_s": min(times[name]),
            "times_s": times[name],
            "peak_bytes": peaks[name],
            "check": losses[name],  # loss, or Σ|∂/∂θ| for "upstream": equal for every variant
        }
    res["speedup"] = res["plain"]["time_s"] / res["fused"]["time_s"]
    # ratio of the best steps: the least disturbed by other processes on a shared machine
    res["speedup_min"] = res["plain"]["time_min_s"] / res["fused"]["time_min_s"]
    if peaks["fused"] is not None and peaks["plain"]:
        res["memory_ratio"] = peaks["fused"] / peaks["plain"]
    if "chain" in names:
        res["speedup_chain"] = res["plain"]["time_s"] / res["chain"]["time_s"]
        res["unroll_gain"] = res["chain"]["time_s"] / res["fused"]["time_s"]
    return res


def format_table(res: dict[str, Any]) -> str:
    """The fused-vs-plain result as a short text table."""
    w = res["workload"]
    lines = [
        f"NALMU {w.get('n_layers')} layers, batch {w.get('batch')}, {w.get('m')}x{w.get('t')}, "
        f"{w.get('dtype')}, on {res['device_name']} (median of {w.get('repeats')} steps)",
        f"{'model':<7} {'step (s)':>9} {'best (s)':>9} {'peak MiB':>9}",
    ]
    for name in [v for v in IMPLS if v in res]:
        r = res[name]
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        lines.append(f"{name:<7} {r['time_s']:>9.3f} {r['time_min_s']:>9.3f} {peak:>9}")
    lines.append(f"fused speedup {res['speedup']:.2f}x (best vs best {res['speedup_min']:.2f}x)"
                 + (f", memory ratio {res['memory_ratio']:.2f}" if "memory_ratio" in res else ""))
    if "unroll_gain" in res:
        lines.append(f"chain (one node per layer) speedup {res['speedup_chain']:.2f}x; "
                     f"one node for the stack runs at {res['unroll_gain']:.2f}x the chain's speed "
                     f"({'faster' if res['unroll_gain'] >= 1 else 'slower'})")
    return "\n".join(lines)
