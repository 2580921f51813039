"""Fused multiplicative-update kernels for NVIDIA GPUs (Numba CUDA).

The same semantics as :func:`fastmu.kernels.cpu.mu_run` : per
iteration, the tiny A update ``A' = A ⊙ W ⊙ P ⊘ (A (G + l2_A I) + ε_A)`` and
``H = A'ᵀA' + l2_S I`` from the carried ``P = X Sᵀ`` and ``G = S Sᵀ``, then the
column-parallel S update ``S'_j = S_j ⊙ (A'ᵀ X_j) ⊘ (H S_j + ε_S)`` fused with
the reductions ``P += X_j S'_jᵀ``, ``G += S'_j S'_jᵀ`` that the next
iteration's A update needs: one pass over X per iteration.

The L1/L2 penalties of :mod:`fastmu.penalty` (``mu_run(..., penalty=(l1_A,
l2_A, l1_S, l2_S))``, scikit-learn's regularised MU) cost nothing per pixel:
the L1 weights join ε (``ε_A = ε + l1_A``, ``ε_S = ε + l1_S``), l2_A is added
to G's diagonal where the A update reads G (P and G themselves stay ``X Sᵀ``,
``S Sᵀ``) and l2_S to H's diagonal once H is complete. Without a penalty
(all four weights zero: plain MU) the plain kernels run, which hold no
penalty code; a penalty runs the ``_pen`` kernels, which take the scalars
as kernel parameters (:func:`mu_run`).

Two launch designs, both keeping every barrier inside a thread block (the
CUDA simulator, which CI runs, has no real grid-wide barrier and no warp
shuffles):

``"block"`` — one block per problem, persistent
    Block ``p`` owns problem ``p`` for the whole call and loops over all
    iterations inside one launch: no Python between iterations, no global
    synchronisation. Fills the GPU when the batch is large (the 150-problem
    test set), but a single problem then runs on one multiprocessor.
``"grid"`` — several blocks per problem, one launch per iteration
    Each block recomputes the tiny A update redundantly (m·n² work), updates
    its own column tiles, and adds its partial P, G to global accumulators
    with atomics; the launch boundary is the grid-wide barrier. Iteration
    state rotates through small ring buffers (A: 2, P/G: 3), so a launch
    never reads what the same launch writes. The per-iteration launches are
    captured in a CUDA graph (through CuPy, when installed) and replayed, so
    Python launch overhead (tens of µs per Numba launch, while an
    iteration at 65×16384 moves only 4.78 MB) is paid once per graph, not
    once per iteration. Without CuPy the launches are queued asynchronously.
``"flat"`` — grid mode with the batch's tiles dealt evenly, one launch per iteration
    A 1-D grid of one wave of blocks cuts the ``b · tiles`` (problem, tile)
    pairs into equal contiguous ranges, so every block (and SM) has the
    same work whatever the block count's relation to the batch; a range
    crossing problems runs one segment per problem (``mu_flat_step``). The
    automatic choice where each block gets many tiles (:func:`choose_mode`).

Inside a block, one thread owns one pixel column of the current tile (the
tile width is the block size). Its column of S and the accumulators for the
n components live in registers (``n`` is a compile-time constant: kernels are
specialised per dtype, block size and n ≤ :data:`MAX_N`). ``P += X S'ᵀ`` is a
reduction over the tile's columns: the tile's rows of X are staged through
shared memory (``rc`` rows at a time, padded against bank conflicts), each
thread sums ``rc``-row × column-group products in registers and adds them to
the block's shared ``P`` with one shared atomic per component. The X tile is
read from DRAM once per iteration; its second read (for P) is served from
L1/L2.

With ``"regs"`` staging (:func:`set_staging`) a block is laid out
differently: 32-pixel tiles, each warp a group of rows, a thread holding its
rows of one pixel column in registers, so that all of its loads are in flight
at once and X is never read twice (:func:`regs_layout`, ``sweep_regs``).

Memory traffic per iteration and problem: X read once, S read and written
once: ``itemsize·(m·t + 2·n·t)`` bytes (the one-pass traffic model).

All arrays are C-contiguous Numba device arrays of one float dtype:
``X (b, m, t)``, ``A (b, m, n)``, ``S (b, n, t)``, ``W (bw, m, n)`` with
``bw`` 1 (shared) or ``b`` (per problem), ``P (b, m, n)``, ``G (b, n, n)``.

Tuning knobs (module level, also read from the environment at import):

- ``FASTMU_CUDA_THREADS`` / :func:`set_threads`: threads per block, which is
  also the pixel tile width (default 128; tests use 32 so that tiny problems
  span several tiles and blocks).
- ``FASTMU_CUDA_MODE`` / :func:`set_mode`: ``"auto"``, ``"block"``, ``"grid"`` or ``"flat"``.
- ``FASTMU_CUDA_BLOCKS_PER_PROBLEM`` / :func:`set_blocks_per_problem`: blocks
  per problem in grid mode (default: enough to give every multiprocessor two).
- ``FASTMU_CUDA_GRAPHS`` / :func:`set_graphs`: ``"auto"`` (use CUDA graphs
  when CuPy is importable), ``"1"`` (required), ``"0"`` (never).
- ``FASTMU_CUDA_UNROLL`` / :func:`set_unroll`: rows of X each thread loads
  ahead in the S update (memory-level parallelism).
- ``FASTMU_CUDA_OCCUPANCY`` / :func:`set_occupancy`: resident threads per SM
  the launch bounds ask for (caps registers per thread).
- ``FASTMU_CUDA_STAGING`` / :func:`set_staging`: how the block is laid out
  over X and how ``P += X S'ᵀ`` reaches it: ``"rows"`` (one thread per pixel,
  re-read in row chunks), ``"tile"`` (one thread per pixel, the whole tile
  kept in shared memory) or ``"regs"`` (rows split over warps, X kept in
  registers between its two uses; the automatic choice, measured fastest on an
  H100 and an H200); ``"tile"`` is not yet measured on a GPU.
- ``FASTMU_CUDA_ROWS_PER_THREAD`` / :func:`set_rows_per_thread`: most rows of
  X one thread holds with ``"regs"`` staging.
- ``FASTMU_CUDA_PREFETCH`` / :func:`set_prefetch`: with ``"regs"`` staging,
  load the next tile's X while the current one is reduced.

The automatic choices (:func:`choose_mode`, :func:`choose_knobs`,
:func:`pixels_per_lane_for`) come from sweeps on an H100 and an H200
(``bench/results/mu_gpu_sweep*_h100.json``, ``mu_gpu_sweep*_h200.json``);
other GPUs may prefer others: ``python -m fastmu.benchmarks.mu_gpu --sweep``
measures them.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from numba import cuda

from fastmu.kernels.cuda_launch import is_c_contiguous, is_torch, launch, np_dtype, stream_handle

#: largest rank the kernels are compiled for: per-thread accumulators are
#: ``n`` (S column, A'ᵀX column) plus ``n²`` (G) registers.
MAX_N = 8

#: static shared memory the kernels may use per block (the CUDA default limit
#: without an opt-in is 48 KiB); half is reserved for the m-dependent part.
_SHARED_LIMIT = 48 * 1024
_STATIC_BUDGET = 24 * 1024

#: launches per captured CUDA graph in grid mode (a multiple of 6 so that the
#: 2- and 3-deep ring buffers are back at their starting phase after it).
_GRAPH_LEN = 120

_MODES = ("auto", "block", "grid", "flat")

#: most blocks a launch grid may have along y (CUDA's limit; along x it is 2³¹ − 1): the
#: problems of grid-mode launches, so larger batches run in flat mode (1-D grid)
_MAX_GRID_Y = 65535


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass
class _Config:
    threads: int = 128
    mode: str = "auto"
    blocks_per_problem: int | None = None
    graphs: str = "auto"
    unroll: int | None = None  # None: chosen per launch (choose_knobs)
    occupancy: int | None = None
    staging: str = "rows"
    rows_per_thread: int | None = None  # "regs" staging; None: 16 (float32) / 8 (float64)
    prefetch: bool = False  # "regs" staging: next tile's loads in flight during this tile's work
    pixels_per_lane: int | None = None  # "regs" staging: tiles 32·ppl pixels wide; None: automatic


_config = _Config()


def set_threads(threads: int) -> None:
    """Set the threads per block (= pixel tile width) of every later launch.

    Parameters
    ----------
    threads : int
        A power of two between 32 and 1024. Small values (32) let simulator
        tests cover several tiles and blocks with tiny problems.
    """
    threads = int(threads)
    if threads < 32 or threads > 1024 or threads & (threads - 1):
        raise ValueError(f"threads per block must be a power of two in [32, 1024], got {threads}")
    _config.threads = threads


def set_mode(mode: str) -> None:
    """Choose the launch design: ``"auto"``, ``"block"`` (one persistent block per problem),
    ``"grid"`` or ``"flat"`` (grid mode with the batch's tiles dealt evenly over the blocks)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    _config.mode = mode


def set_blocks_per_problem(blocks: int | None) -> None:
    """Blocks per problem in grid mode (``None``: chosen from the multiprocessor count)."""
    if blocks is not None and int(blocks) < 1:
        raise ValueError(f"blocks per problem must be >= 1, got {blocks}")
    _config.blocks_per_problem = None if blocks is None else int(blocks)


def set_graphs(graphs: str | bool) -> None:
    """CUDA graphs in grid mode: ``"auto"`` (when CuPy is importable), ``True``/``"1"``, ``False``/``"0"``."""
    g = {True: "1", False: "0"}.get(graphs, graphs) if isinstance(graphs, bool) else str(graphs)
    if g not in ("auto", "0", "1"):
        raise ValueError(f"graphs must be 'auto', '0' or '1' (or a bool), got {graphs!r}")
    _config.graphs = g


def set_unroll(unroll: int | None) -> None:
    """Rows of X each thread loads ahead in the S update (1, 2, 4, 8 or 16; None: automatic).

    Loading ``unroll`` rows into registers before using them keeps that many
    independent DRAM reads in flight per thread (memory-level parallelism);
    1 leaves the scheduling of the plain row loop to the compiler. ``None``
    lets :func:`choose_knobs` pick per launch.
    """
    if unroll is None:
        _config.unroll = None
        return
    unroll = int(unroll)
    if unroll not in (1, 2, 4, 8, 16):
        raise ValueError(f"unroll must be 1, 2, 4, 8 or 16, got {unroll}")
    _config.unroll = unroll


def set_occupancy(threads_per_sm: int | None) -> None:
    """Resident threads per multiprocessor the kernels are compiled for (a multiple of 32
    from 128 to 2048, e.g. 512, 1024, 2048; None: automatic).

    Sets the launch bounds' minimum blocks per SM (``threads_per_sm //
    threads``), which caps registers per thread at about ``65536 / threads_per_sm``
    (128, 64, 32 at 512, 1024, 2048): more warps to hide memory latency, at
    the risk of spills. Below 512 it leaves registers for wide ``"regs"``
    tiles (:func:`set_pixels_per_lane`): 320 gives two 160-thread blocks per SM.
    """
    if threads_per_sm is None:
        _config.occupancy = None
        return
    threads_per_sm = int(threads_per_sm)
    if not (128 <= threads_per_sm <= 2048 and threads_per_sm % 32 == 0):
        raise ValueError(f"occupancy must be a multiple of 32 threads per SM in [128, 2048], got {threads_per_sm}")
    _config.occupancy = threads_per_sm


_STAGINGS = ("rows", "tile", "regs", "auto")

#: pixel tile width with ``"regs"`` staging: one warp spans 32 pixels of a row group
REGS_TILE = 32


def set_staging(staging: str) -> None:
    """How a block covers X, and how the second use of X (``P += X S'ᵀ``) reaches it.

    ``"rows"``, ``"tile"``, ``"regs"`` or ``"auto"``.

    ``"rows"``: after the S update, the tile's rows of X are
    re-read from global memory (L1/L2 hits) ``rc`` rows at a time into a
    shared staging buffer and reduced there, with two barriers and one
    shared atomic per component per chunk. ``"tile"``: the S update stores
    each X value it loads into a shared copy of the whole tile (``m ×
    (threads + 1)`` values of dynamic shared memory), and after one barrier
    each of ``m`` row-owner threads sums its row against the tile's S' columns
    into registers that persist over all the block's tiles: two barriers per
    tile, no per-tile atomics, no second read of global memory. It needs
    ``m ≤ threads`` and the tile in shared memory. ``"auto"`` (the default)
    takes ``"regs"`` where it fits, ``"rows"`` elsewhere: on an H100 "regs"
    ran W1 6× and W2 2.3× faster than "rows" (``bench/results/mu_gpu_h100.json``).

    ``"regs"`` lays the block out differently: a tile is 32 pixels wide and
    each warp owns a group of up to :func:`set_rows_per_thread` rows, so a
    thread holds a few X values (one pixel, its group's rows) in registers.
    It issues all its loads at once (one DRAM latency per tile instead of a
    chain of ``m``), reduces ``A'ᵀX_j`` across the warps through shared
    memory, and reuses the registers for ``P += X S'ᵀ`` (per-thread partial
    sums kept over all the block's tiles): two barriers per tile, no atomics
    per tile, no second read of X. The block size follows from ``m``
    (:func:`regs_layout`); ``set_threads`` does not apply.
    """
    if staging not in _STAGINGS:
        raise ValueError(f"staging must be one of {_STAGINGS}, got {staging!r}")
    _config.staging = staging


def set_rows_per_thread(rows: int | None) -> None:
    """Most rows of X one thread holds in registers with ``"regs"`` staging (1–32; None: automatic).

    Fewer rows mean more warps per block and fewer registers per thread
    (``rows·(n + 1)`` of them hold X and the P partial sums).
    """
    if rows is None:
        _config.rows_per_thread = None
        return
    rows = int(rows)
    if not 1 <= rows <= 32:
        raise ValueError(f"rows per thread must be in [1, 32], got {rows}")
    _config.rows_per_thread = rows


def set_prefetch(prefetch: bool | str | int) -> None:
    """With ``"regs"`` staging, issue the next tile's loads of X before reducing the current tile.

    The loads then stay in flight through the tile's barriers and arithmetic
    instead of the memory system idling between tiles, at the cost of a
    second set of ``rows`` registers per thread. Off by default (not yet
    measured on a GPU); ``bench/gpu_session.sh`` sweeps both.
    """
    if isinstance(prefetch, str):
        if prefetch not in ("0", "1", "true", "false", "True", "False"):
            raise ValueError(f"prefetch must be a bool (or '0'/'1'), got {prefetch!r}")
        prefetch = prefetch in ("1", "true", "True")
    _config.prefetch = bool(prefetch)


#: most pixels per lane of a ``"regs"`` tile
MAX_PIXELS_PER_LANE = 8


def set_pixels_per_lane(ppl: int | None) -> None:
    """Pixels per lane of a ``"regs"`` tile: tiles ``32·ppl`` pixels wide (1–8; None: automatic,
    see :func:`pixels_per_lane_for`).

    A warp then reads ``128·ppl`` contiguous bytes of each of its rows of X at
    once (float32) instead of 128, and a tile costs two barriers for ``ppl``
    pixels per lane instead of for one. The price is ``rows·(ppl − 1)`` more
    registers per thread for X.
    """
    if ppl is None:
        _config.pixels_per_lane = None
        return
    ppl = int(ppl)
    if not 1 <= ppl <= MAX_PIXELS_PER_LANE:
        raise ValueError(f"pixels per lane must be in [1, {MAX_PIXELS_PER_LANE}], got {ppl}")
    _config.pixels_per_lane = ppl


def pixels_per_lane_for(dtype: Any, m: int, n: int, auto_wide: bool = True) -> int:
    """Pixels per lane of the ``"regs"`` tiles for ``m`` channels, rank ``n`` and ``dtype``.

    The value set with :func:`set_pixels_per_lane`, else 2 in float32 up to
    rank 4 where the wider buffers fit the shared memory, else 1. With
    ``auto_wide`` false (the learned layers' forward, whose GPU tests and
    timings ran at 1) the automatic value is 1. Measured
    on an H200 at m = 65, n = 4 (``bench/results/mu_gpu_sweep_batches_h200.json``,
    247 iterations, ms per iteration, 1 → 2 pixels per lane): one problem 0.0774
    → 0.0768, 4 problems 0.0845 → 0.0849, 25 problems 0.135 → 0.124, 150 problems
    0.495 → 0.450 (grid mode) and 0.470 → 0.439 (flat). Float64 and ranks
    above 4 (more registers per thread) were not measured, so they keep 1.
    """
    if _config.pixels_per_lane is not None:
        return _config.pixels_per_lane
    if not auto_wide or np.dtype(dtype).itemsize != 4 or n > 4:
        return 1
    groups = regs_layout(dtype, m, n)[0]
    fits = dynamic_shared_bytes(dtype, m, n) + static_shared_bytes(
        dtype, REGS_TILE * groups, n, "regs", 2) <= _SHARED_LIMIT
    return 2 if fits else 1


def regs_layout(dtype: Any, m: int, n: int = 4) -> tuple[int, int]:
    """``(row groups, rows per group)`` of a ``"regs"`` block for ``m`` channels and rank ``n``.

    The fewest warps whose groups hold at most :func:`set_rows_per_thread`
    rows, with the rows spread evenly. The default cap keeps a thread's X
    values and P partial sums (``rows·(n + 1)`` registers, twice in float64)
    within the 128 registers of 512 resident threads per SM, where ``ptxas``
    (sm_90) reports no more than a few spilled bytes: 16 rows in float32 and
    8 in float64 up to n = 4, ``64 // n`` and ``32 // n`` above (m = 65, n =
    4, float32: 5 warps of 13 rows, 160 threads, 128 registers).
    """
    if _config.rows_per_thread:
        cap = _config.rows_per_thread
    elif np.dtype(dtype).itemsize == 4:
        cap = 16 if n <= 4 else max(2, 64 // n)
    else:
        cap = 8 if n <= 4 else max(1, 32 // n)
    groups = -(-int(m) // cap)
    return groups, -(-int(m) // groups)


def set_config(**knobs: Any) -> None:
    """Set several knobs at once, by the names :func:`get_config` returns.

    ``set_config(**saved)`` restores a configuration saved with
    :func:`get_config`. Unknown names raise ValueError; each value is
    checked by its own setter.
    """
    setters = {
        "threads": set_threads, "mode": set_mode, "blocks_per_problem": set_blocks_per_problem,
        "graphs": set_graphs, "unroll": set_unroll, "occupancy": set_occupancy, "staging": set_staging,
        "rows_per_thread": set_rows_per_thread, "prefetch": set_prefetch,
        "pixels_per_lane": set_pixels_per_lane,
    }
    unknown = sorted(set(knobs) - set(setters))
    if unknown:
        raise ValueError(f"unknown CUDA kernel knob(s) {unknown}; expected some of {sorted(setters)}")
    for name, value in knobs.items():
        setters[name](value)


def get_config() -> dict[str, Any]:
    """The current tuning knobs as a dict (recorded by the benchmarks)."""
    return {
        "threads": _config.threads,
        "mode": _config.mode,
        "blocks_per_problem": _config.blocks_per_problem,
        "graphs": _config.graphs,
        "unroll": _config.unroll,
        "occupancy": _config.occupancy,
        "staging": _config.staging,
        "rows_per_thread": _config.rows_per_thread,
        "prefetch": _config.prefetch,
        "pixels_per_lane": _config.pixels_per_lane,
    }


set_threads(_env_int("FASTMU_CUDA_THREADS", 128))
set_mode(os.environ.get("FASTMU_CUDA_MODE", "auto") or "auto")
set_blocks_per_problem(_env_int("FASTMU_CUDA_BLOCKS_PER_PROBLEM", None))
set_graphs(os.environ.get("FASTMU_CUDA_GRAPHS", "auto") or "auto")
set_unroll(_env_int("FASTMU_CUDA_UNROLL", None))
set_occupancy(_env_int("FASTMU_CUDA_OCCUPANCY", None))
set_staging(os.environ.get("FASTMU_CUDA_STAGING", "auto") or "auto")
set_rows_per_thread(_env_int("FASTMU_CUDA_ROWS_PER_THREAD", None))
set_prefetch(os.environ.get("FASTMU_CUDA_PREFETCH", "0") or "0")
set_pixels_per_lane(_env_int("FASTMU_CUDA_PIXELS_PER_LANE", None) or None)


def _rows_per_chunk(tpb: int, n: int, itemsize: int) -> int:
    """Rows of X staged in shared memory at once: the largest power of two ≤ min(32, tpb)
    whose staging buffer keeps the static shared memory within its budget."""
    fixed = (n * tpb + 2 * n * n) * itemsize
    rc = min(32, tpb)
    while rc > 1 and fixed + rc * (tpb + 1) * itemsize > _STATIC_BUDGET:
        rc //= 2
    return rc


#: bytes of the "regs" sweep's lane-reduction buffer at most (it shares the SM with
#: the other resident blocks)
_REGS_REDUCE_BUDGET = 12 * 1024


def regs_reduce_entries(threads: int, itemsize: int) -> int:
    """Partial sums per thread that the ``"regs"`` sweep reduces over lanes per round:
    the round's buffer ``(warps, entries, 33)`` stays within its budget, and one
    lane sums one entry (at most 32)."""
    warps = max(1, threads // REGS_TILE)
    return max(1, min(REGS_TILE, _REGS_REDUCE_BUDGET // (warps * (REGS_TILE + 1) * itemsize)))


def static_shared_bytes(dtype: Any, threads: int, n: int, staging: str = "rows", ppl: int = 1) -> int:
    """Static shared memory per block of the kernels for ``dtype``, ``threads``, ``n``,
    ``staging`` (and, for ``"regs"``, ``ppl`` pixels per lane)."""
    isz = np.dtype(dtype).itemsize
    if staging == "regs":
        # old and new S columns (2n × 32·ppl), G, H, the warps' A'ᵀX partials
        # (n × threads·ppl), and the lane-reduction buffer (warps × entries × 33)
        warps = max(1, threads // REGS_TILE)
        red = warps * regs_reduce_entries(threads, isz) * (REGS_TILE + 1)
        return (2 * n * REGS_TILE * ppl + 2 * n * n + n * threads * ppl + red) * isz
    rc = _rows_per_chunk(threads, n, isz)
    stage = rc * (threads + 1) if staging == "rows" else 1
    return (n * threads + 2 * n * n + stage) * isz


def dynamic_shared_bytes(dtype: Any, m: int, n: int, threads: int = 0, staging: str = "rows") -> int:
    """Dynamic shared memory per block: A' and the block's P (``2·m·n`` values), plus the
    ``m × (threads + 1)`` tile of X with ``"tile"`` staging."""
    extra = m * (threads + 1) if staging == "tile" else 0
    return (2 * m * n + extra) * np.dtype(dtype).itemsize


def choose_staging(dtype: Any, m: int, n: int, threads: int | None = None) -> str:
    """The staging of X used for ``m`` channels (see :func:`set_staging`); ValueError if none fits."""
    tpb = threads or _config.threads

    def fits(st: str) -> bool:
        if st == "regs":
            thr = REGS_TILE * regs_layout(dtype, m, n)[0]
            return thr <= 1024 and dynamic_shared_bytes(dtype, m, n) + static_shared_bytes(
                dtype, thr, n, st, pixels_per_lane_for(dtype, m, n)) <= _SHARED_LIMIT
        return (dynamic_shared_bytes(dtype, m, n, tpb, st) + static_shared_bytes(dtype, tpb, n, st)
                <= _SHARED_LIMIT and (st == "rows" or m <= tpb))

    want = _config.staging
    if want == "regs" and not fits("regs"):
        raise ValueError(
            f"staging='regs' needs at most 32 warps of rows per block and its buffers within "
            f"{_SHARED_LIMIT // 1024} kB of shared memory; m = {m} at {regs_layout(dtype, m, n)[1]} rows "
            f"per thread ({np.dtype(dtype)}) does not fit (raise set_rows_per_thread, or use staging 'rows')"
        )
    if want == "tile" and not fits("tile"):
        raise ValueError(
            f"staging='tile' needs m <= threads per block and the m × (threads + 1) tile of X in shared "
            f"memory; m = {m}, {tpb} threads, {np.dtype(dtype)} do not fit (use staging 'rows' or 'auto')"
        )
    if want == "auto":  # "regs" won every measured case (bench/results/mu_gpu_h100.json)
        want = "regs" if fits("regs") else "rows"
    if not fits(want):
        st = static_shared_bytes(dtype, tpb, n)
        m_max = (_SHARED_LIMIT - st) // (2 * n * np.dtype(dtype).itemsize)
        raise ValueError(
            f"m = {m} channels do not fit the CUDA kernels' shared memory at n = {n}, {np.dtype(dtype)}, "
            f"{tpb} threads per block (at most m = {m_max}); use fewer threads per block "
            "(fastmu.kernels.cuda.set_threads) or backend='cpu', which runs a tall X on its transpose "
            "itself, or factorise Xᵀ ≈ Sᵀ Aᵀ if X is tall (fastmu.NMF does that on the GPU)"
        )
    return want


@dataclass(frozen=True)
class Layout:
    """How one launch covers X: the staging, threads per block, pixel tile width and,
    for ``"regs"``, rows of X per thread (0 otherwise)."""

    staging: str
    threads: int
    tile: int
    rows: int


def launch_layout(dtype: Any, m: int, n: int, auto_wide: bool = True) -> Layout:
    """The block layout the kernels use for ``m`` channels, rank ``n`` and ``dtype`` under the
    current knobs (ValueError when nothing fits the shared memory); ``auto_wide``: see
    :func:`pixels_per_lane_for`."""
    st = choose_staging(dtype, m, n)
    if st == "regs":
        groups, rows = regs_layout(dtype, m, n)
        ppl = pixels_per_lane_for(dtype, m, n, auto_wide)
        return Layout("regs", REGS_TILE * groups, REGS_TILE * ppl, rows)
    return Layout(st, _config.threads, _config.threads, 0)


@dataclass
class _Kernels:
    """The kernels compiled for one (dtype, threads per block, n)."""

    tpb: int
    n: int
    rc: int
    launch_bounds: tuple[int, int]
    mu_block: Any
    mu_grid_step: Any
    mu_flat_step: Any
    layer_step: Any
    sumsq: Any
    residsq: Any
    zero: Any
    #: the MU kernels with L1/L2 penalties (three more scalar parameters; compiled on first use)
    mu_block_pen: Any = None
    mu_grid_step_pen: Any = None
    mu_flat_step_pen: Any = None
    device_funcs: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def regs_helpers(dtype_name: str, n: int, rg: int, rpg: int, exact: bool = False) -> tuple[Any, Any, Any]:
    """The device functions every ``"regs"``-layout kernel shares (forward sweep, backward passes).

    Warp ``g`` of ``rg`` owns rows ``row0 = g·rpg ...`` of a 32-pixel tile, lane = pixel:

    - ``load_rows(X, p, row0, j, valid, m, xr, off)``: the thread's ``rpg`` values
      of column ``j`` into registers ``xr[off ...]``, all loads issued before any use
      (zeros past ``m`` rows or ``t`` pixels);
    - ``share_rows(C, row0, m, xr, off, Xsh, g, lane)``: this warp's share of
      ``Cᵀ X_j`` (``C`` an m × n matrix in shared memory, flat; X's values in
      ``xr[off ...]``) into row ``g·n + k``, column ``lane`` of ``Xsh``;
    - ``sum_shares(Xsh, k, lane)``: ``(Cᵀ X_j)_k``, the warps' shares summed in
      warp order.

    Inlined into the kernels (``forceinline``) so that ``xr`` stays in registers.
    ``exact`` (``rg·rpg == m``, every warp's rows in range) compiles only the
    unguarded path: no code for a partial warp, hence fewer registers.
    """
    nbt = numba.float32 if dtype_name == "float32" else numba.float64
    RPG, RG, EXACT = rpg, rg, bool(exact)
    djit = functools.partial(cuda.jit, device=True)
    if not _in_simulator():
        djit = functools.partial(djit, forceinline=True)

    # Branch-free bodies (bench/sass_report.py shows the sm_90 SASS): a warp
    # whose rows all lie below m loads them unguarded, one row stride apart,
    # and zeroes pixels past t by a select; a last, partial warp clamps its
    # rows to m - 1 instead of branching. Unsigned indices spare Numba's
    # negative-index wraparound. A guard per row had compiled to ~28 integer
    # instructions and a branch per row, and the shares to a loop of dependent
    # shared loads: 933 instructions in the tile loop plus a 311-instruction
    # loop run n times, against 531 now for both paths and no inner loop.
    u64 = numba.uint64

    @djit
    def load_rows(X, p, row0, j, valid, m, xr, off):
        jc = u64(j) if valid else u64(0)
        pu = u64(p)
        if EXACT or row0 + RPG <= m:  # warp-uniform: every warp but a last, partial one
            for r in range(RPG):
                v = X[pu, u64(row0 + r), jc]
                xr[off + r] = v if valid else nbt(0)
        else:
            for r in range(RPG):
                i = row0 + r
                v = X[pu, u64(min(i, m - 1)), jc]
                xr[off + r] = v if (i < m) & valid else nbt(0)

    @djit
    def share_rows(C, row0, m, xr, off, Xsh, g, lane):
        # rows outer, components inner: a row's n entries of C are loaded
        # together and feed n independent sums (each still summed in row order)
        full = EXACT or row0 + RPG <= m
        acc = cuda.local.array(n, nbt)
        for k in range(n):
            acc[k] = 0
        for r in range(RPG):
            # rows past m: clamped reads of row m - 1, times xr = 0
            i = row0 + r if full else min(row0 + r, m - 1)
            x = xr[off + r]
            for k in range(n):
                acc[k] += C[u64(i * n + k)] * x
        for k in range(n):
            Xsh[g * n + k, lane] = acc[k]

    @djit
    def sum_shares(Xsh, k, lane):
        # unsigned indices: each warp's share is then the same address plus a constant, where
        # signed ones (Numba's wraparound) made ptxas keep RG addresses live, and spill them
        acc = nbt(0)
        ku, lu = u64(k), u64(lane)
        for gg in range(RG):
            acc += Xsh[u64(gg * n) + ku, lu]
        return acc

    return load_rows, share_rows, sum_shares


@functools.lru_cache(maxsize=None)
def _build(
    dtype_name: str, tpb: int, n: int, ur: int = 1, occ: int = 512, staging: str = "rows", rows: int = 0,
    prefetch: bool = False, exact: bool = False, ppl: int = 1,
) -> _Kernels:
    """Define the kernels for one configuration; Numba compiles them on first launch.

    ``tpb`` (threads per block), ``n``, the X-row unroll ``ur`` and the derived
    ``rc`` are closure constants, so loops over components unroll and the
    per-thread accumulators stay in registers. With ``"regs"`` staging the
    block is ``tpb // 32`` warps of ``rows`` rows each over tiles of ``ppl``
    × 32 pixels (``ppl`` pixels per lane, 32 apart), loading the next tile
    ahead when ``prefetch``; ``exact`` (the warps' rows cover exactly m)
    leaves out the code for a partial last warp.
    """
    nbt = numba.float32 if dtype_name == "float32" else numba.float64
    isz = 4 if dtype_name == "float32" else 8
    rc = _rows_per_chunk(tpb, n, isz)
    ng = tpb // rc  # column groups in the P reduction
    tp1 = tpb + 1  # padded row stride of the X staging buffer (bank conflicts)
    nn = n * n
    tile = staging == "tile"
    regs = staging == "regs"
    xrows, xcols = (1, 1) if tile else (rc, tp1)  # the static row-chunk buffer ("rows" staging only)
    # "regs": 32-pixel tiles, RG warps of RPG rows; each thread finishes KPT of
    # the n components of its pixel (components g, g + RG, ...).
    TW = REGS_TILE
    PPL = max(1, int(ppl)) if regs else 1  # pixels per lane: a tile is PPL · 32 pixels wide
    TWP = TW * PPL
    RG = max(1, tpb // TW)
    RPG = max(1, rows)
    XV = RPG * PPL  # X values a thread holds per tile
    KPT = -(-n // RG)
    VPT = RPG * n  # P partial sums per thread
    PREFETCH = bool(prefetch)
    KN = KPT * n  # G partial sums per thread
    # the lane reduction of the partials at the end of a "regs" sweep: RE of a
    # thread's sums per round, NRP rounds for P, NRG for G
    RE = regs_reduce_entries(tpb, isz)
    NRP = -(-VPT // RE)
    NRG = -(-KN // RE)
    rdshape = (RG, RE, TW + 1) if regs else (1, 1, 1)
    sshape = (2 * n, TWP) if regs else (n, tpb)  # S columns of the tile (old and new with "regs")
    if regs:
        xrows, xcols = RG * n, TWP  # the warps' partial A'ᵀX_j
        load_rows, share_rows, sum_shares = regs_helpers(dtype_name, n, RG, RPG, exact)

        @(cuda.jit(device=True) if _in_simulator() else cuda.jit(device=True, forceinline=True))
        def load_tile(X, p, row0, c, lane, m, t, xr):
            """Tile ``c``'s values of X for this thread (its ``PPL`` pixels, 32 apart) into ``xr``."""
            for q in range(PPL):
                j = c * TWP + q * TW + lane
                load_rows(X, p, row0, j, j < t, m, xr, q * RPG)
    # Cap registers at 128 per thread (at least 512 resident threads per SM;
    # ``occ`` raises that):
    # unbounded, NVVM unrolls the reductions up to ~220-240 registers, which
    # would leave one or two blocks per SM for a bandwidth-bound kernel.
    # (ptxas -v at sm_90: 128 registers, no spills in float32, a 48-byte
    # stack in float64.) The simulator's jit has no launch_bounds.
    bounds = (tpb, max(1, occ // tpb))
    kjit = cuda.jit if _in_simulator() else functools.partial(cuda.jit, launch_bounds=bounds)

    @cuda.jit(device=True)
    def lane_round(Rd, vals, nvals, rnd, g, lane):
        """Round ``rnd`` of a lane reduction: this thread's sums ``vals[rnd·RE ...]``
        (of ``nvals``) into column ``lane`` of its warp's slab of ``Rd``; ends with a barrier."""
        for e in range(RE):
            if rnd * RE + e < nvals:
                Rd[g, e, lane] = vals[rnd * RE + e]
        cuda.syncthreads()

    @cuda.jit(device=True)
    def lane_total(Rd, g, lane):
        """Entry ``lane`` of the round, summed over the warp's lanes in lane order."""
        acc = nbt(0)
        for ll in range(TW):
            acc += Rd[g, lane, ll]
        return acc

    @cuda.jit(device=True)
    def s_eps(eps, pen):
        """The S update's ε: ``eps`` itself without a penalty, ``ε + l1_S`` (``pen[0]``) with one."""
        if pen is None:
            return eps
        return pen[0]

    @cuda.jit(device=True)
    def a_update(Ash, Psh, Gsh, Hsh, W, wp, m, eps, pen, tid):
        """``A' = A ⊙ W ⊙ P ⊘ (A (G + l2_A I) + ε_A)`` in shared memory, then ``H = A'ᵀA' + l2_S I``.

        ``eps`` is the A update's ε (``ε + l1_A`` with a penalty). ``pen`` is
        None (plain MU) or ``(ε + l1_S, l2_A, l2_S)`` in the arrays' dtype
        (see :func:`mu_run`); with None, Numba prunes the ``pen is not None``
        branches before typing, so the unpenalised kernels hold no penalty
        code at all. ``Gsh`` stays ``S Sᵀ`` (l2_A is added as G is read) and
        ``Hsh``, read only by the S update, gets l2_S on its diagonal once
        it is complete. Consumes the block's ``Psh``, ``Gsh`` and leaves them
        zeroed for the next sweep's accumulation. Ends with a barrier.
        """
        arow = cuda.local.array(n, nbt)
        for i in range(tid, m, tpb):  # rows are independent: one thread per row
            for k in range(n):
                arow[k] = Ash[i * n + k]
            for k in range(n):
                e = eps
                for l in range(n):
                    e += arow[l] * Gsh[l, k]
                if pen is not None:
                    # l2_A on G's diagonal, (A (G + l2_A I))_ik = (A G)_ik + l2_A A_ik: one
                    # FMA per entry of A (per row, not per pixel), and G itself unshifted
                    e += arow[k] * pen[1]
                Ash[i * n + k] = arow[k] * W[wp, i, k] * Psh[i * n + k] / e
        cuda.syncthreads()
        for q in range(tid, nn, tpb):
            k = q // n
            l = q % n
            h = nbt(0)
            for i in range(m):
                h += Ash[i * n + k] * Ash[i * n + l]
            Hsh[k, l] = h
        # P and G were read before the barrier above: clear them for the sweep.
        for q in range(tid, m * n, tpb):
            Psh[q] = 0
        for q in range(tid, nn, tpb):
            Gsh[q // n, q % n] = 0
        cuda.syncthreads()
        if pen is not None:
            # l2_S once on the complete H (each entry was one thread's whole sum), after the
            # barrier and with one more: added inside the H loop, on the summing thread, it made
            # NVVM reshape the kernel (mu_block_pen "rows" f32 spilled 232 B per thread at sm_90)
            if tid < n:
                Hsh[tid, tid] += pen[2]
            cuda.syncthreads()

    @cuda.jit(device=True)
    def add_gram(Gsh, gl, tid):
        """Add each thread's upper-triangle ``S' S'ᵀ`` partials ``gl`` into the block's
        ``Gsh`` and mirror it to the lower triangle (a barrier in between)."""
        for k in range(n):
            for l in range(k, n):
                cuda.atomic.add(Gsh, (k, l), gl[k * n + l])
        cuda.syncthreads()
        for q in range(tid, nn, tpb):
            k = q // n
            l = q % n
            if l < k:
                Gsh[k, l] = Gsh[l, k]

    @cuda.jit(device=True)
    def sweep(X, S, So, p, Ash, Hsh, Psh, Gsh, Ssh, Xsh, Xt, Rd, c0, cstep, c1, m, t, eps, update, accumulate,
              tid):
        """Tiles ``c0, c0 + cstep, ...`` (below ``c1``) of problem ``p``: S update into ``So`` (when ``update``;
        ``So`` may be ``S``)
        and accumulation of ``P += X S'ᵀ``, ``G += S' S'ᵀ`` into ``Psh``, ``Gsh``
        (when ``accumulate``; both flags are uniform over the block, so the
        barriers below are reached by every thread). ``eps`` is the S update's
        ε (``ε + l1_S`` with a penalty, whose l2_S :func:`a_update` has put on
        ``Hsh``'s diagonal): the per-pixel loops never see the penalty. Ends
        with a barrier."""
        s = cuda.local.array(n, nbt)
        r = cuda.local.array(n, nbt)
        pa = cuda.local.array(n, nbt)
        gl = cuda.local.array(nn, nbt)
        xs = cuda.local.array(ur, nbt)
        for q in range(nn):
            gl[q] = 0
        ii = tid % rc  # row of the staged chunk this thread reduces
        g = tid // rc  # its column group
        ntiles = min((t + tpb - 1) // tpb, c1)
        for c in range(c0, ntiles, cstep):
            j = c * tpb + tid
            valid = j < t
            if valid:
                for k in range(n):
                    s[k] = S[p, k, j]
                if update:
                    for k in range(n):
                        r[k] = 0
                    i0 = 0
                    if ur > 1:  # ur independent loads in flight before their first use
                        while i0 + ur <= m:
                            for u in range(ur):
                                xs[u] = X[p, i0 + u, j]
                            for u in range(ur):
                                for k in range(n):
                                    r[k] += Ash[(i0 + u) * n + k] * xs[u]
                            i0 += ur
                    for i in range(i0, m):  # A'ᵀ X_j: the one DRAM read of X
                        x = X[p, i, j]
                        for k in range(n):
                            r[k] += Ash[i * n + k] * x
                    for k in range(n):
                        d = eps
                        for l in range(n):
                            d += Hsh[k, l] * s[l]
                        r[k] = s[k] * r[k] / d
                    for k in range(n):
                        So[p, k, j] = r[k]
                else:
                    for k in range(n):
                        r[k] = s[k]
                for k in range(n):
                    Ssh[k, tid] = r[k]
                if accumulate:
                    for k in range(n):
                        for l in range(k, n):
                            gl[k * n + l] += r[k] * r[l]
            else:
                for k in range(n):
                    Ssh[k, tid] = 0
            if accumulate:
                cuda.syncthreads()  # the tile's S' columns are all in Ssh
                for r0 in range(0, m, rc):
                    rows = min(rc, m - r0)
                    for q in range(rows):  # stage X rows (coalesced; an L1/L2 hit)
                        Xsh[q, tid] = X[p, r0 + q, j] if valid else 0
                    cuda.syncthreads()
                    if ii < rows:
                        for k in range(n):
                            pa[k] = 0
                        for jj in range(g, tpb, ng):
                            x = Xsh[ii, jj]
                            for k in range(n):
                                pa[k] += x * Ssh[k, jj]
                        for k in range(n):
                            cuda.atomic.add(Psh, (r0 + ii) * n + k, pa[k])
                    cuda.syncthreads()  # before Xsh / Ssh are overwritten
        if accumulate:
            add_gram(Gsh, gl, tid)
        cuda.syncthreads()

    @cuda.jit(device=True)
    def sweep_tile(X, S, So, p, Ash, Hsh, Psh, Gsh, Ssh, Xsh, Xt, Rd, c0, cstep, c1, m, t, eps, update, accumulate,
                   tid):
        """:func:`sweep` with ``"tile"`` staging: the S update copies each X value it
        loads into the shared tile ``Xt`` (row stride ``tpb + 1``), and row-owner
        threads reduce ``P`` from it in registers kept over all tiles. Needs ``m ≤ tpb``."""
        s = cuda.local.array(n, nbt)
        r = cuda.local.array(n, nbt)
        pa = cuda.local.array(n, nbt)
        gl = cuda.local.array(nn, nbt)
        xs = cuda.local.array(ur, nbt)
        for q in range(nn):
            gl[q] = 0
        for k in range(n):
            pa[k] = 0
        npart = tpb // m  # threads per row of P (m ≤ tpb)
        row = tid % m
        part = tid // m
        owner = part < npart
        ntiles = min((t + tpb - 1) // tpb, c1)
        for c in range(c0, ntiles, cstep):
            j = c * tpb + tid
            valid = j < t
            for k in range(n):
                s[k] = S[p, k, j] if valid else 0
                r[k] = 0
            # Load the tile's column (zeros past t), keep it in Xt, and (with
            # `update`) accumulate A'ᵀ X_j on the way: the one read of X.
            i0 = 0
            if ur > 1:  # ur independent loads in flight before their first use
                while i0 + ur <= m:
                    for u in range(ur):
                        xs[u] = X[p, i0 + u, j] if valid else 0
                    for u in range(ur):
                        Xt[(i0 + u) * tp1 + tid] = xs[u]
                        if update:
                            for k in range(n):
                                r[k] += Ash[(i0 + u) * n + k] * xs[u]
                    i0 += ur
            for i in range(i0, m):
                x = X[p, i, j] if valid else 0
                Xt[i * tp1 + tid] = x
                if update:
                    for k in range(n):
                        r[k] += Ash[i * n + k] * x
            if update:
                for k in range(n):
                    d = eps
                    for l in range(n):
                        d += Hsh[k, l] * s[l]
                    r[k] = s[k] * r[k] / d  # 0 past t: s = 0
                if valid:
                    for k in range(n):
                        So[p, k, j] = r[k]
            else:
                for k in range(n):
                    r[k] = s[k]
            if accumulate:
                for k in range(n):
                    Ssh[k, tid] = r[k]
                for k in range(n):
                    for l in range(k, n):
                        gl[k * n + l] += r[k] * r[l]
                cuda.syncthreads()  # the tile of X and its S' columns are complete
                if owner:
                    for jj in range(part, tpb, npart):
                        x = Xt[row * tp1 + jj]
                        for k in range(n):
                            pa[k] += x * Ssh[k, jj]
                cuda.syncthreads()  # before the next tile overwrites Xt and Ssh
        if accumulate:
            if owner:
                for k in range(n):
                    cuda.atomic.add(Psh, row * n + k, pa[k])
            add_gram(Gsh, gl, tid)
        cuda.syncthreads()

    @cuda.jit(device=True)
    def sweep_regs(X, S, So, p, Ash, Hsh, Psh, Gsh, Ssh, Xsh, Xt, Rd, c0, cstep, c1, m, t, eps, update, accumulate,
                   tid):
        """:func:`sweep` with ``"regs"`` staging: warp ``g`` holds rows ``g·RPG ...`` of the
        tile's ``PPL·32`` pixel columns (lane ``l`` has columns ``l, l + 32, ...``) in registers.

        Per tile: every thread loads its ``PPL·RPG`` values of X at once and forms
        its rows' share of ``A'ᵀX_j`` for each of its columns; after a barrier the threads of components
        ``k ≡ g (mod RG)`` sum the warps' shares and update ``S'_kj``; after a
        second barrier every thread adds ``x·S'_j`` to its rows' P partials and
        the component threads add row k of ``S'_j S'_jᵀ`` to theirs. The
        partials stay in registers over all the block's tiles and reach the
        block's ``Psh``, ``Gsh`` once at the end, summed over lanes through
        ``Rd``. ``Ssh`` rows ``0..n-1`` hold the tile's old S, ``n..2n-1`` the
        new; ``Xsh`` the warps' shares.
        """
        zero = nbt(0)
        lane = tid % TW
        g = tid // TW
        row0 = g * RPG
        xr = cuda.local.array(XV, nbt)  # the tile's values of X: PPL pixels × RPG rows
        xn = cuda.local.array(XV, nbt)  # the next tile's values (prefetch)
        pa = cuda.local.array(VPT, nbt)
        sp = cuda.local.array(n, nbt)
        gl = cuda.local.array(KN, nbt)
        for q in range(VPT):
            pa[q] = 0
        for q in range(KN):
            gl[q] = 0
        ntiles = min((t + TWP - 1) // TWP, c1)  # tiles below c1 only
        if PREFETCH and c0 < ntiles:
            load_tile(X, p, row0, c0, lane, m, t, xn)
        for c in range(c0, ntiles, cstep):
            base = c * TWP
            if PREFETCH:
                for v in range(XV):
                    xr[v] = xn[v]
                cn = c + cstep
                if cn < ntiles:  # in flight through this tile's barriers and arithmetic
                    load_tile(X, p, row0, cn, lane, m, t, xn)
            else:
                load_tile(X, p, row0, c, lane, m, t, xr)  # all of the thread's loads in flight together
            for q in range(PPL):  # pixel q·32 + lane of the tile
                col = q * TW + lane
                j = base + col
                for kk in range(KPT):
                    k = g + kk * RG
                    if k < n:
                        Ssh[k, col] = S[p, k, j] if j < t else zero
            if update:
                for q in range(PPL):
                    share_rows(Ash, row0, m, xr, q * RPG, Xsh, g, q * TW + lane)
            cuda.syncthreads()  # the warps' shares and the old S columns are complete
            for q in range(PPL):
                col = q * TW + lane
                j = base + col
                for kk in range(KPT):
                    k = g + kk * RG
                    if k < n:
                        v = Ssh[k, col]
                        if update:
                            num = sum_shares(Xsh, k, col)
                            d = eps
                            for l in range(n):
                                d += Hsh[k, l] * Ssh[l, col]
                            v = v * num / d  # 0 past t: the old S is 0 there
                            if j < t:
                                So[p, k, j] = v
                        Ssh[n + k, col] = v
            cuda.syncthreads()  # the new S columns are complete
            if accumulate:
                for q in range(PPL):
                    col = q * TW + lane
                    for k in range(n):
                        sp[k] = Ssh[n + k, col]
                    for r in range(RPG):
                        for k in range(n):
                            pa[r * n + k] += xr[q * RPG + r] * sp[k]
                    for kk in range(KPT):
                        k = g + kk * RG
                        if k < n:
                            sk = Ssh[n + k, col]
                            for l in range(n):
                                gl[kk * n + l] += sk * sp[l]
            # No third barrier: the next tile writes Xsh and Ssh[:n] (read here
            # between the two barriers) after passing this tile's second, and
            # Ssh[n:] after its own first, which every thread reaches only when
            # done with the reads above.
        if accumulate:
            # The lanes of a warp hold partials of the same entries (its rows of
            # P, its components' rows of G): summed over lanes in lane order
            # through Rd, RE entries per round, each added by the one thread
            # that owns it. Shared-memory float atomics compile to
            # compare-and-swap loops on sm_90 (ATOMS.CAST.SPIN), 32-way
            # contended for G: thousands of cycles per sweep, which a W1
            # iteration (a tile or two per block) would pay at every launch.
            for rnd in range(NRP):
                lane_round(Rd, pa, VPT, rnd, g, lane)
                v = rnd * RE + lane
                if lane < RE and v < VPT and row0 + v // n < m:
                    Psh[(row0 + v // n) * n + v % n] += lane_total(Rd, g, lane)
                cuda.syncthreads()
            for rnd in range(NRG):
                lane_round(Rd, gl, KN, rnd, g, lane)
                v = rnd * RE + lane
                k = g + (v // n) * RG
                if lane < RE and v < KN and k < n:
                    Gsh[k, v % n] += lane_total(Rd, g, lane)
                cuda.syncthreads()
        cuda.syncthreads()

    sweep_fn = sweep_regs if regs else (sweep_tile if tile else sweep)

    @cuda.jit(device=True)
    def block_body(X, A, S, W, P, G, n_iter, eps, pg_valid, acc_last, pen):
        """One persistent block per problem: all ``n_iter`` iterations in one launch
        (``mu_block``, ``mu_block_pen``; ``eps`` and ``pen`` as in :func:`a_update`)."""
        eps_s = s_eps(eps, pen)
        p = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        m = X.shape[1]
        t = X.shape[2]
        dyn = cuda.shared.array(0, nbt)
        Ash = dyn[: m * n]
        Psh = dyn[m * n : 2 * m * n]
        Gsh = cuda.shared.array((n, n), nbt)
        Hsh = cuda.shared.array((n, n), nbt)
        Ssh = cuda.shared.array(sshape, nbt)
        Xsh = cuda.shared.array((xrows, xcols), nbt)
        Rd = cuda.shared.array(rdshape, nbt)  # "regs": the lane reduction
        Xt = dyn[2 * m * n :]  # the X tile ("tile" staging; empty otherwise)
        wp = 0 if W.shape[0] == 1 else p
        for q in range(tid, m * n, tpb):
            Ash[q] = A[p, q // n, q % n]
            Psh[q] = P[p, q // n, q % n] if pg_valid else 0
        for q in range(tid, nn, tpb):
            Gsh[q // n, q % n] = G[p, q // n, q % n] if pg_valid else 0
        cuda.syncthreads()
        # it = -1 is the P/G pass over the initial S (no update); one call
        # site for sweep keeps the register allocation of a single copy.
        for it in range(0 if pg_valid else -1, n_iter):
            if it >= 0:
                a_update(Ash, Psh, Gsh, Hsh, W, wp, m, eps, pen, tid)
            # the P/G pass (it = -1) always accumulates: with n_iter = 0 its P, G are the result
            sweep_fn(X, S, S, p, Ash, Hsh, Psh, Gsh, Ssh, Xsh, Xt, Rd, 0, 1, t, m, t, eps_s, it >= 0,
                     acc_last or it < n_iter - 1 or it < 0, tid)
        for q in range(tid, m * n, tpb):
            A[p, q // n, q % n] = Ash[q]
        if acc_last or n_iter == 0:
            for q in range(tid, m * n, tpb):
                P[p, q // n, q % n] = Psh[q]
            for q in range(tid, nn, tpb):
                G[p, q // n, q % n] = Gsh[q // n, q % n]

    # Each MU kernel comes twice: plain, with the signature the benchmarks and
    # tools compile (bench/sass_report.py), and "_pen" with the penalty's three
    # scalars as trailing kernel parameters (``eps`` then is ε + l1_A). Both
    # inline the same body; the plain one passes ``pen = None``, which compiles
    # the penalty code out, so it is the same machine code as before penalties
    # existed, and the "_pen" one is compiled only when a penalty is used.
    @kjit
    def mu_block(X, A, S, W, P, G, n_iter, eps, pg_valid, acc_last):
        """One persistent block per problem: all ``n_iter`` iterations in one launch."""
        block_body(X, A, S, W, P, G, n_iter, eps, pg_valid, acc_last, None)

    @kjit
    def mu_block_pen(X, A, S, W, P, G, n_iter, eps, pg_valid, acc_last, eps_s, l2a, l2s):
        """:func:`mu_block` with L1/L2 penalties: ``eps`` is ε + l1_A, ``eps_s`` ε + l1_S."""
        block_body(X, A, S, W, P, G, n_iter, eps, pg_valid, acc_last, (eps_s, l2a, l2s))

    @cuda.jit(device=True)
    def grid_body(X, S, So, W, Ai, Pi, Gi, Ao, Po, Go, Pz, Gz, clear, eps, update, accumulate, pen):
        """One iteration (or, with ``update`` false, the P/G pass over S) by block
        ``blockIdx.x`` of ``gridDim.x`` on problem ``blockIdx.y``.

        Reads ``Ai``, ``Pi``, ``Gi``; block 0 writes ``A'`` to ``Ao``; S' goes
        to ``So``; the block's P, G partials are added to ``Po``, ``Go``
        (which start at zero) when ``accumulate``; with ``clear``, block 0
        zeroes ``Pz``, ``Gz`` for a later launch. All arrays 3-D, per problem.
        ``eps``, ``pen``: as in :func:`a_update` (every block shifts its own H).
        """
        eps_s = s_eps(eps, pen)
        bx = cuda.blockIdx.x
        p = cuda.blockIdx.y
        nbx = cuda.gridDim.x
        tid = cuda.threadIdx.x
        m = X.shape[1]
        t = X.shape[2]
        dyn = cuda.shared.array(0, nbt)
        Ash = dyn[: m * n]
        Psh = dyn[m * n : 2 * m * n]
        Gsh = cuda.shared.array((n, n), nbt)
        Hsh = cuda.shared.array((n, n), nbt)
        Ssh = cuda.shared.array(sshape, nbt)
        Xsh = cuda.shared.array((xrows, xcols), nbt)
        Rd = cuda.shared.array(rdshape, nbt)  # "regs": the lane reduction
        Xt = dyn[2 * m * n :]  # the X tile ("tile" staging; empty otherwise)
        wp = 0 if W.shape[0] == 1 else p
        if update:
            for q in range(tid, m * n, tpb):
                Ash[q] = Ai[p, q // n, q % n]
                Psh[q] = Pi[p, q // n, q % n]
            for q in range(tid, nn, tpb):
                Gsh[q // n, q % n] = Gi[p, q // n, q % n]
            cuda.syncthreads()
            a_update(Ash, Psh, Gsh, Hsh, W, wp, m, eps, pen, tid)
            if bx == 0:
                for q in range(tid, m * n, tpb):
                    Ao[p, q // n, q % n] = Ash[q]
        else:
            for q in range(tid, m * n, tpb):
                Psh[q] = 0
            for q in range(tid, nn, tpb):
                Gsh[q // n, q % n] = 0
            cuda.syncthreads()
        if clear and bx == 0:
            for q in range(tid, m * n, tpb):
                Pz[p, q // n, q % n] = 0
            for q in range(tid, nn, tpb):
                Gz[p, q // n, q % n] = 0
        sweep_fn(X, S, So, p, Ash, Hsh, Psh, Gsh, Ssh, Xsh, Xt, Rd, bx, nbx, t, m, t, eps_s, update, accumulate,
                 tid)
        if accumulate:
            for q in range(tid, m * n, tpb):
                cuda.atomic.add(Po, (p, q // n, q % n), Psh[q])
            for q in range(tid, nn, tpb):
                cuda.atomic.add(Go, (p, q // n, q % n), Gsh[q // n, q % n])

    @cuda.jit(device=True)
    def ring_body(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate, pen):
        """One in-place iteration of the grid-mode loop (see :func:`grid_body`).

        Reads ``Ar[phase % 2]``, ``Pr/Gr[phase % 3]``; writes
        ``Ar[(phase + 1) % 2]`` (block 0 only), adds into
        ``Pr/Gr[(phase + 1) % 3]`` and clears ``Pr/Gr[(phase + 2) % 3]`` for
        the next launch. No launch touches a buffer both ways.
        """
        cur = phase % 3
        nxt = (phase + 1) % 3
        old = (phase + 2) % 3
        grid_body(X, S, S, W, Ar[phase % 2], Pr[cur], Gr[cur], Ar[(phase + 1) % 2], Pr[nxt], Gr[nxt],
                  Pr[old], Gr[old], True, eps, update, accumulate, pen)

    @kjit
    def mu_grid_step(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate):
        """One in-place iteration of the grid-mode loop (:func:`ring_body`)."""
        ring_body(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate, None)

    @kjit
    def mu_grid_step_pen(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate, eps_s, l2a, l2s):
        """:func:`mu_grid_step` with L1/L2 penalties: ``eps`` is ε + l1_A, ``eps_s`` ε + l1_S."""
        ring_body(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate, (eps_s, l2a, l2s))

    TWK = TWP if regs else tpb  # pixels per tile of the sweep

    @cuda.jit(device=True)
    def flat_body(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate, pen):
        """:func:`mu_grid_step` with the batch's tiles dealt evenly over a 1-D grid
        (``mu_flat_step``, ``mu_flat_step_pen``; ``eps``, ``pen`` as in :func:`a_update`).

        The ``b · tiles`` (problem, tile) pairs, problem-major, are cut into
        ``gridDim.x`` contiguous ranges, one per block, so every block has the
        same work (± one tile) however the block count divides the batch. A
        range crossing problems is run as one segment per problem: the A
        update of that problem, its tiles, its P/G partials added to the
        accumulators. The block holding a problem's tile 0 writes its ``A'``
        and clears its ring slot, as block 0 does in grid mode.
        """
        # ring slots indexed in place: sliced views would keep nine array descriptors live
        # across the segment loop (ptxas then spilled ~500 B per thread)
        ai, ao = phase % 2, (phase + 1) % 2
        cur, nxt, old = phase % 3, (phase + 1) % 3, (phase + 2) % 3
        eps_s = s_eps(eps, pen)
        tid = cuda.threadIdx.x
        b = X.shape[0]
        m = X.shape[1]
        t = X.shape[2]
        nt = (t + TWK - 1) // TWK
        total = b * nt
        g = cuda.blockIdx.x
        nb = cuda.gridDim.x
        lo = (g * total) // nb
        hi = ((g + 1) * total) // nb
        dyn = cuda.shared.array(0, nbt)
        Ash = dyn[: m * n]
        Psh = dyn[m * n : 2 * m * n]
        Gsh = cuda.shared.array((n, n), nbt)
        Hsh = cuda.shared.array((n, n), nbt)
        Ssh = cuda.shared.array(sshape, nbt)
        Xsh = cuda.shared.array((xrows, xcols), nbt)
        Rd = cuda.shared.array(rdshape, nbt)
        Xt = dyn[2 * m * n :]
        q0 = lo
        while q0 < hi:  # one segment per problem in the range (uniform over the block)
            p = q0 // nt
            c_lo = q0 - p * nt
            c_hi = min(nt, hi - p * nt)
            wp = 0 if W.shape[0] == 1 else p
            if update:
                for q in range(tid, m * n, tpb):
                    Ash[q] = Ar[ai, p, q // n, q % n]
                    Psh[q] = Pr[cur, p, q // n, q % n]
                for q in range(tid, nn, tpb):
                    Gsh[q // n, q % n] = Gr[cur, p, q // n, q % n]
                cuda.syncthreads()
                a_update(Ash, Psh, Gsh, Hsh, W, wp, m, eps, pen, tid)
                if c_lo == 0:
                    for q in range(tid, m * n, tpb):
                        Ar[ao, p, q // n, q % n] = Ash[q]
            else:
                for q in range(tid, m * n, tpb):
                    Psh[q] = 0
                for q in range(tid, nn, tpb):
                    Gsh[q // n, q % n] = 0
                cuda.syncthreads()
            if c_lo == 0:
                for q in range(tid, m * n, tpb):
                    Pr[old, p, q // n, q % n] = 0
                for q in range(tid, nn, tpb):
                    Gr[old, p, q // n, q % n] = 0
            sweep_fn(X, S, S, p, Ash, Hsh, Psh, Gsh, Ssh, Xsh, Xt, Rd, c_lo, 1, c_hi, m, t, eps_s, update,
                     accumulate, tid)
            if accumulate:
                for q in range(tid, m * n, tpb):
                    cuda.atomic.add(Pr, (nxt, p, q // n, q % n), Psh[q])
                for q in range(tid, nn, tpb):
                    cuda.atomic.add(Gr, (nxt, p, q // n, q % n), Gsh[q // n, q % n])
            cuda.syncthreads()  # the partials are read before the next segment overwrites them
            q0 = (p + 1) * nt

    @kjit
    def mu_flat_step(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate):
        """:func:`mu_grid_step` with the batch's tiles dealt evenly over a 1-D grid (:func:`flat_body`)."""
        flat_body(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate, None)

    @kjit
    def mu_flat_step_pen(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate, eps_s, l2a, l2s):
        """:func:`mu_flat_step` with L1/L2 penalties: ``eps`` is ε + l1_A, ``eps_s`` ε + l1_S."""
        flat_body(X, S, W, Ar, Pr, Gr, phase, eps, update, accumulate, (eps_s, l2a, l2s))

    @kjit
    def layer_step(X, S, So, W, A, P, G, Ao, Po, Go, eps, update, accumulate):
        """One out-of-place iteration (a learned-MU layer's forward) in one launch.

        ``A``, ``P``, ``G``, ``S`` are read only; ``A'`` goes to ``Ao``, ``S'``
        to ``So``, and (with ``accumulate``) ``X S'ᵀ``, ``S'S'ᵀ`` are added to
        ``Po``, ``Go``, which the caller zeroes. With ``update`` false it is
        the P/G pass over S alone (``Ao``, ``So`` untouched).
        """
        # no penalty (the learned layers' forward): the same code as mu_grid_step's plain body
        grid_body(X, S, So, W, A, P, G, Ao, Po, Go, Po, Go, False, eps, update, accumulate, None)

    @cuda.jit(device=True)
    def block_add(red, acc, out, p):
        """``out[p] += Σ acc`` over the block's threads: a tree reduction in shared memory
        ``red`` (no warp shuffles: simulator-safe), one atomic add per block."""
        tid = cuda.threadIdx.x
        red[tid] = acc
        cuda.syncthreads()
        half = tpb // 2
        while half > 0:
            if tid < half:
                red[tid] += red[tid + half]
            cuda.syncthreads()
            half //= 2
        if tid == 0:
            cuda.atomic.add(out, p, red[0])
        cuda.syncthreads()  # red[0] is read before the next problem overwrites red

    @cuda.jit
    def sumsq(X, out):
        """``out[p] += Σ X[p]²`` in float64, ``gridDim.x`` blocks per problem; problems
        ``blockIdx.y, blockIdx.y + gridDim.y, ...`` (the grid's y extent is capped)."""
        b = X.shape[0]
        m = X.shape[1]
        t = X.shape[2]
        red = cuda.shared.array(tpb, numba.float64)
        start = cuda.blockIdx.x * tpb + cuda.threadIdx.x
        stride = cuda.gridDim.x * tpb
        for p in range(cuda.blockIdx.y, b, cuda.gridDim.y):  # uniform over the block
            acc = 0.0
            for q in range(start, m * t, stride):
                x = numba.float64(X[p, q // t, q % t])
                acc += x * x
            block_add(red, acc, out, p)

    @cuda.jit
    def residsq(X, A, S, out):
        """``out[p] += ‖X[p] − A[p] S[p]‖²`` in float64 (for float32 runs' ``tol``: see
        :func:`residual_squares`); the grid as :func:`sumsq`'s."""
        b = X.shape[0]
        m = X.shape[1]
        t = X.shape[2]
        n = A.shape[2]
        red = cuda.shared.array(tpb, numba.float64)
        start = cuda.blockIdx.x * tpb + cuda.threadIdx.x
        stride = cuda.gridDim.x * tpb
        for p in range(cuda.blockIdx.y, b, cuda.gridDim.y):  # uniform over the block
            acc = 0.0
            for q in range(start, m * t, stride):  # consecutive threads, consecutive pixels of a row
                i = q // t
                j = q % t
                y = 0.0
                for k in range(n):
                    y += numba.float64(A[p, i, k]) * numba.float64(S[p, k, j])
                d = numba.float64(X[p, i, j]) - y
                acc += d * d
            block_add(red, acc, out, p)

    @cuda.jit
    def zero(Z):
        """``Z[:] = 0`` for a 1-D device array (used on flattened ring buffers)."""
        q = cuda.grid(1)
        if q < Z.shape[0]:
            Z[q] = 0

    return _Kernels(
        tpb=tpb, n=n, rc=rc, launch_bounds=bounds, mu_block=mu_block, mu_grid_step=mu_grid_step,
        mu_flat_step=mu_flat_step, layer_step=layer_step, sumsq=sumsq, residsq=residsq, zero=zero,
        mu_block_pen=mu_block_pen, mu_grid_step_pen=mu_grid_step_pen, mu_flat_step_pen=mu_flat_step_pen,
        device_funcs={"a_update": a_update, "sweep": sweep_fn},
    )


# --------------------------------------------------------------------------- host side


def _check_args(
    X: Any, A: Any, S: Any, W: Any, P: Any, G: Any, allow_torch: bool = False,
) -> tuple[int, int, int, int]:
    """Shapes and dtypes of the kernel arguments; ValueError/TypeError naming the problem.

    Arrays are Numba device arrays, or with ``allow_torch`` all torch CUDA tensors.
    """
    for name, arr, nd in (("X", X, 3), ("A", A, 3), ("S", S, 3), ("W", W, 3), ("P", P, 3), ("G", G, 3)):
        if not (cuda.devicearray.is_cuda_ndarray(arr) or (allow_torch and is_torch(arr))):
            raise TypeError(
                f"{name} must be a Numba CUDA device array (numba.cuda.to_device / as_cuda_array)"
                f"{' or a torch tensor' if allow_torch else ''}, got {type(arr).__name__}"
            )
        if len(arr.shape) != nd:
            raise ValueError(f"{name} must be {nd}-D, got shape {tuple(arr.shape)}")
        if not is_c_contiguous(arr):
            raise ValueError(f"{name} must be C-contiguous")
        if np_dtype(arr) != np_dtype(X):
            raise TypeError(f"{name} has dtype {arr.dtype} but X has {X.dtype}; all arrays need one dtype")
    if np_dtype(X) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"the CUDA kernels compute in float32 or float64, got {X.dtype}")
    b, m, t = X.shape
    n = A.shape[2]
    if n > MAX_N:
        raise ValueError(
            f"the CUDA kernels support at most n = {MAX_N} components (per-thread register "
            f"accumulators), got n = {n}; use backend='cpu' or 'torch' for larger ranks"
        )
    want = {"A": (b, m, n), "S": (b, n, t), "P": (b, m, n), "G": (b, n, n)}
    for name, arr in (("A", A), ("S", S), ("P", P), ("G", G)):
        if tuple(arr.shape) != want[name]:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {want[name]}")
    if tuple(W.shape[1:]) != (m, n) or W.shape[0] not in (1, b):
        raise ValueError(f"W has shape {tuple(W.shape)}, expected (1, {m}, {n}) or ({b}, {m}, {n})")
    return b, m, t, n


def _multiprocessors() -> int:
    """SM count of the current device (a nominal 2 in the simulator, which has none)."""
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:
        return 2


#: tiles per block of one wave from which the automatic launch design is ``"flat"``
FLAT_MIN_TILES = 64


def choose_mode(
    b: int, t: int, threads: int | None = None, resident: int | None = None, flat_ok: bool = True,
) -> tuple[str, int]:
    """The launch design and blocks per problem for ``b`` problems of ``t`` pixels.

    ``"flat"`` returns the number of blocks *in all*: ``blocks_per_problem · b``
    when that is set, else one wave (``resident`` or 8 per SM). Launch sites
    without a flat kernel (a learned layer's forward) pass ``flat_ok=False``
    and get grid mode's choice.

    Automatic (``"regs"``, given ``resident``): flat mode when one wave of
    blocks would get at least :data:`FLAT_MIN_TILES` tiles each, else grid
    mode. Measured on an H200 (``bench/results/mu_gpu_sweep_batches_h200.json``,
    ``mu_gpu_h200_regs.json``; 65 × 16384, 64-pixel tiles, 396 blocks):
    150 problems (97 tiles per block) ran 0.439 ms per iteration in flat
    mode against 0.450 in grid mode in the sweep, 0.398 against 0.423 over
    10 000 iterations; 25 problems (16 per block) 0.157 against 0.124, and
    one or four problems were slower in flat mode too. Between 16 and 97
    tiles per block nothing was measured.

    ``threads`` is the pixel tile width (the threads per block except with
    ``"regs"`` staging, whose tiles are 32 pixels wide).

    ``resident`` (used for ``"regs"``): blocks per SM the launch bounds
    guarantee. Then the grid is one wave, ``bpp = min(tiles, max(1,
    resident·SMs // b))``: a block there holds 128 registers per thread, so
    only a few fit an SM, and a second, partly filled wave (512 one-tile
    blocks for one 65 × 16384 problem at 3 per SM on 132 SMs) would nearly
    double an iteration. Measured on an H100 (``mu_gpu_sweep_h100.json``, W2):
    0.474 ms per iteration, against 0.483 at 8 or 32 blocks per problem, 0.68
    at 128 and 1.60 at 512.

    Grid mode with about eight blocks per multiprocessor in all
    (``bpp = min(tiles, ceil(8·SMs / b))``), unless a problem is a single
    tile (then one persistent block per problem, which saves the
    per-iteration launches). Measured on an H200 (132 SMs, 128 threads,
    ``bench/results/mu_gpu_sweep_h200.json``): for 150 problems of 128 tiles,
    grid mode at 8 blocks per problem ran 1.39 ms/iteration against 1.46 (32),
    2.48 (128), 3.17 (1) and 4.0 in block mode; for one problem, 128 blocks
    ran 0.076 ms against 0.15 (32) and 2.5 in block mode. Override with
    :func:`set_mode` and :func:`set_blocks_per_problem`.
    """
    tpb = threads or _config.threads
    tiles = -(-t // tpb)
    if _config.mode == "block":
        return "block", 1
    if _config.mode == "auto" and flat_ok and resident and _config.blocks_per_problem is None:
        wave = resident * _multiprocessors()
        if b * tiles >= FLAT_MIN_TILES * wave:
            return "flat", wave
    if _config.mode == "flat" and flat_ok:
        # the number of blocks in all (not per problem): one wave, however it divides the batch
        if _config.blocks_per_problem is not None:
            blocks = _config.blocks_per_problem * b
        else:
            blocks = (resident or 8) * _multiprocessors()
        return "flat", max(1, min(b * tiles, blocks))
    if _config.blocks_per_problem is not None:
        bpp = min(_config.blocks_per_problem, tiles)
    elif resident:
        bpp = min(tiles, max(1, resident * _multiprocessors() // b))
    else:
        bpp = min(tiles, max(1, -(-8 * _multiprocessors() // b)))
    if _config.mode in ("grid", "flat"):
        return "grid", bpp
    if tiles == 1:
        return "block", 1
    return "grid", bpp


def choose_knobs(b: int, bpp: int, staging: str = "rows") -> tuple[int, int]:
    """X-row unroll and occupancy for a launch of ``b × bpp`` blocks (unless set explicitly).

    With several blocks per multiprocessor to schedule, 8-row unrolled loads
    and 2048 resident threads per SM (32 registers) measured best (H200, 150
    problems: 1.07 ms/iteration against 1.39 at unroll 8 / 512 threads and
    1.64 at unroll 1 / 512; ``mu_gpu_sweep_occupancy_h200.json``); with at
    most a few blocks per SM (one problem), the plain loop at 512 threads was
    best (0.076 ms against 0.11–0.13 unrolled at any occupancy).

    With ``"tile"`` staging a block holds about 38 kB of shared memory (m =
    65, float32, 128 threads), so at most six blocks share an SM: the
    automatic occupancy is then 1024 (64 registers), never 2048.
    """
    busy = b * bpp >= 4 * _multiprocessors()
    ur = _config.unroll if _config.unroll is not None else (8 if busy else 1)
    if staging == "regs":  # rows·(n + 1) registers of X and P partials: keep the 128-register cap
        return ur, _config.occupancy or 512
    occ = _config.occupancy if _config.occupancy is not None else (
        (1024 if staging == "tile" else 2048) if busy else 512)
    return ur, occ


def _kernels_for(
    b: int, m: int, t: int, n: int, dtype: np.dtype, flat_ok: bool = True,
) -> tuple[_Kernels, str, int, int]:
    """Kernels, launch mode, blocks per problem (in all, for ``"flat"``) and dynamic shared
    bytes for one launch shape."""
    lay = launch_layout(dtype, m, n, auto_wide=flat_ok)  # the learned layers (no flat kernel) keep 32 pixels
    dyn = dynamic_shared_bytes(dtype, m, n, lay.threads, lay.staging)
    if lay.staging == "regs":
        ur, occ = 1, choose_knobs(b, 1, "regs")[1]  # loads are batched by the layout itself
        mode, bpp = choose_mode(b, t, lay.tile, resident=max(1, occ // lay.threads), flat_ok=flat_ok)
    else:
        mode, bpp = choose_mode(b, t, lay.tile, flat_ok=flat_ok)
        ur, occ = choose_knobs(b, bpp, lay.staging)
    pf = _config.prefetch and lay.staging == "regs"
    exact = lay.staging == "regs" and (lay.threads // REGS_TILE) * lay.rows == m
    return (_build(dtype.name, lay.threads, n, ur, occ, staging=lay.staging, rows=lay.rows, prefetch=pf,
                   exact=exact, ppl=lay.tile // REGS_TILE if lay.staging == "regs" else 1),
            mode, bpp, dyn)


class GridWorkspace:
    """Ring buffers and captured CUDA graphs of the grid-mode path for one set of arrays.

    Keep one per solver state (the engine does) so that repeated
    :func:`mu_run` calls reuse the buffers and graphs instead of allocating
    and capturing again.
    """

    def __init__(self, alloc: Any = None) -> None:
        #: ``alloc(shape, dtype)`` for the ring buffers (default: Numba allocations)
        self.alloc = alloc
        self.key: tuple | None = None
        self.Ar: Any = None
        self.Pr: Any = None
        self.Gr: Any = None
        self.graph: Any = None
        self.graph_key: tuple | None = None

    def prepare(self, b: int, m: int, n: int, dtype: np.dtype, stream: Any) -> None:
        key = (b, m, n, np.dtype(dtype).str)
        if key != self.key:
            alloc = self.alloc or (lambda shape, dt: cuda.device_array(shape, dt, stream=stream))
            self.Ar = alloc((2, b, m, n), dtype)
            self.Pr = alloc((3, b, m, n), dtype)
            self.Gr = alloc((3, b, n, n), dtype)
            self.key = key
            self.graph = None
            self.graph_key = None


def _zero(k: _Kernels, arr: Any, stream: Any) -> None:
    flat = arr.reshape(arr.size)
    nb = -(-flat.shape[0] // k.tpb)
    k.zero[nb, k.tpb, stream](flat)


def _graphs_wanted() -> bool:
    """Whether grid mode should capture CUDA graphs (never in the simulator: it has no streams)."""
    if _config.graphs == "0" or _in_simulator():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        if _config.graphs == "1":
            raise RuntimeError("CUDA graphs were required (FASTMU_CUDA_GRAPHS=1) but CuPy is not installed")
        return False
    return True


def _in_simulator() -> bool:
    """True when Numba runs CUDA kernels in its CPU simulator."""
    return bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


def _capture_graph(launch_range: Any, n_launch: int) -> Any:
    """Capture ``launch_range(stream, 0, n_launch)`` into a CuPy CUDA graph."""
    import cupy

    cap = cupy.cuda.Stream(non_blocking=True)
    nstream = cuda.external_stream(cap.ptr)
    cap.begin_capture(cupy.cuda.runtime.streamCaptureModeRelaxed)
    try:
        launch_range(nstream, 0, n_launch)
    finally:
        graph = cap.end_capture()  # always leave capture mode, even on error
    cap.synchronize()
    return graph


#: ``mu_run``'s default penalty: none (plain MU)
NO_PENALTY: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


def penalty_scalars(dtype: Any, eps: float, penalty: Sequence[float] | None) -> tuple[np.floating, ...] | None:
    """The penalised kernels' scalars ``(ε + l1_A, ε + l1_S, l2_A, l2_S)`` in ``dtype``, or None
    when ``penalty`` (four weights ``(l1_A, l2_A, l1_S, l2_S)``, or None) is all zeros.

    The sums are formed in float64 and rounded once (as the CPU kernel does).
    They are NumPy scalars of the arrays' dtype so that the kernels' float32
    arithmetic stays float32 (a Python float would be typed float64).

    Raises
    ------
    ValueError
        Not four weights, or a negative or non-finite one.
    """
    if penalty is None:
        return None
    weights = tuple(float(v) for v in penalty)
    if len(weights) != 4:
        raise ValueError(f"penalty must be four weights (l1_A, l2_A, l1_S, l2_S), got {penalty!r}")
    l1a, l2a, l1s, l2s = weights
    if not any((l1a, l2a, l1s, l2s)):
        return None
    for name, v in zip(("l1_A", "l2_A", "l1_S", "l2_S"), (l1a, l2a, l1s, l2s)):
        if not (0.0 <= v < float("inf")):  # also refuses NaN
            raise ValueError(f"penalty weight {name} must be a finite number >= 0, got {v!r}")
    f = np.dtype(dtype).type
    return f(eps + l1a), f(eps + l1s), f(l2a), f(l2s)


def mu_run(
    X: Any,
    A: Any,
    S: Any,
    W: Any,
    P: Any,
    G: Any,
    n_iter: int,
    eps: float,
    pg_valid: bool,
    accumulate_last: bool,
    stream: Any = 0,
    workspace: GridWorkspace | None = None,
    penalty: Sequence[float] | None = NO_PENALTY,
) -> None:
    """Run ``n_iter`` fused (learned) MU iterations in place on device arrays ``A`` and ``S``.

    Same semantics as :func:`fastmu.kernels.cpu.mu_run`.

    Parameters
    ----------
    X, A, S, W
        Numba device arrays (see the module docstring). ``A`` and ``S`` are
        overwritten.
    P, G
        ``(b, m, n)`` and ``(b, n, n)``: ``X Sᵀ`` and ``S Sᵀ`` of the current
        S. Read when ``pg_valid`` (carried between calls), recomputed
        otherwise; on return they hold the values for the returned S when
        ``accumulate_last`` or when ``n_iter`` is 0. Never shifted by the
        penalty, so :func:`objective_from_pg` gives the data term and a
        later call may use another penalty on carried P, G.
    n_iter
        Number of iterations (A update, then S update with the new A).
    eps
        ε added to every denominator (cast to the arrays' dtype).
    pg_valid, accumulate_last
        As in the CPU kernel.
    stream
        A Numba stream (e.g. ``numba.cuda.external_stream(ptr)`` of the
        caller's CuPy/torch stream) or 0 for the default stream. Everything is
        queued on it; nothing synchronises the host.
    workspace
        Grid-mode buffers and graphs to reuse between calls (optional).
    penalty
        ``(l1_A, l2_A, l1_S, l2_S)``: the L1/L2 weights of :mod:`fastmu.penalty`
        (a plain tuple, a :class:`~fastmu.penalty.Penalty`, or None for none),
        finite and ≥ 0. The updates become
        ``A ⊙ W ⊙ P ⊘ (A (G + l2_A I) + ε + l1_A)`` and
        ``S ⊙ (A'ᵀX) ⊘ ((A'ᵀA' + l2_S I) S + ε + l1_S)``. All zeros (the
        default) launches the plain kernels: plain (learned) MU, bit for bit.
        Otherwise the ``_pen`` kernels run, with ``ε + l1_A``, ``ε + l1_S``,
        ``l2_A`` and ``l2_S`` (:func:`penalty_scalars`) as kernel parameters:
        the L1 weights join ε, l2_A joins G's diagonal where the A update
        reads it and l2_S the diagonal of ``A'ᵀA'`` once it is complete, so
        nothing is added per pixel.

    Raises
    ------
    ValueError
        ``n`` above :data:`MAX_N`, inconsistent shapes, non-contiguous arrays,
        ``m`` too large for the block's shared memory, or a negative or
        non-finite penalty weight.
    TypeError
        Mixed dtypes or a dtype other than float32/float64.
    """
    b, m, t, n = _check_args(X, A, S, W, P, G)
    n_iter = int(n_iter)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    if n_iter == 0 and pg_valid:
        return
    dtype = np.dtype(X.dtype)
    pen = penalty_scalars(dtype, eps, penalty)
    k, mode, bpp, dyn = _kernels_for(b, m, t, n, dtype)
    if mode == "grid" and b > _MAX_GRID_Y:  # a grid's y extent (the problems) is capped: deal the
        mode, bpp = "flat", bpp * b  # same blocks per problem over a 1-D grid instead
    tpb = k.tpb
    if pen is None:  # the plain kernels, their parameters as before penalties existed
        epsd, extra = dtype.type(eps), ()
        block, grid_step, flat_step = k.mu_block, k.mu_grid_step, k.mu_flat_step
    else:  # ε + l1_A in eps's place; ε + l1_S, l2_A, l2_S trailing (kernel parameters: constant bank)
        epsd, extra = pen[0], pen[1:]
        block, grid_step, flat_step = k.mu_block_pen, k.mu_grid_step_pen, k.mu_flat_step_pen

    if mode == "block":
        block[b, tpb, stream, dyn](X, A, S, W, P, G, n_iter, epsd, bool(pg_valid), bool(accumulate_last), *extra)
        return

    ws = workspace if workspace is not None else GridWorkspace()
    ws.prepare(b, m, n, dtype, stream)
    Ar, Pr, Gr = ws.Ar, ws.Pr, ws.Gr
    kernel, grid = (flat_step, (bpp,)) if mode == "flat" else (grid_step, (bpp, b))

    def step(s: Any, *args: Any) -> None:  # one launch per iteration: without Numba's per-call dispatch
        launch(kernel, grid, tpb, s, dyn, *args, *extra)

    Ar[0].copy_to_device(A, stream=stream)
    if pg_valid:
        Pr[0].copy_to_device(P, stream=stream)
        Gr[0].copy_to_device(G, stream=stream)
    else:
        _zero(k, Pr[0], stream)
        _zero(k, Gr[0], stream)
        # phase 2: accumulates into ring slot 0 and clears slot 1
        step(stream, X, S, W, Ar, Pr, Gr, 2, epsd, False, True)
    if n_iter > 0:
        # slot 1 is cleared by the P/G pass above or must be cleared here; slot 2 by launch 0
        if pg_valid:
            _zero(k, Pr[1], stream)
            _zero(k, Gr[1], stream)

        def launch_range(s: Any, first: int, last: int) -> None:
            for it in range(first, last):
                step(s, X, S, W, Ar, Pr, Gr, it % 6, epsd, True, True)

        n_full = n_iter - 1  # the last launch may skip the P/G accumulation
        done = 0
        if n_full >= _GRAPH_LEN + 6 and _graphs_wanted():
            # Six direct launches first: the kernel is compiled and loaded
            # before capture, and the ring phase is back at 0 afterwards.
            launch_range(stream, 0, 6)
            done = 6
            gkey = (
                _ptr(X), _ptr(S), _ptr(W), _ptr(Ar), _ptr(Pr), _ptr(Gr), float(epsd), grid, tpb, dtype.str,
                # the kernel and its penalty scalars are baked into the captured launches too
                id(kernel), tuple(float(v) for v in extra),
            )
            try:
                if ws.graph_key != gkey:
                    ws.graph = _capture_graph(launch_range, _GRAPH_LEN)
                    ws.graph_key = gkey
                import cupy

                caller = cupy.cuda.ExternalStream(stream_handle(stream))
                while n_full - done >= _GRAPH_LEN:
                    ws.graph.launch(caller)
                    done += _GRAPH_LEN
            except Exception as exc:  # capture unsupported here: fall back to queued launches
                if _config.graphs == "1":
                    raise
                warnings.warn(f"CUDA graph capture failed ({exc}); launching per iteration", RuntimeWarning)
                ws.graph = ws.graph_key = None
        launch_range(stream, done, n_full)
        step(stream, X, S, W, Ar, Pr, Gr, n_full % 6, epsd, True, bool(accumulate_last))
    A.copy_to_device(Ar[n_iter % 2], stream=stream)
    if accumulate_last or n_iter == 0:
        P.copy_to_device(Pr[n_iter % 3], stream=stream)
        G.copy_to_device(Gr[n_iter % 3], stream=stream)


def layer_step(
    X: Any, A: Any, S: Any, W: Any, P: Any, G: Any, A_out: Any, S_out: Any, P_out: Any, G_out: Any,
    eps: float, accumulate: bool, update: bool = True, stream: Any = 0,
) -> None:
    """One out-of-place fused iteration in a single launch (a learned-MU layer's forward).

    ``A_out = A ⊙ W ⊙ P ⊘ (A G + ε)``, ``S_out`` = the S update of ``S``
    with ``A_out``, and with ``accumulate`` ``P_out += X S_outᵀ``, ``G_out +=
    S_out S_outᵀ``: the caller passes ``P_out``, ``G_out`` zeroed. ``X``, ``A``,
    ``S``, ``W``, ``P``, ``G`` are only read. With ``update`` false nothing is
    updated and ``P_out``, ``G_out`` receive ``X Sᵀ``, ``S Sᵀ`` of ``S`` itself
    (``A_out``, ``S_out`` untouched; ``P``, ``G`` unused).

    Queued on ``stream``; arrays as in :func:`mu_run` (``P_out``, ``G_out`` may
    have any shape when ``accumulate`` is false), or all torch CUDA tensors,
    which are launched on without conversion (:mod:`fastmu.kernels.cuda_launch`).
    """
    b, m, t, n = _check_args(X, A, S, W, P, G, allow_torch=True)
    tensors = is_torch(X)
    dtype = np_dtype(X)
    outs = [("A_out", A_out, (b, m, n)), ("S_out", S_out, (b, n, t))]
    if accumulate:
        outs += [("P_out", P_out, (b, m, n)), ("G_out", G_out, (b, n, n))]
    for name, arr, shape in outs:
        kind_ok = is_torch(arr) if tensors else cuda.devicearray.is_cuda_ndarray(arr)
        if not kind_ok or tuple(arr.shape) != shape or not is_c_contiguous(arr):
            raise ValueError(f"{name} must be a C-contiguous array of shape {shape}, of the same kind as X")
        if np_dtype(arr) != dtype:
            raise TypeError(f"{name} has dtype {arr.dtype} but X has {dtype}")
    if b > _MAX_GRID_Y:
        raise ValueError(
            f"layer_step launches one grid row per problem: at most {_MAX_GRID_Y} problems per call, "
            f"got b = {b}; split the batch"
        )
    k, _, bpp, dyn = _kernels_for(b, m, t, n, dtype, flat_ok=False)
    args = (X, S, S_out, W, A, P, G, A_out, P_out, G_out, dtype.type(eps), bool(update), bool(accumulate))
    if tensors:
        launch(k.layer_step, (bpp, b), k.tpb, stream, dyn, *args)
    else:
        k.layer_step[(bpp, b), k.tpb, stream, dyn](*args)


def zero_fill(arr: Any, stream: Any = 0) -> None:
    """Set a C-contiguous Numba device array to zero (queued on ``stream``)."""
    k = _build(np.dtype(arr.dtype).name, _config.threads, 1)
    _zero(k, arr, stream)


def _ptr(a: Any) -> int:
    return int(a.__cuda_array_interface__["data"][0])


def sum_squares(X: Any, stream: Any = 0) -> Any:
    """``‖X[p]‖²`` per problem as a float64 device array ``(b,)`` (for the objective)."""
    b, m, t = X.shape
    tpb = _config.threads
    k = _build(np.dtype(X.dtype).name, tpb, 1)
    out = cuda.device_array(b, np.float64, stream=stream)
    k.zero[-(-b // tpb), tpb, stream](out)
    nbx = max(1, min(-(-m * t // tpb), -(-4 * _multiprocessors() // b)))
    k.sumsq[(nbx, min(b, _MAX_GRID_Y)), tpb, stream](X, out)
    return out


def residual_squares(X: Any, A: Any, S: Any, stream: Any = 0) -> Any:
    """``‖X[p] − A[p] S[p]‖²`` per problem as a float64 device array ``(b,)``: one pass over X.

    For float32 runs: there :func:`objective_from_pg`'s cancellation (an
    error of ~6e-8·‖X‖², P and G being float32 sums) passes the decrease a
    ``tol`` check looks for once the fit is good. The model and the squares
    are formed in float64.
    """
    b, m, t = X.shape
    tpb = _config.threads
    k = _build(np.dtype(X.dtype).name, tpb, 1)
    out = cuda.device_array(b, np.float64, stream=stream)
    k.zero[-(-b // tpb), tpb, stream](out)
    nbx = max(1, min(-(-m * t // tpb), -(-4 * _multiprocessors() // b)))
    k.residsq[(nbx, min(b, _MAX_GRID_Y)), tpb, stream](X, A, S, out)
    return out


def objective_from_pg(x2: np.ndarray, A: np.ndarray, P: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``0.5‖X − A S‖²`` per problem from host copies of ``‖X‖²``, A, P, G (float64).

    ``‖X − AS‖² = ‖X‖² − 2⟨A, P⟩ + ⟨AᵀA, G⟩`` (as the CPU kernel): no pass
    over X, accurate to about ``eps(dtype)·‖X‖²``.
    """
    A = A.astype(np.float64)
    cross = np.einsum("bik,bik->b", A, P.astype(np.float64))
    quad = np.einsum("bkl,bkl->b", np.einsum("bik,bil->bkl", A, A), G.astype(np.float64))
    return 0.5 * np.maximum(x2 - 2.0 * cross + quad, 0.0)


__all__ = [
    "MAX_N",
    "GridWorkspace",
    "choose_knobs",
    "choose_mode",
    "dynamic_shared_bytes",
    "get_config",
    "Layout",
    "launch_layout",
    "layer_step",
    "regs_layout",
    "set_prefetch",
    "set_pixels_per_lane",
    "pixels_per_lane_for",
    "set_rows_per_thread",
    "zero_fill",
    "mu_run",
    "NO_PENALTY",
    "penalty_scalars",
    "objective_from_pg",
    "set_blocks_per_problem",
    "set_config",
    "set_graphs",
    "set_mode",
    "set_threads",
    "set_occupancy",
    "set_staging",
    "set_unroll",
    "choose_staging",
    "static_shared_bytes",
    "residual_squares",
    "sum_squares",
]
