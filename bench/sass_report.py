"""What the CUDA kernels compile to on Hopper (sm_90), without a GPU.

Compiles fastmu's CUDA kernels with Numba's NVVM to PTX, assembles them with
``ptxas`` for sm_90 and disassembles the cubin (``cuobjdump -sass``), then
reports, per kernel: registers, stack and spill bytes, and the loop that
holds the X loads (the per-tile loop of the "regs" layout, the per-row-chunk
loop of "rows"): its static instruction count, its mix of instructions and
the loops nested in it. Static facts about the code, not timings: fewer
instructions per tile matter where a kernel is issue-bound.

Needs ``pip install nvidia-cuda-nvcc nvidia-cuda-nvrtc nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm`` (or a CUDA toolkit on PATH)::

    python bench/sass_report.py                      # writes bench/results/sass_sm90.json
    python bench/sass_report.py --out /tmp/sass.json --keep /tmp/sass   # also keep the .sass
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: (label, dtype, threads, n, unroll, staging, rows per thread, prefetch, exact, pixels per lane):
#: the paper's shape (m = 65, n = 4) in the layouts the benchmarks time; "exact" is the build
#: for warps whose rows cover m exactly (5 × 13 = 65: the one m = 65 uses in float32), the
#: others also hold the code for a partial last warp; "ppl" > 1: wide tiles (32·ppl pixels)
FORWARD = [
    ("rows f32 unroll 1", "float32", 128, 4, 1, "rows", 0, False, False, 1),
    ("rows f32 unroll 8", "float32", 128, 4, 8, "rows", 0, False, False, 1),
    ("regs f32 13 rows", "float32", 160, 4, 1, "regs", 13, False, False, 1),
    ("regs f32 13 rows exact", "float32", 160, 4, 1, "regs", 13, False, True, 1),
    ("regs f32 13 rows exact prefetch", "float32", 160, 4, 1, "regs", 13, True, True, 1),
    ("regs f32 13 rows exact ppl 2", "float32", 160, 4, 1, "regs", 13, False, True, 2),
    ("regs f32 7 rows ppl 2", "float32", 320, 4, 1, "regs", 7, False, False, 2),
    ("regs f32 5 rows exact ppl 4", "float32", 416, 4, 1, "regs", 5, False, True, 4),
    ("regs f64 8 rows", "float64", 288, 4, 1, "regs", 8, False, False, 1),
]
#: (label, dtype, n, warps, rows per warp-thread, exact): m = 65 runs 6 × 11 in float32
BACKWARD = [("regs backward f32 11 rows", "float32", 4, 6, 11, False),
            ("regs backward f32 13 rows exact", "float32", 4, 5, 13, True)]


def find_tool(name: str) -> str | None:
    """``name`` from the ``nvidia-*`` wheels (the NVVM that Numba uses comes from
    there, and an older toolkit's ptxas refuses its newer PTX), else on PATH."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for cand in sorted(Path(root).glob(f"*/bin/{name}"), reverse=True):
            if os.access(cand, os.X_OK):
                return str(cand)
    return shutil.which(name)


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction) pairs of a ``cuobjdump -sass`` listing."""
    out = []
    for line in text.splitlines():
        mm = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;", line)
        if mm:
            out.append((int(mm.group(1), 16), mm.group(2)))
    return out


def opcode(ins: str) -> str:
    words = ins.split()
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def loops(ins: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) address of every backward branch's loop."""
    out = []
    for a, s in ins:
        mm = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", s)
        if mm and int(mm.group(1), 16) <= a:
            out.append((int(mm.group(1), 16), a))
    return out


def load_loop(ins: list[tuple[int, str]], min_loads: int) -> dict:
    """The smallest loop holding a barrier and at least ``min_loads`` global loads
    (the tile or row-chunk loop; set-up loops have no barrier), described."""
    ls = loops(ins)

    def body(lo: int, hi: int) -> list[str]:
        return [s for a, s in ins if lo <= a <= hi]

    cands = [(hi - lo, lo, hi) for lo, hi in ls
             if sum(opcode(s) == "LDG" for s in body(lo, hi)) >= min_loads and any(opcode(s) == "BAR" for s in body(lo, hi))]
    if not cands:
        return {"error": f"no loop with {min_loads} global loads"}
    _, lo, hi = min(cands)
    b = body(lo, hi)
    mix: dict[str, int] = {}
    for s in b:
        mix[opcode(s)] = mix.get(opcode(s), 0) + 1
    nested = sorted({(l2, h2) for l2, h2 in ls if lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi)})
    return {
        "static_instructions": len(b),
        "nested_loops_static_instructions": [len(body(a, z)) for a, z in nested],
        "mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
    }


def assemble(ptx: str, name: str, work: Path, ptxas: str, cuobjdump: str) -> tuple[dict, str]:
    src, cubin = work / f"{name}.ptx", work / f"{name}.cubin"
    src.write_text(ptx)
    r = subprocess.run([ptxas, "-arch=sm_90", "-O3", "-v", str(src), "-o", str(cubin)],
                       capture_output=True, text=True, check=True)
    info: dict = {}
    for key, pat in (("registers", r"Used (\d+) registers"), ("stack_bytes", r"(\d+) bytes stack frame"),
                     ("spill_store_bytes", r"(\d+) bytes spill stores"), ("spill_load_bytes", r"(\d+) bytes spill loads")):
        mm = re.search(pat, r.stderr)
        if mm:
            info[key] = int(mm.group(1))
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(cuobjdump) + os.pathsep + env.get("PATH", "")
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True, env=env).stdout
    (work / f"{name}.sass").write_text(sass)
    return info, sass


def _no_device() -> None:
    """Numba asks the current device for its compute capability; answer sm_90."""
    import numba.cuda.dispatcher as disp

    class _Dev:
        compute_capability = (9, 0)
        id = 0

    disp.get_current_device = lambda: _Dev()


def report(keep: Path | None = None, only: str | None = None) -> dict:
    from numba import cuda, types

    from fastmu.benchmarks.machine import package_versions
    from fastmu.kernels import cuda as kc
    from fastmu.kernels import cuda_backward as kb

    ptxas, cuobjdump = find_tool("ptxas"), find_tool("cuobjdump")
    if not (ptxas and cuobjdump and find_tool("nvdisasm")):
        raise SystemExit("needs ptxas, cuobjdump and nvdisasm: pip install nvidia-cuda-nvcc "
                         "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    os.environ["PATH"] = os.path.dirname(find_tool("nvdisasm")) + os.pathsep + os.environ.get("PATH", "")
    _no_device()
    work = Path(tempfile.mkdtemp()) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    version = next((ln for ln in subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.splitlines()
                    if "release" in ln), "unknown")
    try:  # the source the kernels came from
        here = Path(kc.__file__).resolve().parent
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    rows = []
    for label, dt, tpb, n, ur, staging, rpt, pre, exact, ppl in FORWARD:
        if only and only not in label:
            continue
        k = kc._build(dt, tpb, n, ur, staging=staging, rows=rpt, prefetch=pre, exact=exact, ppl=ppl)
        f = getattr(types, dt)
        a3, a4 = types.Array(f, 3, "C"), types.Array(f, 4, "C")
        sig = (a3, a3, a3, a4, a4, a4, types.int64, f, types.boolean, types.boolean)
        # grid mode's kernel, and "flat" mode's (the same sweep inside a loop over problem segments)
        for kname in ("mu_grid_step", "mu_flat_step") if staging == "regs" else ("mu_grid_step",):
            ptx = cuda.compile_ptx(getattr(k, kname).py_func, sig, cc=(9, 0), launch_bounds=k.launch_bounds)[0]
            name = re.sub(r"\W+", "_", f"{label} {kname}")
            info, sass = assemble(ptx, name, work, ptxas, cuobjdump)
            rows.append({"kernel": kname, "label": label, "dtype": dt, "threads": tpb, "n": n, "unroll": ur,
                         "staging": staging, "rows_per_thread": rpt, "prefetch": pre, "exact": exact,
                         "pixels_per_lane": ppl, **info,
                         "x_load_loop": load_loop(parse_sass(sass), rpt * ppl if staging == "regs" else ur)})
    for label, dt, n, rg, rpg, exact in BACKWARD:
        if only and only not in label:
            continue
        p1, p2 = kb._build_regs(dt, n, rg, rpg, exact)
        f = getattr(types, dt)
        a3, a4, b = types.Array(f, 3, "C"), types.Array(f, 4, "C"), types.boolean
        bounds = (32 * rg, max(1, 512 // (32 * rg)))
        for kname, fn, sig in (("pass1", p1, (a3,) * 5 + (f, b, a3, a4, a4)),
                               ("pass2", p2, (a3,) * 7 + (f, b, b, b, a3, a3))):
            ptx = cuda.compile_ptx(fn.py_func, sig, cc=(9, 0), launch_bounds=bounds)[0]
            name = re.sub(r"\W+", "_", f"{label} {kname}")
            info, sass = assemble(ptx, name, work, ptxas, cuobjdump)
            rows.append({"kernel": f"backward {kname}", "label": label, "dtype": dt, "threads": 32 * rg, "n": n,
                         "staging": "regs", "rows_per_thread": rpg, "exact": exact, **info, "x_load_loop": load_loop(parse_sass(sass), rpg)})
    return {"target": "sm_90", "ptxas": version, "source_commit": commit, "packages": package_versions(), "python": sys.version.split()[0],
            "kernels": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/sass_sm90.json")
    ap.add_argument("--keep", type=Path, default=None, help="folder for the .ptx, .cubin and .sass files")
    ap.add_argument("--only", default=None, help="only the configurations whose label contains this")
    args = ap.parse_args(argv)
    res = report(args.keep, args.only)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for r in res["kernels"]:
        loop = r["x_load_loop"]
        print(f"{r['kernel']:16s} {r['label']:33s} regs {r.get('registers')} stack {r.get('stack_bytes')} "
              f"spills {r.get('spill_store_bytes', 0)}/{r.get('spill_load_bytes', 0)} B "
              f"| X-load loop {loop.get('static_instructions')} instr, nested {loop.get('nested_loops_static_instructions')}")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
