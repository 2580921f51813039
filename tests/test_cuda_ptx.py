"""The CUDA kernels compile for a real GPU target (PTX for sm_90), without a GPU.

The simulator runs the kernels' Python source; this checks what the simulator
cannot: that Numba's CUDA *compiler* types and lowers them (compile-time
shapes, closure constants, atomics on shared/global arrays, launch bounds).
It needs NVVM and NVRTC (``pip install nvidia-cuda-nvcc-cu12
nvidia-cuda-nvrtc-cu12``, or a CUDA toolkit) and skips cleanly without them.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX compilation needs the real Numba CUDA target, not the simulator", allow_module_level=True)

from numba import cuda, types  # noqa: E402


class _FakeDevice:
    """Device functions ask the current device for its compute capability; there is none here."""

    compute_capability = (9, 0)
    id = 0


@pytest.fixture
def no_device(monkeypatch):
    import numba.cuda.dispatcher as disp

    monkeypatch.setattr(disp, "get_current_device", lambda: _FakeDevice())


def _compile(fn, sig, bounds):
    try:
        return cuda.compile_ptx(fn, sig, cc=(9, 0), launch_bounds=bounds)[0]
    except Exception as exc:  # NVVM/NVRTC missing: skip, anything else is a failure
        text = f"{type(exc).__name__}: {exc}"
        if any(s in text for s in ("libnvvm", "libnvrtc", "NVVM", "DynamicLibNotFound", "nvrtc")):
            pytest.skip(f"CUDA compiler libraries not installed: {text[:200]}")
        raise


def _longest_global_load_run(ptx: str) -> int:
    """Most ``ld.global`` instructions in one PTX basic block (no label or branch between)."""
    best = run = 0
    for line in ptx.splitlines():
        line = line.strip()
        if line.endswith(":") or "bra" in line.split(" ")[0] or line.startswith("@"):
            run = 0
        elif line.startswith("ld.global"):
            run += 1
            best = max(best, run)
    return best


@pytest.mark.parametrize(
    "dtype,tpb,n,ur,staging,rows",
    [("float32", 128, 4, 1, "rows", 0), ("float32", 128, 4, 8, "rows", 0), ("float64", 256, 8, 4, "rows", 0),
     ("float32", 32, 1, 16, "rows", 0), ("float32", 128, 4, 8, "tile", 0), ("float64", 64, 4, 1, "tile", 0),
     ("float32", 160, 4, 1, "regs", 13), ("float64", 288, 4, 1, "regs", 8), ("float32", 32, 3, 1, "regs", 9),
     ("float32", 256, 4, 1, "regs+prefetch", 9), ("float32", 160, 4, 1, "regs+exact", 13)],
)
def test_kernels_compile_to_ptx(no_device, dtype, tpb, n, ur, staging, rows):
    from fastmu.kernels import cuda as kc

    prefetch, exact = staging.endswith("+prefetch"), staging.endswith("+exact")
    staging = staging.split("+")[0]
    k = kc._build(dtype, tpb, n, ur, staging=staging, rows=rows, prefetch=prefetch, exact=exact)
    f = getattr(types, dtype)
    a1, a3, a4 = (types.Array(f, d, "C") for d in (1, 3, 4))
    b = types.boolean
    flags = (types.int64, f, b, b)
    ptx = _compile(k.mu_block.py_func, (a3,) * 6 + flags, k.launch_bounds)
    assert ".entry" in ptx and "bar.sync" in ptx
    if staging != "regs":
        # per-thread accumulators are registers, not local memory, at every n
        assert ".local" not in ptx
    else:
        # only the one dynamically indexed copy of the P partials, made once per sweep
        assert ptx.count(".local .align") <= 1
        # a thread's rows of a tile are loaded in one branch-free run (no branch per row)
        assert _longest_global_load_run(ptx) >= rows
    ptx = _compile(k.mu_grid_step.py_func, (a3, a3, a3, a4, a4, a4) + flags, k.launch_bounds)
    assert "atom.global.add" in ptx or "red.global.add" in ptx
    ptx = _compile(k.mu_flat_step.py_func, (a3, a3, a3, a4, a4, a4) + flags, k.launch_bounds)
    assert "atom.global.add" in ptx or "red.global.add" in ptx
    if staging == "regs":  # the segment loop keeps the sweep's registers: one local copy at most
        assert ptx.count(".local .align") <= 1
    _compile(k.layer_step.py_func, (a3,) * 10 + (f, b, b), k.launch_bounds)
    _compile(k.sumsq.py_func, (a3, types.Array(types.float64, 1, "C")), None)
    _compile(k.residsq.py_func, (a3, a3, a3, types.Array(types.float64, 1, "C")), None)
    _compile(k.zero.py_func, (a1,), None)


@pytest.mark.parametrize("dtype,n,tpb", [("float32", 4, 128), ("float64", 3, 32)])
def test_backward_kernels_compile_to_ptx(no_device, dtype, n, tpb):
    from fastmu.kernels import cuda_backward as kb

    prep, pass1, tiny, sum_w, pass2, _ = kb._build(dtype, n, tpb)
    f = getattr(types, dtype)
    a3, a4 = types.Array(f, 3, "C"), types.Array(f, 4, "C")
    b = types.boolean
    _compile(prep.py_func, (a3,) * 4 + (f,) + (a3,) * 3, None)
    _compile(pass1.py_func, (a3,) * 5 + (f, b, a3, a4, a4), None)
    _compile(tiny.py_func, (a3,) * 7 + (b, a4, a4, b, b) + (a3,) * 7, None)
    _compile(sum_w.py_func, (a3, a3), None)
    ptx = _compile(pass2.py_func, (a3,) * 7 + (f, b, b, b, a3, a3), None)
    assert ".local" not in ptx


@pytest.mark.parametrize("dtype,n,rg,rpg,exact", [("float32", 4, 6, 11, False), ("float64", 4, 9, 8, False),
                                                  ("float32", 3, 1, 5, False), ("float32", 4, 5, 13, True)])
def test_regs_backward_kernels_compile_to_ptx(no_device, dtype, n, rg, rpg, exact):
    from fastmu.kernels import cuda_backward as kb

    pass1, pass2 = kb._build_regs(dtype, n, rg, rpg, exact)
    f = getattr(types, dtype)
    a3, a4 = types.Array(f, 3, "C"), types.Array(f, 4, "C")
    b = types.boolean
    bounds = (32 * rg, max(1, 512 // (32 * rg)))
    ptx = _compile(pass1.py_func, (a3,) * 5 + (f, b, a3, a4, a4), bounds)
    assert "bar.sync" in ptx and "atom." not in ptx  # fixed-order sums: no atomics
    ptx = _compile(pass2.py_func, (a3,) * 7 + (f, b, b, b, a3, a3), bounds)
    assert "atom." not in ptx


@pytest.mark.parametrize("ppl,contiguous", [(1, False), (4, True)])
def test_read_pattern_probe_compiles_to_ptx(no_device, ppl, contiguous):
    """The W2 read-pattern probe (fastmu.benchmarks.read_patterns): its 13 row loads per
    pixel are one branch-free run, as in the MU kernel it stands for, and nothing spills."""
    from fastmu.benchmarks import read_patterns

    tiles, linear = read_patterns._kernels(13, ppl, contiguous)
    a1, a3 = types.Array(types.float32, 1, "C"), types.Array(types.float32, 3, "C")
    ptx = _compile(tiles.py_func, (a3, a3), None)
    assert ".local" not in ptx
    assert _longest_global_load_run(ptx) >= 13 * ppl
    ptx = _compile(linear.py_func, (a1, a1), None)
    assert _longest_global_load_run(ptx) >= read_patterns.LIN_UNROLL


@pytest.mark.parametrize("ppl", [2, 4])
def test_wide_regs_tiles_compile_to_ptx(no_device, ppl):
    """Wide "regs" tiles (set_pixels_per_lane): all ppl × rows loads of a thread's tile form one
    branch-free run, so a warp's 128·ppl bytes of each row are requested together."""
    from fastmu.kernels import cuda as kc

    rows = 13 if ppl == 2 else 5
    tpb = 32 * -(-65 // rows)
    k = kc._build("float32", tpb, 4, 1, staging="regs", rows=rows, exact=True, ppl=ppl)
    f = types.float32
    a3, a4 = types.Array(f, 3, "C"), types.Array(f, 4, "C")
    b = types.boolean
    ptx = _compile(k.mu_grid_step.py_func, (a3, a3, a3, a4, a4, a4, types.int64, f, b, b), k.launch_bounds)
    assert _longest_global_load_run(ptx) >= rows * ppl
    _compile(k.mu_flat_step.py_func, (a3, a3, a3, a4, a4, a4, types.int64, f, b, b), k.launch_bounds)
    _compile(k.layer_step.py_func, (a3,) * 10 + (f, b, b), k.launch_bounds)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_transposed_run_kernels_compile_to_ptx(no_device, dtype):
    """The kernels of a tall X's transposed run (kernels/cuda_transposed.py), in both uses of
    the row update: from X (G in float64) and from carried P, G (in X's dtype)."""
    from fastmu.kernels import cuda_transposed as kt

    f = getattr(types, dtype)
    a3, g3 = types.Array(f, 3, "C"), types.Array(types.float64, 3, "C")
    assert ".entry" in _compile(kt._transpose.py_func, (a3, a3), None)
    assert ".entry" in _compile(kt._gram.py_func, (a3, types.float64, g3), None)
    for G in (g3, a3):
        ptx = _compile(kt._a_update_rows.py_func, (a3, a3, a3, a3, G, f, f, a3, types.boolean), None)
        assert ".entry" in ptx and "div.rn.f64" in ptx
