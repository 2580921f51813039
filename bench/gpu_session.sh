#!/usr/bin/env bash
# One GPU session, run from the repository root on a machine with an NVIDIA GPU:
# environment report, GPU tests, kernel-knob sweep, W1/W2 benchmark with peers,
# NALMU benchmark (eager and as CUDA-graph replays), kernel-vs-wall-time profile.
# Each step has its own time limit, all of them share one deadline, and a
# failed step does not stop the next. Results (JSON, env, test log) land in $OUT
# (default bench/results/gpu_session), every step's log in $OUT/logs.tgz: at most
# 8 files, as many as a device call brings back.
#
#   bash bench/gpu_session.sh            # with fastmu installed or from a checkout
#   STEPS="tests sweep" bash bench/gpu_session.sh
#       # a subset of: tests nalmu wide bench patterns nalmu_loss nalmu_graph ncu sanitize profile sweep, in the order given
#
# A session has 15 minutes of device time, the machine's start included, and a
# machine goes back 30 s after a call: plan one call of at most 10 minutes
# (timeout_s 600). DEADLINE (seconds, default 540) bounds the whole script:
# each step gets at most its own limit and at most what is left, and a step
# with under 20 s left is skipped (and says so). The default order puts the
# GPU tests first, then the eager NALMU step, W2 at 4 blocks per SM beside
# today's, W2 with its peers at the best of them, the reads of W2's pattern
# alone, a step with the loss on its kernels, then the W2 kernel's stall
# reasons. Each step's limit, then what it took on the H200 (2026-11-27; the
# machine started in ~30 s) or, where it did not run there, on an H100 (2026-11-26):
#   tests        200 s  (157)  all GPU tests, pytest -n 8; gradient tests 70-90 s each, the paper's run 71 s
#   nalmu        100 s   (38)  fused, chain and plain models, each profiled, then cProfile
#   nalmu_loss   100 s   (not yet run)  a step with the paper's loss, and the loss alone; JSON in logs.tgz
#   nalmu_graph   60 s   (23 on the H100, with two variants)
#   ncu           90 s   (17)  Nsight Compute on one W2 iteration (flat mode, 2 pixels per lane)
#   wide          90 s   (50)  W2 at 3 and 4 blocks per SM, 1 and 2 pixels per lane, grid and flat; JSON in logs.tgz
#   bench        240 s   (98)  W1/W2 with peers, 10 000 iterations each;
#                       "regs" only (BENCH_STAGINGS), W2 at the wide sweep's best knobs
#   patterns      45 s   (15)  reads alone in the W2 kernel's pattern, tile widths 128-1024 B; JSON in logs.tgz
#   sanitize      90 s   (34 on the H100)  compute-sanitizer racecheck over bench/gpu_sanity.py
#   profile       60 s   (20 on the H100)
#   sweep         80 s   (30 with 4 batch sizes × grid/flat × 1/2 pixels per lane)
# TESTS, TESTS_K, SWEEP_ARGS, WIDE_ARGS, CONFIGS, MODES, BENCH_STAGINGS, NALMU_STAGINGS and the *_LIMIT
# variables narrow a later call, e.g. STEPS="tests nalmu" TESTS_K="fast_launch".
set -u
OUT=${OUT:-bench/results/gpu_session}
LOGDIR=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# A numba-cuda older than the one fastmu is tested with: use carried wheels (.whl/) if any.
if [ -d .whl ] && ! python3 -c "import numba_cuda, sys; sys.exit(tuple(map(int, numba_cuda.__version__.split('.')[:2])) < (0, 30))" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# From a bare checkout (no pip install): make kernels/ importable as fastmu.kernels.
if ! python3 -c "import fastmu.kernels" 2>/dev/null; then
  [ -e fastmu/kernels ] || ln -s ../kernels fastmu/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# STEPS picks what runs and in which order (default all, in the order below).
STEPS=${STEPS:-"tests nalmu wide bench patterns nalmu_loss nalmu_graph ncu sanitize profile sweep"}
DEADLINE=${DEADLINE:-540}
step() {  # step NAME LIMIT_S CMD...: run with a limit, log to $LOGDIR/NAME.log, report rc and time
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 10))  # 10 s kept for packing the logs
  if [ "$left" -lt 20 ]; then
    echo "[$name] skipped: ${left} s left of DEADLINE=$DEADLINE" | tee -a "$OUT/steps.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
}

{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 - <<'PY'
import importlib, platform
print("python", platform.python_version())
for m in ("numpy", "numba", "numba_cuda", "cupy", "torch", "llvmlite"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "missing:", e)
from numba import cuda
print("numba sees GPU:", cuda.is_available(), cuda.get_current_device().name)
PY
} >"$OUT/env.txt" 2>&1
tail -n 12 "$OUT/env.txt"

# per-test names (-v) so that a run cut short still says what passed; xdist and
# pytest-timeout only where installed
run_tests() {
  PYTEST_EXTRA=()
  python3 -c "import xdist" 2>/dev/null && PYTEST_EXTRA+=(-n 8)
  python3 -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA+=(--timeout 240)
  # TESTS: the test files (default: every GPU test); TESTS_K: a pytest -k expression
  # shellcheck disable=SC2086
  step gpu_tests "${TESTS_LIMIT:-200}" python3 -m pytest -v -rfEs -p no:cacheprovider "${PYTEST_EXTRA[@]}" \
    ${TESTS:-tests/test_cuda_gpu.py tests/test_nn_gpu.py tests/test_experiments_gpu.py tests/test_data_mixtures.py::test_same_data_on_gpu} \
    ${TESTS_K:+-k "$TESTS_K"} --junitxml="$LOGDIR/gpu_tests.xml"
  [ -f "$LOGDIR/gpu_tests.log" ] && tail -n 15 "$LOGDIR/gpu_tests.log"
  # the packed-parameter launch (kernels/cuda_launch.py) disagreeing with Numba's own:
  # time the rest with Numba's launch rather than not at all
  if python3 - "$LOGDIR/gpu_tests.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except Exception:
    sys.exit(1)
bad = [c.get("name") for c in cases if "fast_launch" in c.get("name", "")
       and (c.find("failure") is not None or c.find("error") is not None)]
sys.exit(0 if bad else 1)
PY
  then
    export FASTMU_CUDA_FAST_LAUNCH=0
    echo "[fast launch] failed its GPU test: FASTMU_CUDA_FAST_LAUNCH=0 from here on" | tee -a "$OUT/steps.txt"
  fi
}

run_sweep() {
  # the default "regs" layout at the automatic block count (null) and at 1/4, 1/8 and 1/32 of the
  # tiles per problem, beside the "rows" layout's best knobs from the H100 sweep (unroll 8 at
  # 512 and 2048 threads per SM; regs runs skip 2048, which would spill it). Prefetch, fewer
  # rows per thread and 1024 threads per SM all lost on the H100 (mu_gpu_sweep*_h100.json).
  # Each also in "flat" mode (one wave of blocks, the batch's tiles dealt evenly), not yet measured.
  # 3 kernel builds (+ the flat kernels), 30 timed runs of 247 iterations
  SWEEP_ARGS=${SWEEP_ARGS:-'{"threads": [128], "unrolls": [8], "occupancies": [512, 2048], "stagings": ["rows", "regs"], "rows_per_thread": [null], "prefetches": [false], "bpp_fractions": [null, 4, 8, 32], "block_mode": false, "flat_mode": true}'}
  step sweep "${SWEEP_LIMIT:-80}" python3 -m fastmu.benchmarks.mu_gpu --sweep --sweep-args "$SWEEP_ARGS" \
    --out "$OUT/mu_gpu_sweep.json"
  sweep_table "$OUT/mu_gpu_sweep.json" | tee "$LOGDIR/sweep_table.txt"
}

run_wide() {
  # W2 at 3 blocks of 160 threads per SM (128 registers: the default) beside 4 (96 registers,
  # 20 warps per SM instead of 15: Nsight Compute put W2's bound at too few warps on the H200),
  # 32- and 64-pixel tiles, grid and flat mode. Per bench/sass_report.py at 4 blocks per SM the
  # grid kernel spills 20 B (4 local accesses per tile at ppl 1, 65 at ppl 2). 4 pixels per
  # lane and 2 blocks per SM lost on the H200 (mu_gpu_sweep_wide_h200.json).
  WIDE_ARGS=${WIDE_ARGS:-'{"batches": [150], "threads": [128], "unrolls": [1], "occupancies": [512, 640], "stagings": ["regs"], "bpp_fractions": [null], "block_mode": false, "flat_mode": true, "pixels_per_lane": [1, 2]}'}
  step wide "${WIDE_LIMIT:-90}" python3 -m fastmu.benchmarks.mu_gpu --sweep --sweep-args "$WIDE_ARGS" \
    --out "$LOGDIR/mu_gpu_wide.json"
  sweep_table "$LOGDIR/mu_gpu_wide.json" | tee "$LOGDIR/wide_table.txt"
}

sweep_table() {  # sweep_table FILE: one line per timed configuration
  python3 - "$1" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception as e:
    rows = []; print("no sweep:", e)
for r in rows:
    print(r["batch"], r["mode"], r["threads"], r["unroll"], r["blocks_per_problem"], r.get("occupancy"), r.get("staging"),
          r.get("rows_per_thread"), r.get("prefetch"), "ppl", r.get("pixels_per_lane"),
          "%.4f ms/it %.0f GB/s %.2f" % (r["ms_per_iter"], r["achieved_GBps_one_pass_model"], r["fraction_of_copy_bandwidth"])
          if "ms_per_iter" in r else r.get("error"))
PY
}

run_bench() {
  # knobs: $CONFIGS if given, else the best of the sweep in this call, else of the wide-tile
  # sweep (W2 only), else the automatic choices
  CONFIGS=${CONFIGS:-$(python3 -m fastmu.benchmarks.mu_gpu --best-configs "$OUT/mu_gpu_sweep.json" \
    "$LOGDIR/mu_gpu_wide.json")}
  echo "benchmark configs: $CONFIGS" | tee -a "$OUT/steps.txt"
  # "auto" (what fastmu.mu picks: flat for W2, grid for W1) beside both explicitly; block mode lost
  # everywhere on the H200 (bench/results/mu_gpu_h200.json): MODES=block,grid to time it again
  # the "rows" staging lost everywhere on the H100 (2.3-6x slower): BENCH_STAGINGS=rows,regs to time it again
  step mu_bench "${BENCH_LIMIT:-240}" python3 -m fastmu.benchmarks.mu_gpu --configs "$CONFIGS" \
    --modes "${MODES:-auto,grid,flat}" --stagings "${BENCH_STAGINGS:-regs}" --out "$OUT/mu_gpu.json"
  python3 - "$OUT/mu_gpu.json" <<'PY'
import json, sys
from fastmu.benchmarks.mu_gpu import format_table
try:
    print(format_table(json.load(open(sys.argv[1]))))
except Exception as e:
    print("no MU benchmark table:", e)
PY
}


run_nalmu() {
  # the fused model (its layers one autograd node) in each staging (the backward follows it),
  # beside the same kernels as one node per layer ("chain") and the plain-autograd model,
  # with peak memory, a host-vs-device profile and a cProfile of the fused step
  for st in ${NALMU_STAGINGS:-regs}; do
    FASTMU_CUDA_STAGING=$st step nalmu_$st "${NALMU_LIMIT:-100}" python3 bench/bench_nalmu.py --device cuda \
      --t 16384 --out "$OUT/nalmu_cuda_$st.json" --profile "$LOGDIR/nalmu_profile_tables_$st.txt" \
      --cprofile "$LOGDIR/nalmu_cprofile_$st.txt"
    tail -n 8 "$LOGDIR/nalmu_$st.log" 2>/dev/null
  done
}

run_nalmu_loss() {
  # a whole training step with the paper's loss: on its kernels (fused, chain) or in torch ops
  # (plain); the JSON goes into logs.tgz (a call brings back at most 8 files)
  for st in ${NALMU_STAGINGS:-regs}; do
    FASTMU_CUDA_STAGING=$st step nalmu_loss_$st "${NALMU_LOSS_LIMIT:-60}" python3 bench/bench_nalmu.py --device cuda \
      --t 16384 --objective loss --out "$LOGDIR/nalmu_cuda_loss_$st.json"
    tail -n 8 "$LOGDIR/nalmu_loss_$st.log" 2>/dev/null
  done
  # the loss alone: its kernels beside its torch ops
  step loss "${LOSS_LIMIT:-40}" python3 bench/bench_loss.py --device cuda --t 16384 --out "$LOGDIR/loss_cuda.json"
  tail -n 4 "$LOGDIR/loss.log" 2>/dev/null
}

run_patterns() {
  # how fast X is read in the W2 kernel's pattern (128 B per row and warp) against wider tiles
  # and a linear read, with no arithmetic: how much a different tile shape could gain
  step patterns "${PATTERNS_LIMIT:-45}" python3 -m fastmu.benchmarks.read_patterns --out "$LOGDIR/read_patterns.json"
  tail -n 20 "$LOGDIR/patterns.log" 2>/dev/null
}

run_sanitize() {
  # shared-memory races in every kernel family (tiny shapes, each result checked)
  if command -v compute-sanitizer >/dev/null; then
    step racecheck "${SANITIZE_LIMIT:-90}" compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/gpu_sanity.py
    tail -n 14 "$LOGDIR/racecheck.log" 2>/dev/null
  else
    echo "[racecheck] skipped: no compute-sanitizer" | tee -a "$OUT/steps.txt"
  fi
}

run_nalmu_graph() {
  # the variants' training steps as CUDA-graph replays: device time without host overhead
  for st in ${NALMU_STAGINGS:-regs}; do
    FASTMU_CUDA_STAGING=$st step nalmu_graph_$st "${NALMU_GRAPH_LIMIT:-60}" python3 bench/bench_nalmu.py \
      --device cuda --t 16384 --cuda-graph --out "$OUT/nalmu_cuda_graph_$st.json"
    tail -n 6 "$LOGDIR/nalmu_graph_$st.log" 2>/dev/null
  done
}

run_profile() {
  step mu_profile "${PROFILE_LIMIT:-60}" python3 -m fastmu.benchmarks.mu_gpu --profile "$LOGDIR/mu_profile_tables.txt" \
    --out "$OUT/mu_gpu_profile.json"
}
run_ncu() {
  # Nsight Compute on one W2 iteration of the default kernel: achieved bandwidth, occupancy,
  # and what the warps stall on (the clocks as the card runs them: --clock-control none)
  if command -v ncu >/dev/null; then
    # in the launch design and tile width that timed best for W2 on the H200 (flat, 2 pixels per lane)
    FASTMU_CUDA_GRAPHS=0 FASTMU_CUDA_MODE=${NCU_MODE:-flat} FASTMU_CUDA_PIXELS_PER_LANE=${NCU_PPL:-2} \
      step ncu "${NCU_LIMIT:-90}" ncu --clock-control none -k regex:"mu_(grid|flat)" --launch-skip 5 \
      --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section LaunchStats \
      python3 -c "import torch, fastmu; X = torch.rand(150, 65, 16384, device='cuda'); fastmu.mu(X, 4, n_iter=8, backend='cuda'); torch.cuda.synchronize()"
    grep -E "Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Registers Per|Stall|Warp Cycles" \
      "$LOGDIR/ncu.log" 2>/dev/null | head -n 30
  else
    echo "[ncu] skipped: no ncu" | tee -a "$OUT/steps.txt"
  fi
}
# the steps in the order STEPS names them
for s in $STEPS; do
  case " tests sweep wide bench patterns nalmu nalmu_loss sanitize nalmu_graph profile ncu " in
    *" $s "*) "run_$s" ;;
    *) echo "[$s] unknown step" | tee -a "$OUT/steps.txt" ;;
  esac
done
cat "$OUT/steps.txt"
tar czf "$OUT/logs.tgz" -C "$LOGDIR" .
