"""GPU benchmark workloads for ``fastmu bench --device cuda``.

W1: one 65×16384 problem, rank 4, float32, ``iters`` MU iterations.
W2: ``batch`` such problems at once (the paper's MU baseline on a test set).

Each workload is timed for fastmu's fused kernels (both launch designs, so the
faster one for the shape is visible) beside its peers on the same GPU:
torch eager (batched ``@``/``bmm``), ``torch.compile`` of the same loop (when
it compiles), and a CuPy NumPy-style loop. Timing uses CUDA events after a
warm-up run (which also pays compilation). Throughput is reported under the
one-pass traffic model ``itemsize·(m·t + 2·n·t)`` bytes per iteration and
problem, and as a fraction of the device's measured copy bandwidth (a large
device-to-device copy, bytes read + bytes written).

Usage::

    from fastmu.benchmarks.mu_gpu import run_gpu_benchmarks
    result = run_gpu_benchmarks()            # dict, JSON-serialisable
    # or: python -m fastmu.benchmarks.mu_gpu --quick --out bench/results/gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Callable

import numpy as np

M, N, T = 65, 4, 16384
EPS = 1e-12


def _require_gpu() -> Any:
    import numba
    from numba import cuda

    if getattr(numba.config, "ENABLE_CUDASIM", 0):
        raise RuntimeError("GPU benchmarks cannot run in the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    if not cuda.is_available():
        raise RuntimeError("GPU benchmarks need a CUDA GPU visible to Numba; none is available here")
    return cuda


def _versions(cuda: Any) -> dict[str, Any]:
    import numba

    import fastmu

    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    out: dict[str, Any] = {
        "device": name,
        "compute_capability": list(dev.compute_capability),
        "multiprocessors": int(dev.MULTIPROCESSOR_COUNT),
        "python": platform.python_version(),
        "fastmu": fastmu.__version__,
        "numba": numba.__version__,
    }
    try:
        from numba.cuda.cudadrv.driver import driver

        v = driver.get_version()
        out["driver_cuda_version"] = f"{v[0]}.{v[1]}"
    except Exception as exc:  # pragma: no cover - informational only
        out["driver_cuda_version"] = f"unknown ({exc})"
    try:
        v = cuda.runtime.get_version()
        out["runtime_cuda_version"] = f"{v[0]}.{v[1]}"
    except Exception as exc:  # pragma: no cover
        out["runtime_cuda_version"] = f"unknown ({exc})"
    for mod in ("numba_cuda", "cupy", "torch"):
        try:
            out[mod.replace("_", "-")] = __import__(mod).__version__
        except Exception:
            out[mod.replace("_", "-")] = None
    try:
        import pynvml  # optional: the driver's own version string

        pynvml.nvmlInit()
        out["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        try:
            import cupy

            out["driver"] = str(cupy.cuda.runtime.driverGetVersion())
        except Exception:
            out["driver"] = None
    return out


def _data(b: int, dtype: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host X (b, M, T) = A* S* + noise and a random positive start (A, S)."""
    rng = np.random.default_rng(seed)
    A_true = rng.random((b, M, N), dtype=np.float32)
    S_true = rng.random((b, N, T), dtype=np.float32)
    X = (A_true @ S_true).astype(dtype)
    X += 0.01 * rng.random(X.shape, dtype=np.float32)
    A0 = (0.5 + rng.random((b, M, N), dtype=np.float32)).astype(dtype)
    S0 = (0.5 + rng.random((b, N, T), dtype=np.float32)).astype(dtype)
    return X, A0, S0


def _numba_time(cuda: Any, fn: Callable[[], None]) -> float:
    """Seconds between CUDA events around ``fn`` on the default stream."""
    start, stop = cuda.event(timing=True), cuda.event(timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return cuda.event_elapsed_time(start, stop) / 1e3


def copy_bandwidths(cuda: Any, nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), best of
    ``repeats``, by each way of copying at hand: the driver's memcpy (through Numba), and
    torch's and CuPy's copies where installed. The fraction of copy bandwidth a benchmark
    reports divides by the fastest, so that no slow copy flatters the kernels."""
    n = nbytes // 4
    out: dict[str, float] = {}

    def rate(time_once: Callable[[], float]) -> float:
        return 2 * n * 4 / min(time_once() for _ in range(repeats))

    src = cuda.device_array(n, np.float32)
    dst = cuda.device_array(n, np.float32)
    dst.copy_to_device(src)  # warm-up
    cuda.synchronize()
    out["numba_memcpy"] = rate(lambda: _numba_time(cuda, lambda: dst.copy_to_device(src)))
    del src, dst
    try:
        import torch

        a = torch.rand(n, device="cuda")
        b = torch.empty_like(a)
        b.copy_(a)

        def torch_time() -> float:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            b.copy_(a)
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1e3

        out["torch_copy"] = rate(torch_time)
        del a, b
    except Exception:  # no torch, or no CUDA build of it
        pass
    try:
        import cupy

        a = cupy.random.random(n, dtype=cupy.float32)
        b = cupy.empty_like(a)
        b[...] = a  # an elementwise copy kernel

        def cupy_time() -> float:
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            b[...] = a
            e1.record()
            e1.synchronize()
            return cupy.cuda.get_elapsed_time(e0, e1) / 1e3

        out["cupy_elementwise"] = rate(cupy_time)
        del a, b
    except Exception:
        pass
    return out


def _copy_fields(bws: dict[str, float]) -> dict[str, Any]:
    return {"copy_bandwidth_GBps": max(bws.values()) / 1e9,
            "copy_bandwidth_by_method_GBps": {k: v / 1e9 for k, v in bws.items()}}


def _model_bytes(b: int, iters: int, itemsize: int = 4) -> int:
    return itemsize * (M * T + 2 * N * T) * b * iters


def _entry(seconds: float, b: int, iters: int, copy_bw: float, **extra: Any) -> dict[str, Any]:
    gbs = _model_bytes(b, iters) / seconds / 1e9
    return {
        "seconds": seconds,
        "ms_per_iter": 1e3 * seconds / iters,
        "achieved_GBps_one_pass_model": gbs,
        "fraction_of_copy_bandwidth": gbs * 1e9 / copy_bw,
        **extra,
    }


_KNOBS = ("threads", "unroll", "blocks_per_problem", "occupancy", "staging", "rows_per_thread", "prefetch",
          "pixels_per_lane")


def _apply(kc: Any, config: dict[str, Any] | None) -> dict[str, Any]:
    """Set the kernel knobs in ``config`` (any of :data:`_KNOBS`); return the old ones."""
    unknown = set(config or {}) - set(_KNOBS)
    if unknown:
        raise ValueError(f"unknown kernel knob(s) {sorted(unknown)}; expected some of {_KNOBS}")
    saved = kc.get_config()
    kc.set_config(**(config or {}))
    return saved


def _restore(kc: Any, saved: dict[str, Any]) -> None:
    kc.set_config(**saved)


def _fastmu(
    cuda: Any, X: np.ndarray, A0: np.ndarray, S0: np.ndarray, iters: int, mode: str,
    config: dict[str, Any] | None = None, dX: Any = None,
) -> tuple[float, np.ndarray]:
    from fastmu.kernels import cuda as kc

    saved = _apply(kc, config)
    kc.set_mode(mode)
    try:
        b = X.shape[0]
        dX = cuda.to_device(X) if dX is None else dX
        W = cuda.to_device(np.ones((1, M, N), X.dtype))
        P = cuda.device_array((b, M, N), X.dtype)
        G = cuda.device_array((b, N, N), X.dtype)
        ws = kc.GridWorkspace()

        def run(n: int) -> tuple[Any, Any]:
            dA, dS = cuda.to_device(A0), cuda.to_device(S0)
            cuda.synchronize()
            t = _numba_time(cuda, lambda: kc.mu_run(dX, dA, dS, W, P, G, n, EPS, False, True, 0, ws))
            return t, dS

        run(min(iters, kc._GRAPH_LEN + 8))  # warm-up: compilation and the CUDA graph capture
        t, dS = run(iters)
        return t, dS.copy_to_host()
    finally:
        _restore(kc, saved)


def _torch_loop(X: np.ndarray, A0: np.ndarray, S0: np.ndarray, iters: int, compiled: bool) -> tuple[float, np.ndarray]:
    import torch

    from fastmu.reference import mu_step_torch

    dev = torch.device("cuda")
    Xt, A, S = (torch.as_tensor(a, device=dev) for a in (X, A0, S0))
    step = mu_step_torch
    if compiled:
        step = torch.compile(mu_step_torch, fullgraph=True)

    def run(n: int) -> tuple[float, Any]:
        a, s = A.clone(), S.clone()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        with torch.no_grad():
            for _ in range(n):
                a, s = step(Xt, a, s, None, EPS)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3, s

    run(min(iters, 20))
    t, s = run(iters)
    return t, s.cpu().numpy()


def _cupy_loop(X: np.ndarray, A0: np.ndarray, S0: np.ndarray, iters: int) -> tuple[float, np.ndarray]:
    import cupy as cp

    Xc, A, S = (cp.asarray(a) for a in (X, A0, S0))

    def run(n: int) -> tuple[float, Any]:
        a, s = A.copy(), S.copy()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        cp.cuda.Device().synchronize()
        start.record()
        for _ in range(n):  # the NumPy formula of fastmu.reference.mu_step_numpy
            St = s.transpose(0, 2, 1)
            a = a * (Xc @ St) / (a @ (s @ St) + EPS)
            At = a.transpose(0, 2, 1)
            s = s * (At @ Xc) / ((At @ a) @ s + EPS)
        stop.record()
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / 1e3, s

    run(min(iters, 20))
    t, s = run(iters)
    return t, cp.asnumpy(s)


def _agreement(S: np.ndarray, S_ref: np.ndarray) -> float:
    """Max relative difference of S against fastmu's (a sanity check, float32)."""
    return float(np.max(np.abs(S - S_ref)) / max(float(np.max(np.abs(S_ref))), 1e-30))


def run_gpu_benchmarks(
    iters: int = 10_000,
    batch: int = 150,
    quick: bool = False,
    configs: dict[str, dict[str, Any]] | None = None,
    partial: str | None = None,
    modes: tuple[str, ...] = ("auto",),
    stagings: tuple[str, ...] = ("auto",),
) -> dict[str, Any]:
    """Time W1 and W2 for fastmu and its peers on the current GPU; return a JSON-able dict.

    Parameters
    ----------
    iters : int
        MU iterations per timed run (10 000: the paper's MU baselines).
    batch : int
        Problems in W2 (150: the paper's test set).
    quick : bool
        A smoke run: 200 iterations, batch 8.
    configs : dict, optional
        Kernel knobs per workload for fastmu's entries, e.g.
        ``{"W2": {"threads": 256, "unroll": 8}}`` (default: the module's
        current settings). Recorded in the result.
    partial : str, optional
        A JSON file rewritten after every entry, so that a run cut short
        still leaves what it measured.
    modes : tuple of str
        fastmu's launch designs to time (``"auto"``: the automatic choice
        that ``fastmu.mu`` makes, ``"block"``, ``"grid"``, ``"flat"``).
    stagings : tuple of str
        fastmu's stagings of X to time with each mode (``"auto"``, ``"rows"``,
        ``"tile"``, ``"regs"``; entries ``fastmu_<mode>_<staging>``, and
        ``fastmu_auto`` for both automatic; a staging set in ``configs`` wins).

    Raises
    ------
    RuntimeError
        No CUDA GPU (or the simulator is on).
    """
    cuda = _require_gpu()
    if quick:
        iters, batch = min(iters, 200), min(batch, 8)
    from fastmu.kernels import cuda as kc

    info = _versions(cuda)
    t0 = time.time()
    bws = copy_bandwidths(cuda)
    copy_bw = max(bws.values())
    result: dict[str, Any] = {
        "suite": "gpu",
        **info,
        "kernel_config": kc.get_config(),
        **_copy_fields(bws),
        "traffic_model": "itemsize*(m*t + 2*n*t) bytes per iteration and problem (X read once, S read+written once)",
        "shape": {"m": M, "n": N, "t": T, "dtype": "float32"},
        "iters": iters,
        "workloads": {},
    }
    for wname, b in (("W1", 1), ("W2", batch)):
        X, A0, S0 = _data(b, np.float32, seed=b)
        entries: dict[str, Any] = {}
        wcfg = dict((configs or {}).get(wname, {}))
        # knobs per staging ({"rows": {...}, "regs": {...}}) or one set for all
        by_staging = wcfg if wcfg and set(wcfg) <= {"rows", "tile", "regs"} else None
        cfg = {} if by_staging else wcfg
        saved = _apply(kc, cfg)
        try:
            # what fastmu.mu launches for this shape under these knobs
            _, auto_mode, auto_blocks, _ = kc._kernels_for(b, M, T, N, np.dtype(np.float32))
            lay = kc.launch_layout(np.float32, M, N)
            used = kc.get_config()
            used["staging_used"] = lay.staging
            used["auto_unroll_occupancy"] = list(kc.choose_knobs(b, auto_blocks, lay.staging))
        finally:
            _restore(kc, saved)
        auto = {"mode": auto_mode, "blocks": auto_blocks,
                "blocks_are": "in all" if auto_mode == "flat" else "per problem", "tile_pixels": lay.tile}
        result["workloads"][wname] = {"batch": b, "kernel_config": used, "auto_choice": auto, "results": entries}
        ref_S = None
        for mode, staging in [(md, st) for md in modes for st in ((cfg["staging"],) if "staging" in cfg else stagings)]:
            label = "fastmu_auto" if (mode, staging) == ("auto", "auto") else f"fastmu_{mode}_{staging}"
            knobs = {**(by_staging.get(staging, {}) if by_staging else cfg), "staging": staging}
            if by_staging:
                result["workloads"][wname]["kernel_config"][staging] = knobs
            try:
                secs, S = _fastmu(cuda, X, A0, S0, iters, mode, knobs)
                if ref_S is None:
                    ref_S = S
                entries[label] = _entry(secs, b, iters, copy_bw, max_rel_diff_vs_fastmu=_agreement(S, ref_S))
            except Exception as exc:
                entries[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            _dump(result, partial)
        peers = {
            "torch_eager": lambda: _torch_loop(X, A0, S0, iters, compiled=False),
            "torch_compile": lambda: _torch_loop(X, A0, S0, iters, compiled=True),
            "cupy_loop": lambda: _cupy_loop(X, A0, S0, iters),
        }
        for label, fn in peers.items():
            try:
                secs, S = fn()
                extra = {} if ref_S is None else {"max_rel_diff_vs_fastmu": _agreement(S, ref_S)}
                entries[label] = _entry(secs, b, iters, copy_bw, **extra)
            except Exception as exc:  # a missing library or a failed compile is reported, not fatal
                entries[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            _dump(result, partial)
        ok = {k: v["seconds"] for k, v in entries.items() if "seconds" in v}
        result["workloads"][wname]["fastest"] = min(ok, key=ok.get) if ok else None
        eager = entries.get("torch_eager", {}).get("seconds")
        if eager:
            result["workloads"][wname]["speedup_vs_torch_eager"] = {
                k: eager / v for k, v in ok.items() if k.startswith("fastmu")
            }
        del X, A0, S0
    result["wall_seconds"] = time.time() - t0
    _dump(result, partial)
    return result


def _dump(result: dict[str, Any], path: str | None) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1, default=str)


def sweep_kernel_configs(
    iters: int = 247,
    batches: tuple[int, ...] = (1, 150),
    threads: tuple[int, ...] = (128, 256),
    unrolls: tuple[int, ...] = (1, 8),
    occupancies: tuple[int, ...] = (512,),
    stagings: tuple[str, ...] = ("rows", "tile"),
    bpp_fractions: tuple[int | None, ...] = (1, 4, 16, 0),
    block_mode: bool = True,
    partial: str | None = None,
    rows_per_thread: tuple[int | None, ...] = (None,),
    prefetches: tuple[bool, ...] = (False,),
    flat_mode: bool = False,
    pixels_per_lane: tuple[int, ...] = (1,),
) -> dict[str, Any]:
    """Time fastmu's kernels over launch designs and knobs for W1/W2-shaped problems.

    Every (threads, unroll, occupancy, staging) combination is timed in block mode and in
    grid mode at several blocks per problem: ``tiles // f`` for each ``f`` in
    ``bpp_fractions`` (0 meaning one block per problem, ``None`` the automatic
    count of :func:`fastmu.kernels.cuda.choose_mode`, recorded as
    ``blocks_per_problem: null``).
    ``iters`` = 6 + 2·120 + 1 makes grid mode run whole CUDA graphs. Returns
    the rows (ms/iteration, GB/s under the one-pass model) and the best
    configuration per batch size. A staging that does not fit the shape
    (``"tile"`` with more rows than threads or too little shared memory)
    gives a row with its error. ``"regs"`` staging has its own block shape:
    it is timed once (not per ``threads`` or ``unrolls``) for each of
    ``rows_per_thread``, ``prefetches`` and ``pixels_per_lane``, with blocks
    per problem counted in its tiles (``32·pixels_per_lane`` pixels wide). ``flat_mode`` adds ``"flat"`` mode at its automatic block
    count (one wave, the batch's tiles dealt evenly; ``blocks_per_problem: null``).
    """
    cuda = _require_gpu()
    from fastmu.kernels import cuda as kc

    bws = copy_bandwidths(cuda)
    copy_bw = max(bws.values())
    out: dict[str, Any] = {"suite": "gpu-sweep", **_versions(cuda), **_copy_fields(bws),
                           "iters": iters, "rows": [], "best": {}}
    for b in batches:
        X, A0, S0 = _data(b, np.float32, seed=b)
        dX = cuda.to_device(X)
        runs = [(tpb, ur, occ, st, None, False, 1) for tpb in threads for st in stagings if st != "regs"
                for ur in unrolls for occ in occupancies]
        # "regs" holds rows·(n + 1) values per thread: 2048 threads per SM (32 registers) would spill it
        runs += [(threads[0], 1, occ, "regs", rpt, pf, ppl) for occ in occupancies if occ <= 1024
                 for rpt in rows_per_thread for pf in prefetches for ppl in pixels_per_lane if "regs" in stagings]
        for tpb, ur, occ, st, rpt, pf, ppl in runs:
            tiles = -(-T // (kc.REGS_TILE * ppl if st == "regs" else tpb))
            bpps = sorted({max(1, tiles // f) if f else 1 for f in bpp_fractions if f is not None}, reverse=True)
            if any(f is None for f in bpp_fractions):
                bpps = [None] + bpps
            designs = [("block", None)] * block_mode + [("grid", q) for q in bpps] + [("flat", None)] * flat_mode
            for mode, bpp in designs:
                cfg = {"threads": tpb, "unroll": ur, "blocks_per_problem": bpp, "occupancy": occ, "staging": st,
                       "rows_per_thread": rpt, "prefetch": pf, "pixels_per_lane": ppl}
                row: dict[str, Any] = {"batch": b, "mode": mode, **cfg}
                try:
                    secs, _ = _fastmu(cuda, X, A0, S0, iters, mode, cfg, dX=dX)
                    row.update(_entry(secs, b, iters, copy_bw))
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                out["rows"].append(row)
                _dump(out, partial)
        ok = [r for r in out["rows"] if r["batch"] == b and "ms_per_iter" in r]
        if ok:
            out["best"][str(b)] = min(ok, key=lambda r: r["ms_per_iter"])
            out.setdefault("best_by_staging", {})[str(b)] = {
                st: min((r for r in ok if r["staging"] == st), key=lambda r: r["ms_per_iter"])
                for st in {r["staging"] for r in ok}
            }
        del X, A0, S0, dX
    _dump(out, partial)
    return out


def profile_fastmu(batches: tuple[int, ...] = (1, 150), iters: tuple[int, ...] = (246, 30),
                   table_path: str | None = None, stagings: tuple[str, ...] = ("rows", "regs")) -> dict[str, Any]:
    """Profile fastmu's MU kernels at W1/W2 shapes: summed kernel time against wall time.

    A wall time well above the kernel time means the GPU waits on the host
    (launch overhead); kernel time per iteration well above the traffic
    model's bound means the kernels themselves are slow. Each staging of X
    is profiled in turn. Operator tables go to ``table_path``.
    """
    cuda = _require_gpu()
    from fastmu.benchmarks.profile import profile_call
    from fastmu.kernels import cuda as kc

    out: dict[str, Any] = {"suite": "gpu-profile", **_versions(cuda), "kernel_config": kc.get_config(), "runs": []}
    tables = []
    saved = kc.get_config()
    for (b, it), st in [(bi, st) for bi in zip(batches, iters) for st in stagings]:
        kc.set_staging(st)
        X, A0, S0 = _data(b, np.float32, seed=b)
        dX = cuda.to_device(X)
        W = cuda.to_device(np.ones((1, M, N), X.dtype))
        P = cuda.device_array((b, M, N), X.dtype)
        G = cuda.device_array((b, N, N), X.dtype)
        ws = kc.GridWorkspace()
        dA, dS = cuda.to_device(A0), cuda.to_device(S0)

        def run() -> None:
            kc.mu_run(dX, dA, dS, W, P, G, it, EPS, False, True, 0, ws)

        run()  # warm-up: compilation, graph capture
        cuda.synchronize()
        prof = profile_call(run, "cuda")
        row = {"batch": b, "iters": it, "staging": st, "mode": kc.choose_mode(b, T)[0],
               **{k: v for k, v in prof.items() if k != "table"}}
        row["kernel_ms_per_iter"] = (prof["device_kernel_ms"] or 0.0) / it
        row["wall_ms_per_iter"] = prof["wall_ms"] / it
        out["runs"].append(row)
        tables.append(f"== batch {b}, {it} iterations: {row}\n{prof['table']}")
    kc.set_config(**saved)
    if table_path:
        with open(table_path, "w") as fh:
            fh.write("\n\n".join(tables) + "\n")
    return out


def format_table(result: dict[str, Any]) -> str:
    """The GPU results as a text table: seconds, ms/iteration, GB/s, fraction of copy bandwidth, speed-up."""
    head = (f"{'workload':<8} {'peer':<18} {'seconds':>9} {'ms/iter':>9} {'GB/s':>8} {'of copy bw':>10} "
            f"{'vs torch eager':>14}")
    lines = [f"{result.get('device', '?')}: copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s, "
             f"{result.get('iters')} iterations", head, "-" * len(head)]
    for wname, w in result["workloads"].items():
        eager = w["results"].get("torch_eager", {}).get("seconds")
        for label, e in w["results"].items():
            if "seconds" not in e:
                lines.append(f"{wname:<8} {label:<18} {e.get('error', '')[:60]}")
                continue
            ratio = f"{eager / e['seconds']:>13.2f}x" if eager else f"{'':>14}"
            lines.append(
                f"{wname:<8} {label:<18} {e['seconds']:>9.3f} {e['ms_per_iter']:>9.4f} "
                f"{e['achieved_GBps_one_pass_model']:>8.1f} {e['fraction_of_copy_bandwidth']:>10.2f} {ratio}"
            )
    return "\n".join(lines)


def best_configs(paths: list[str]) -> dict[str, Any]:
    """Kernel knobs for :func:`run_gpu_benchmarks` (``--configs``) from the first sweep JSON in
    ``paths`` that exists: ``{"W1"|"W2": {staging: knobs}}``, the fastest timed row of each
    staging for each workload the sweep covered (none: ``{}``, the automatic choices)."""
    best: dict[str, Any] = {}
    for path in paths:
        try:
            with open(path) as fh:
                best = json.load(fh)["best_by_staging"]
            break
        except (OSError, ValueError, KeyError):
            continue
    return {w: {st: {k: r[k] for k in _KNOBS if k in r} for st, r in best[b].items()}
            for w, b in (("W1", "1"), ("W2", "150")) if b in best}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time the kernel knobs instead of the peers")
    ap.add_argument("--sweep-args", default=None,
                    help='JSON for the sweep, e.g. {"batches": [150], "occupancies": [512, 1024]}')
    ap.add_argument("--configs", default=None,
                    help='JSON: kernel knobs per workload, e.g. {"W2": {"threads": 256, "unroll": 8}}')
    ap.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    ap.add_argument("--modes", default="auto",
                    help="fastmu launch designs to benchmark, comma-separated (auto, block, grid, flat)")
    ap.add_argument("--stagings", default="auto",
                    help="fastmu stagings of X to benchmark and profile, comma-separated (auto, rows, tile, regs)")
    ap.add_argument("--best-configs", nargs="+", default=None, metavar="SWEEP_JSON",
                    help="print --configs JSON from the first of these sweep results that exists, and exit")
    ap.add_argument("--profile", default=None, metavar="TABLES",
                    help="profile the kernels at W1/W2 shapes (kernel vs wall time); operator tables to TABLES")
    args = ap.parse_args(argv)
    if args.best_configs:
        print(json.dumps(best_configs(args.best_configs)))
        return 0
    stagings = tuple(s for s in args.stagings.split(",") if s)
    if not stagings or set(stagings) - {"auto", "rows", "tile", "regs"}:
        ap.error(f"--stagings takes auto, rows, tile and/or regs, got {args.stagings!r}")
    if args.profile:
        res = profile_fastmu(table_path=args.profile, stagings=stagings)
    elif args.sweep:
        kw = json.loads(args.sweep_args) if args.sweep_args else {}
        res = sweep_kernel_configs(partial=args.out, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    else:
        configs = json.loads(args.configs) if args.configs else None
        modes = tuple(m for m in args.modes.split(",") if m)
        bad = set(modes) - {"auto", "block", "grid", "flat"}
        if bad or not modes:
            ap.error(f"--modes takes auto, block, grid and/or flat, got {args.modes!r}")
        res = run_gpu_benchmarks(args.iters, args.batch, args.quick, configs=configs, partial=args.out, modes=modes,
                                 stagings=stagings)
    text = json.dumps(res, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
