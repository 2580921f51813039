"""The GPU benchmark's bookkeeping, without a GPU: which entries it times with which knobs.

The timed calls are replaced by fakes that record the kernel configuration
they ran under and return a duration; nothing here times anything. The
measurements themselves only run on a GPU (``bench/gpu_session.sh``).
"""
from __future__ import annotations

import numpy as np
import pytest

mg = pytest.importorskip("fastmu.benchmarks.mu_gpu")
kc = pytest.importorskip("fastmu.kernels.cuda")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Swap the device-facing parts of the benchmark for fakes; return the recorded calls."""
    calls: list[dict] = []
    class FakeCuda:
        @staticmethod
        def to_device(x):
            return x

    monkeypatch.setattr(mg, "_require_gpu", lambda: FakeCuda())
    monkeypatch.setattr(mg, "_versions", lambda cuda: {"device": "fake"})
    monkeypatch.setattr(mg, "copy_bandwidths", lambda cuda: {"numba_memcpy": 1e12, "torch_copy": 0.9e12})
    monkeypatch.setattr(mg, "_data", lambda b, dt, seed=0: (np.ones((b, 2, 3), dt),) * 3)

    def fastmu(cuda, X, A0, S0, iters, mode, config=None, dX=None):
        saved = mg._apply(kc, config)  # the knobs as the real run would see them
        calls.append({"mode": mode, **kc.get_config()})
        mg._restore(kc, saved)
        return 1.0 if calls[-1]["staging"] == "regs" else 2.0, S0

    monkeypatch.setattr(mg, "_fastmu", fastmu)
    monkeypatch.setattr(mg, "_torch_loop", lambda X, A0, S0, iters, compiled: (4.0, S0))
    monkeypatch.setattr(mg, "_cupy_loop", lambda X, A0, S0, iters: (8.0, S0))
    saved = kc.get_config()
    yield calls
    kc.set_config(**saved)


def test_each_staging_is_an_entry_with_its_own_knobs(fake_gpu):
    configs = {"W1": {"rows": {"blocks_per_problem": 128, "unroll": 1},
                      "regs": {"blocks_per_problem": 256, "rows_per_thread": 9}},
               "W2": {"occupancy": 1024}}
    res = mg.run_gpu_benchmarks(iters=10, batch=3, configs=configs, modes=("grid",), stagings=("rows", "regs"))
    w1, w2 = res["workloads"]["W1"], res["workloads"]["W2"]
    assert set(w1["results"]) == {"fastmu_grid_rows", "fastmu_grid_regs", "torch_eager", "torch_compile", "cupy_loop"}
    assert w1["speedup_vs_torch_eager"] == {"fastmu_grid_rows": 2.0, "fastmu_grid_regs": 4.0}
    assert w1["fastest"] == "fastmu_grid_regs"
    assert w1["kernel_config"]["regs"]["rows_per_thread"] == 9
    # W1's knobs per staging, W2's one set for both stagings
    assert [(c["staging"], c["blocks_per_problem"], c["rows_per_thread"]) for c in fake_gpu[:2]] == [
        ("rows", 128, None), ("regs", 256, 9)]
    assert [(c["staging"], c["occupancy"]) for c in fake_gpu[2:]] == [("rows", 1024), ("regs", 1024)]
    assert "fastmu_grid_regs" in mg.format_table(res)
    # the fraction of copy bandwidth divides by the fastest copy measured, each one recorded
    assert res["copy_bandwidth_GBps"] == 1000.0
    assert res["copy_bandwidth_by_method_GBps"] == {"numba_memcpy": 1000.0, "torch_copy": 900.0}
    e = w1["results"]["fastmu_grid_rows"]
    assert e["fraction_of_copy_bandwidth"] == pytest.approx(e["achieved_GBps_one_pass_model"] / 1000.0)


def test_sweep_times_regs_per_row_count_in_32_pixel_tiles(fake_gpu):
    out = mg.sweep_kernel_configs(iters=5, batches=(1,), threads=(128, 256), unrolls=(1, 8), occupancies=(512, 2048),
                                  stagings=("rows", "regs"), bpp_fractions=(1,), block_mode=False,
                                  rows_per_thread=(None, 7), prefetches=(False, True))
    regs = [r for r in out["rows"] if r["staging"] == "regs"]
    rows = [r for r in out["rows"] if r["staging"] == "rows"]
    assert len(rows) == 8  # 2 thread counts × 2 unrolls × 2 occupancies
    # once per row count, not per thread count or unroll, and never at 2048 threads per SM
    assert [(r["rows_per_thread"], r["prefetch"], r["blocks_per_problem"], r["unroll"], r["occupancy"])
            for r in regs] == [(rpt, pf, mg.T // 32, 1, 512) for rpt in (None, 7) for pf in (False, True)]
    assert not any(r["prefetch"] for r in rows)
    assert {r["blocks_per_problem"] for r in rows} == {mg.T // 128, mg.T // 256}
    best = out["best_by_staging"]["1"]
    assert best["regs"]["ms_per_iter"] < best["rows"]["ms_per_iter"]
    assert out["best"]["1"]["staging"] == "regs"


def test_cli_rejects_unknown_staging():
    with pytest.raises(SystemExit):
        mg.main(["--stagings", "warp"])


def test_session_script_skips_steps_past_its_deadline(tmp_path):
    """bench/gpu_session.sh with no time left runs no step, says so, and still packs its logs."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    # this interpreter first on PATH, as "python3" where it has that name (the script calls python3)
    py_dir = Path(sys.executable).parent
    if not (py_dir / "python3").exists():
        pytest.skip("this interpreter has no python3 beside it")
    env = {"PATH": f"{py_dir}:/usr/bin:/bin",
           "OUT": str(out), "DEADLINE": "0",
           "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = (out / "steps.txt").read_text()
    for name in ("gpu_tests", "sweep", "mu_bench", "nalmu_regs", "nalmu_graph_regs", "mu_profile", "ncu",
                 "patterns", "wide"):
        assert f"[{name}] skipped" in steps
    assert "rc=" not in steps  # nothing ran
    assert (out / "logs.tgz").is_file() and (out / "env.txt").is_file()


def test_sweep_times_the_automatic_block_count_as_null(fake_gpu):
    out = mg.sweep_kernel_configs(iters=5, batches=(1,), threads=(128,), unrolls=(1,), occupancies=(512,),
                                  stagings=("rows",), bpp_fractions=(None, 1, 4), block_mode=False)
    assert [r["blocks_per_problem"] for r in out["rows"]] == [None, mg.T // 128, mg.T // 128 // 4]
    # each run saw that count (None: the kernels choose)
    assert [c["blocks_per_problem"] for c in fake_gpu] == [None, mg.T // 128, mg.T // 128 // 4]


def test_layer_host_time_runs_without_a_gpu(tmp_path):
    """bench/layer_host_time.py times the CUDA layer's Python with the device calls stubbed
    (in its own process: the stubs replace Numba and cuda.core functions)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("cuda.core")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "host.json"
    r = subprocess.run([sys.executable, "bench/layer_host_time.py", "--batch", "2", "--m", "9", "--t", "70", "--n", "3",
                        "--repeats", "3", "--step", "--layers", "4", "--step-t", "50", "--step-repeats", "2",
                        "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["forward"]["launches"] == 1 and res["backward"]["launches"] == 5
    assert res["forward"]["median_us"] > 0 and res["backward"]["median_us"] > 0
    # whole steps through the stubbed CUDA path: the stack as one node issues fewer torch ops
    step = res["step"]
    assert step["shape"]["layers"] == 4 and step["fused"]["median_ms"] > 0 and step["chain"]["median_ms"] > 0
    assert step["fused"]["aten_ops"] < step["chain"]["aten_ops"]


def test_flat_mode_in_sweep_and_benchmark(fake_gpu):
    """"flat" mode joins the sweep once per configuration (automatic block count) and the
    benchmark as its own entries."""
    out = mg.sweep_kernel_configs(iters=5, batches=(1,), threads=(128,), unrolls=(1,), occupancies=(512,),
                                  stagings=("rows", "regs"), bpp_fractions=(None,), block_mode=False, flat_mode=True)
    assert [(r["staging"], r["mode"], r["blocks_per_problem"]) for r in out["rows"]] == [
        ("rows", "grid", None), ("rows", "flat", None), ("regs", "grid", None), ("regs", "flat", None)]
    res = mg.run_gpu_benchmarks(iters=10, batch=3, modes=("grid", "flat"), stagings=("rows", "regs"))
    assert {"fastmu_flat_rows", "fastmu_flat_regs", "fastmu_grid_regs"} <= set(res["workloads"]["W2"]["results"])
    with pytest.raises(SystemExit):
        mg.main(["--modes", "diagonal"])


def test_read_patterns_needs_a_gpu_and_tabulates_its_rows():
    """Without a GPU the probe says so; its table shows every row with its fractions."""
    import numba

    rp = pytest.importorskip("fastmu.benchmarks.read_patterns")
    if not getattr(numba.config, "ENABLE_CUDASIM", 0):
        from numba import cuda

        if not cuda.is_available():
            with pytest.raises(RuntimeError, match="need a CUDA GPU"):
                rp.run_read_patterns(batch=1, t=64)
    rows = [{"pattern": "linear", "GBps": 3000.0, "fraction_of_linear_read": 1.0, "fraction_of_copy_bandwidth": 1.1},
            {"pattern": "tiles", "order": "strided", "bytes_per_row_run": 128, "blocks_per_problem": 2,
             "GBps": 1800.0, "fraction_of_linear_read": 0.6, "fraction_of_copy_bandwidth": 0.66}]
    table = rp.format_table({"rows": rows}).splitlines()
    assert len(table) == 3 and "strided" in table[2] and "0.60" in table[2] and "128" in table[2]


def test_session_wide_step_and_bench_configs(fake_gpu, tmp_path):
    """The GPU session's wide-tile sweep, with the script's own arguments: every (pixels per
    lane, occupancy, mode) is timed without error and resolves a layout at W2's shape with
    tiles 32·ppl wide; the benchmark then runs W2 at the sweep's best knobs (--best-configs)."""
    import json
    import re
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh").read_text()
    args = json.loads(re.search(r"WIDE_ARGS=\$\{WIDE_ARGS:-'(.*?)'\}", script).group(1))
    out = mg.sweep_kernel_configs(iters=5, **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    rows = out["rows"]
    assert not [r for r in rows if "error" in r]
    seen = {(r["pixels_per_lane"], r["occupancy"], r["mode"]) for r in rows}
    assert seen == {(p, o, md) for p in args["pixels_per_lane"] for o in args["occupancies"] for md in ("grid", "flat")}
    saved = kc.get_config()
    try:
        for r in rows:
            kc.set_config(**{k: r[k] for k in mg._KNOBS}, mode=r["mode"])
            assert kc.launch_layout(np.float32, mg.M, mg.N).tile == 32 * r["pixels_per_lane"]
            kc._kernels_for(150, mg.M, mg.T, mg.N, np.dtype(np.float32))
    finally:
        kc.set_config(**saved)
    path = tmp_path / "wide.json"
    path.write_text(json.dumps(out))
    cfg = mg.best_configs([str(tmp_path / "no_sweep.json"), str(path)])
    assert set(cfg) == {"W2"} and cfg["W2"]["regs"]["pixels_per_lane"] in args["pixels_per_lane"]
    assert mg.best_configs([str(tmp_path / "none.json")]) == {}
    fake_gpu.clear()
    cfg["W2"]["regs"]["pixels_per_lane"] = 2
    mg.run_gpu_benchmarks(iters=10, batch=3, configs=cfg, modes=("grid", "flat"), stagings=("regs",))
    assert {c["pixels_per_lane"] for c in fake_gpu} == {None, 2}  # W1 automatic, W2 at the sweep's best


def test_default_benchmark_times_what_fastmu_mu_launches(fake_gpu, monkeypatch):
    """By default (``fastmu bench --device cuda``) fastmu's entry is the automatic choice,
    beside the peers, and the JSON records which launch that is: for W2 on a 132-SM GPU
    the flat mode over one wave of 3 × 132 blocks and 64-pixel tiles; for W1 grid mode."""
    monkeypatch.setattr(kc, "_multiprocessors", lambda: 132)
    res = mg.run_gpu_benchmarks(iters=10)
    w1, w2 = res["workloads"]["W1"], res["workloads"]["W2"]
    assert set(w2["results"]) == {"fastmu_auto", "torch_eager", "torch_compile", "cupy_loop"}
    assert [(c["mode"], c["staging"], c["pixels_per_lane"]) for c in fake_gpu] == [("auto", "auto", None)] * 2
    assert w2["auto_choice"] == {"mode": "flat", "blocks": 396, "blocks_are": "in all", "tile_pixels": 64}
    assert w1["auto_choice"]["mode"] == "grid" and w1["auto_choice"]["blocks_are"] == "per problem"
    assert "fastmu_auto" in mg.format_table(res)
