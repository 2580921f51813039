"""NALMU training-step benchmark: fused kernels + handwritten backward vs plain torch autograd.

Usage::

    python bench/bench_nalmu.py                      # CPU, batch 25, 65×4096, 50 layers
    python bench/bench_nalmu.py --device cuda --t 16384
    python bench/bench_nalmu.py --objective loss --out bench/results/nalmu_cpu_loss.json

Prints a summary and writes the full result (with the machine description)
as JSON. The workload itself is :func:`fastmu.benchmarks.nalmu.run_nalmu_benchmark`
(``fastmu bench`` runs the same function).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastmu.benchmarks.nalmu import IMPLS, make_step, run_nalmu_benchmark
from fastmu.benchmarks.profile import profile_call


def profile_steps(args: argparse.Namespace) -> dict:
    """One warmed-up step of each variant under the profiler; tables to ``args.profile``."""
    summary, text = {}, []
    for name in args.impls:
        step, _ = make_step(name, args.batch, args.m, args.t, args.n, args.layers, args.dtype, args.device, 0,
                            args.objective)
        step()  # warm-up: compilation, caching allocator
        prof = profile_call(step, args.device)
        text.append(f"== {name} step: wall {prof['wall_ms']:.1f} ms, device kernels "
                    f"{prof['device_kernel_ms']} ms in {prof['device_kernels']} kernels\n{prof['table']}")
        summary[name] = {k: v for k, v in prof.items() if k != "table"}
        print(f"  profile {name}: wall {prof['wall_ms']:.1f} ms, kernels {prof['device_kernel_ms']} ms "
              f"({prof['device_kernels']}), busy {prof['device_busy_fraction']}")
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    args.profile.write_text("\n\n".join(text) + "\n")
    return summary


def cprofile_fused(args: argparse.Namespace, steps: int = 3) -> None:
    """Python-level profile (cProfile) of warmed-up fused steps into ``args.cprofile``:
    where an eager step's host time goes, function by function."""
    import cProfile
    import io
    import pstats

    from fastmu.nn import functional as fn

    step, _ = make_step("fused", args.batch, args.m, args.t, args.n, args.layers, args.dtype, args.device, 0,
                        args.objective)
    step()
    # torch runs a CUDA backward on its own thread, which a profiler enabled here does not
    # see: the stack's backward gets a profiler of its own, enabled in whatever thread runs it
    back_prof = cProfile.Profile()
    inner = fn.LearnedMUUnroll.backward  # autograd looks it up on the class at each call

    def profiled_backward(ctx, *grads):
        back_prof.enable()
        try:
            return inner(ctx, *grads)
        finally:
            back_prof.disable()

    # From Python 3.12 cProfile sits on sys.monitoring, which sees every thread and allows
    # one profiler at a time: there the calling thread's profiler covers the backward too
    separate = str(args.device).startswith("cuda") and sys.version_info < (3, 12)
    if separate:  # on the CPU the backward runs in this thread: one profiler sees it all
        fn.LearnedMUUnroll.backward = staticmethod(profiled_backward)
    prof = cProfile.Profile()
    try:
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
    finally:
        fn.LearnedMUUnroll.backward = staticmethod(inner)
    buf = io.StringIO()
    profs = ([("fused steps (calling thread)", prof), ("the stack's backward (autograd's thread)", back_prof)]
             if separate else [("fused steps", prof)])
    for title, p in profs:
        st = pstats.Stats(p, stream=buf)
        buf.write(f"== {steps} {title}, by own time\n")
        st.sort_stats("tottime").print_stats(35)
        buf.write(f"== {steps} {title}, by cumulative time\n")
        st.sort_stats("cumulative").print_stats(25)
    args.cprofile.parent.mkdir(parents=True, exist_ok=True)
    args.cprofile.write_text(buf.getvalue())
    print(f"  cProfile of {steps} fused steps written to {args.cprofile}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--m", type=int, default=65)
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--objective", default="upstream", choices=("upstream", "loss"))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                    help="variants to compare (fused and plain always run); default all")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="CUDA: time replays of each model's step captured as a CUDA graph (no host overhead)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/nalmu_<device>_<objective>.json)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also profile one fused and one plain step (host vs device time) into this text file")
    ap.add_argument("--cprofile", type=Path, default=None,
                    help="also profile three fused steps' Python with cProfile into this text file")
    args = ap.parse_args(argv)

    res = run_nalmu_benchmark(
        batch=args.batch, m=args.m, t=args.t, n_layers=args.layers, device=args.device, n=args.n,
        dtype=args.dtype, repeats=args.repeats, measure_memory=not args.no_memory, objective=args.objective,
        cuda_graph=args.cuda_graph, impls=tuple(args.impls),
    )
    args.impls = res["workload"]["impls"]
    try:
        from fastmu.benchmarks.machine import machine_info

        res["machine"] = machine_info()
    except ImportError:  # pragma: no cover
        pass
    print(f"NALMU {args.layers} layers, batch {args.batch}, {args.m}×{args.t}, n={args.n}, {args.dtype}, "
          f"{args.device} ({res['device_name']}), objective={args.objective}"
          + (", CUDA-graph replays" if args.cuda_graph else ""))
    for name in args.impls:
        r = res[name]
        peak = "" if r["peak_bytes"] is None else f", peak {r['peak_bytes'] / 2**20:.1f} MiB"
        print(f"  {name}: {r['time_s'] * 1e3:8.1f} ms median ({r['time_min_s'] * 1e3:.1f} min){peak}")
    print(f"  fused vs plain: {res['speedup']:.2f}× (median), {res['speedup_min']:.2f}× (best steps)"
          + (f", memory ratio {res['memory_ratio']:.2f}" if "memory_ratio" in res else ""))
    if "unroll_gain" in res:
        print(f"  one node for the stack vs one per layer (chain): {res['unroll_gain']:.2f}×")
    if res["memory_method"]:
        print(f"  memory: {res['memory_method']}")
    if args.profile is not None:
        res["profile"] = profile_steps(args)
    if args.cprofile is not None:
        cprofile_fused(args)
    tag = "_graph" if args.cuda_graph else ""
    out = args.out or Path(__file__).parent / "results" / f"nalmu_{args.device.split(':')[0]}_{args.objective}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"  written to {out}")
    return res


if __name__ == "__main__":
    main()
