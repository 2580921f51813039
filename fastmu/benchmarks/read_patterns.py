"""How fast the GPU reads X in the MU kernel's access pattern, with no arithmetic.

A diagnostic for W2 (150 problems of 65 × 16384, float32). Inside the kernel,
W2 moves its bytes at ~61 % of the device's copy bandwidth (H100). One
candidate cause is the access pattern itself: in the ``"regs"`` layout a
warp reads a tile 32 pixels wide, 128 B per row of X, and the rows lie
``t · 4`` = 64 KB apart, whereas a copy streams long contiguous runs. This
module times *only the reads* of that pattern, each value loaded once and
summed, so the kernel has nothing else to wait for:

- ``linear``: the whole of X read in order, every warp on 32 consecutive
  float32 (the read roofline of this device);
- ``tiles``: the MU kernel's pattern: a block of ``warps`` × 32 threads, warp
  ``g`` holding rows ``g·rpg … g·rpg + rpg − 1`` of a tile, each lane
  ``ppl`` pixels 32 apart, so a warp reads ``128·ppl`` contiguous bytes per
  row. ``ppl = 1`` is what the kernel does today; wider tiles are what it
  could do. Tiles are dealt to a problem's blocks either strided (block
  ``i`` takes tiles ``i, i + nb, …``: grid mode) or in contiguous ranges
  (``"flat"`` mode).

The result says how much of the gap a different tile shape could close
before any kernel is rewritten. Usage::

    python -m fastmu.benchmarks.read_patterns --out bench/results/read_patterns.json
"""
from __future__ import annotations

import argparse
import json
import math
from functools import lru_cache
from typing import Any

import numpy as np

import fastmu.kernels  # noqa: F401  (its NumPy shim must precede numba-cuda's first compile)
from numba import cuda, float32, uint32, uint64  # module globals: the simulator swaps ``cuda`` in a kernel's globals

WARP = 32
#: loads of each thread in flight at once in the linear read
LIN_UNROLL = 8


@lru_cache(maxsize=None)
def _kernels(rpg: int, ppl: int, contiguous: bool) -> tuple[Any, Any]:
    """(tiles kernel, linear kernel) for ``rpg`` rows per thread and ``ppl`` pixels per lane."""
    nv = rpg * ppl
    width = WARP * ppl

    @cuda.jit
    def read_tiles(X, out):
        """Block ``(bx, p)`` reads its tiles of problem ``p``; every thread writes the sum of
        what it read to ``out[p, bx, tid]``."""
        bx = uint32(cuda.blockIdx.x)
        p = uint32(cuda.blockIdx.y)
        nb = uint32(cuda.gridDim.x)
        tid = uint32(cuda.threadIdx.x)
        lane = tid % WARP
        row0 = (tid // WARP) * rpg
        m = uint32(X.shape[1])
        t = uint32(X.shape[2])
        nt = (t + width - 1) // width
        if contiguous:
            c0 = (bx * nt) // nb
            c1 = ((bx + 1) * nt) // nb
            step = uint32(1)
        else:
            c0 = bx
            c1 = nt
            step = nb
        xr = cuda.local.array(nv, float32)
        acc = float32(0)
        full = row0 + rpg <= m  # warp-uniform; unsigned indices, no per-row branch (as the MU kernel)
        for c in range(c0, c1, step):
            # every load of the tile issued before any is used: one branch-free run
            if full:
                for q in range(ppl):
                    j = c * width + q * WARP + lane
                    jc = uint64(j) if j < t else uint64(0)
                    for r in range(rpg):
                        v = X[uint64(p), uint64(row0 + r), jc]
                        xr[q * rpg + r] = v if j < t else float32(0)
            else:  # a last, partial warp: rows past m clamped, read as zeros
                for q in range(ppl):
                    j = c * width + q * WARP + lane
                    jc = uint64(j) if j < t else uint64(0)
                    for r in range(rpg):
                        i = row0 + r
                        v = X[uint64(p), uint64(min(i, m - 1)), jc]
                        xr[q * rpg + r] = v if (i < m) & (j < t) else float32(0)
            for v in range(nv):
                acc += xr[v]
        out[p, bx, tid] = acc

    @cuda.jit
    def read_linear(Xf, out):
        """Grid-stride read of the flat array, a warp on 32 consecutive values per load and
        ``LIN_UNROLL`` loads of each thread in flight together."""
        i = uint64(cuda.grid(1))
        stride = uint64(cuda.gridsize(1))
        size = uint64(Xf.shape[0])
        vals = cuda.local.array(LIN_UNROLL, float32)
        acc = float32(0)
        for k in range(i, size, stride * LIN_UNROLL):
            for u in range(LIN_UNROLL):
                kk = k + u * stride
                v = Xf[min(kk, size - 1)]
                vals[u] = v if kk < size else float32(0)
            for u in range(LIN_UNROLL):
                acc += vals[u]
        out[i] = acc

    return read_tiles, read_linear


def check_coverage(X: Any, rpg: int, ppl: int, contiguous: bool, blocks: int) -> float:
    """Run the tiles kernel once and return the sum of what it read: equal to ``X.sum()``
    exactly when every value of X is read once (the test's check that the pattern is
    what this module says)."""
    b, m, t = X.shape
    warps = math.ceil(m / rpg)
    tiles, _ = _kernels(rpg, ppl, contiguous)
    out = cuda.device_array((b, blocks, warps * WARP), np.float32)
    tiles[(blocks, b), warps * WARP](X, out)
    return float(np.asarray(out.copy_to_host(), dtype=np.float64).sum())


def check_linear(Xf: Any, blocks: int, threads: int = 256) -> float:
    """The linear kernel's total (``Xf.sum()`` when it reads everything once)."""
    _, linear = _kernels(1, 1, False)
    out = cuda.device_array(blocks * threads, np.float32)
    linear[blocks, threads](Xf, out)
    return float(np.asarray(out.copy_to_host(), dtype=np.float64).sum())


def run_read_patterns(batch: int = 150, m: int = 65, t: int = 16384, rpg: int = 13,
                      ppls: tuple[int, ...] = (1, 2, 4, 8), bpps: tuple[int, ...] = (2, 8),
                      repeats: int = 20) -> dict[str, Any]:
    """Time each read pattern over a ``(batch, m, t)`` float32 X; GB/s and fractions of the
    linear read and of the copy bandwidth. Needs a GPU."""
    from fastmu.benchmarks.mu_gpu import _copy_fields, _numba_time, _require_gpu, _versions, copy_bandwidths

    _require_gpu()
    rng = np.random.default_rng(0)
    X = cuda.to_device(rng.random((batch, m, t), dtype=np.float32))
    nbytes = X.size * 4
    sms = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    bws = copy_bandwidths(cuda)
    copy_bw = max(bws.values())

    def best(launch: Any) -> float:
        launch()  # compile and warm
        cuda.synchronize()
        return min(_numba_time(cuda, launch) for _ in range(repeats))

    rows: list[dict[str, Any]] = []
    Xf = X.reshape(X.size)
    lin_blocks = sms * 8
    lin_out = cuda.device_array(lin_blocks * 256, np.float32)
    _, linear = _kernels(1, 1, False)
    sec = best(lambda: linear[lin_blocks, 256](Xf, lin_out))
    linear_bw = nbytes / sec
    rows.append({"pattern": "linear", "seconds": sec, "GBps": linear_bw / 1e9})
    warps = math.ceil(m / rpg)
    for contiguous in (False, True):
        for ppl in ppls:
            tiles, _ = _kernels(rpg, ppl, contiguous)
            for bpp in bpps:
                out = cuda.device_array((batch, bpp, warps * WARP), np.float32)
                sec = best(lambda: tiles[(bpp, batch), warps * WARP](X, out))
                rows.append({"pattern": "tiles", "order": "contiguous" if contiguous else "strided",
                             "pixels_per_lane": ppl, "bytes_per_row_run": 4 * WARP * ppl,
                             "blocks_per_problem": bpp, "rows_per_thread": rpg, "threads": warps * WARP,
                             "seconds": sec, "GBps": nbytes / sec / 1e9})
    for r in rows:
        r["fraction_of_linear_read"] = r["GBps"] * 1e9 / linear_bw
        r["fraction_of_copy_bandwidth"] = r["GBps"] * 1e9 / copy_bw
    return {"suite": "gpu-read-patterns", **_versions(cuda), **_copy_fields(bws),
            "shape": [batch, m, t], "dtype": "float32", "bytes_read": nbytes, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    """The rows as a text table."""
    lines = [f"{'pattern':<8} {'order':<10} {'B/run':>6} {'bpp':>4} {'GB/s':>8} {'/linear':>8} {'/copy':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['pattern']:<8} {r.get('order', ''):<10} {r.get('bytes_per_row_run', ''):>6} "
                     f"{r.get('blocks_per_problem', ''):>4} {r['GBps']:8.0f} {r['fraction_of_linear_read']:8.2f} "
                     f"{r['fraction_of_copy_bandwidth']:6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--t", type=int, default=16384)
    ap.add_argument("--out", default=None, help="write the JSON here (default: print the table only)")
    args = ap.parse_args(argv)
    result = run_read_patterns(batch=args.batch, t=args.t)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
