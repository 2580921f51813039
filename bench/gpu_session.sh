#!/usr/bin/env bash
# One GPU session, run from the repository root on a machine with an NVIDIA GPU:
# environment report, GPU tests, kernel-knob sweep, W1/W2 benchmark with peers,
# kernel-vs-wall-time profile, NALMU benchmark (with its profile). Each step has
# its own time limit and a failed step does not stop the next. Results (JSON,
# env, test log) land in $OUT (default bench/results/gpu_session), every
# step's log in $OUT/logs.tgz.
#
#   bash bench/gpu_session.sh            # with fastmu installed or from a checkout
#   STEPS="tests sweep" bash bench/gpu_session.sh   # a subset (tests sweep bench profile nalmu)
#
# With ~10 minutes per device call, two calls cover what matters most:
#   STEPS="sweep bench"  (~6.5 min: the knob sweep, then W1/W2 with each staging's best knobs)
#   STEPS="nalmu tests"  (~8 min: NALMU eager + CUDA-graph, then the GPU tests)
# and STEPS=profile (~1.5 min) when the numbers need explaining.
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
# STEPS picks what runs (default all): e.g. STEPS="tests sweep" in one device call and
# STEPS="bench profile nalmu" in the next, so that each call fits its time limit.
STEPS=${STEPS:-"tests sweep bench profile nalmu"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME LIMIT_S CMD...: run with a limit, log to $OUT/NAME.log, report rc and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
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
if want tests; then
  PYTEST_EXTRA=()
  python3 -c "import xdist" 2>/dev/null && PYTEST_EXTRA+=(-n 8)
  python3 -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA+=(--timeout 240)
  step gpu_tests "${TESTS_LIMIT:-240}" python3 -m pytest -v -rfE -p no:cacheprovider "${PYTEST_EXTRA[@]}" \
    tests/test_cuda_gpu.py tests/test_nn_gpu.py tests/test_cuda_ptx.py --junitxml="$LOGDIR/gpu_tests.xml"
  cp "$LOGDIR/gpu_tests.log" "$OUT/"
  tail -n 15 "$OUT/gpu_tests.log"
fi

if want sweep; then
  # the "rows" knobs that won on the H200 (grid mode, 128 threads, unroll 8 at 2048 threads per SM
  # for W2, unroll 1 at 512 for W1) beside the register-resident "regs" layout at two row counts,
  # with and without loading the next tile ahead (regs runs skip 2048 threads per SM, which would spill it)
  SWEEP_ARGS=${SWEEP_ARGS:-'{"threads": [128], "unrolls": [1, 8], "occupancies": [512, 2048], "stagings": ["rows", "regs"], "rows_per_thread": [null, 9], "prefetches": [false, true], "bpp_fractions": [1, 4, 16, 64], "block_mode": false}'}
  step sweep "${SWEEP_LIMIT:-170}" python3 -m fastmu.benchmarks.mu_gpu --sweep --sweep-args "$SWEEP_ARGS" \
    --out "$OUT/mu_gpu_sweep.json"
  python3 - "$OUT/mu_gpu_sweep.json" <<'PY' | tee "$LOGDIR/sweep_table.txt"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception as e:
    rows = []; print("no sweep:", e)
for r in rows:
    print(r["batch"], r["mode"], r["threads"], r["unroll"], r["blocks_per_problem"], r.get("occupancy"), r.get("staging"),
          r.get("rows_per_thread"), r.get("prefetch"),
          "%.4f ms/it %.0f GB/s %.2f" % (r["ms_per_iter"], r["achieved_GBps_one_pass_model"], r["fraction_of_copy_bandwidth"])
          if "ms_per_iter" in r else r.get("error"))
PY
fi

if want bench; then
  # knobs: $CONFIGS if given, else the best of a sweep in this call, else the automatic choices
  CONFIGS=${CONFIGS:-$(python3 - "$OUT/mu_gpu_sweep.json" <<'PY'
import json, sys
try:
    best = json.load(open(sys.argv[1]))["best_by_staging"]
except Exception:
    best = {}
cfg = {}
keys = ("threads", "unroll", "blocks_per_problem", "occupancy", "staging", "rows_per_thread", "prefetch")
for w, b in (("W1", "1"), ("W2", "150")):
    if b in best:  # the sweep's best knobs for each staging, each timed in the benchmark
        cfg[w] = {st: {k: r[k] for k in keys if k in r} for st, r in best[b].items()}
print(json.dumps(cfg))
PY
)}
  echo "benchmark configs: $CONFIGS" | tee -a "$OUT/steps.txt"
  # block mode lost everywhere on the H200 (bench/results/mu_gpu_h200.json): MODES=block,grid to time it again
  step mu_bench "${BENCH_LIMIT:-200}" python3 -m fastmu.benchmarks.mu_gpu --configs "$CONFIGS" \
    --modes "${MODES:-grid}" --out "$OUT/mu_gpu.json"
  python3 - "$OUT/mu_gpu.json" <<'PY'
import json, sys
from fastmu.benchmarks.mu_gpu import format_table
try:
    print(format_table(json.load(open(sys.argv[1]))))
except Exception as e:
    print("no MU benchmark table:", e)
PY
fi

if want profile; then
  step mu_profile "${PROFILE_LIMIT:-90}" python3 -m fastmu.benchmarks.mu_gpu --profile "$LOGDIR/mu_profile_tables.txt" \
    --out "$OUT/mu_gpu_profile.json"
fi

if want nalmu; then
  # each staging of the fused model (the backward follows it), eagerly (with peak memory
  # and a host-vs-device profile) and as CUDA-graph replays (device time alone)
  for st in ${NALMU_STAGINGS:-regs}; do
    FASTMU_CUDA_STAGING=$st step nalmu_$st "${NALMU_LIMIT:-130}" python3 bench/bench_nalmu.py --device cuda \
      --t 16384 --out "$OUT/nalmu_cuda_$st.json" --profile "$LOGDIR/nalmu_profile_tables_$st.txt"
    tail -n 8 "$LOGDIR/nalmu_$st.log"
    FASTMU_CUDA_STAGING=$st step nalmu_graph_$st "${NALMU_GRAPH_LIMIT:-90}" python3 bench/bench_nalmu.py \
      --device cuda --t 16384 --cuda-graph --out "$OUT/nalmu_cuda_graph_$st.json"
    tail -n 6 "$LOGDIR/nalmu_graph_$st.log"
  done
fi
cat "$OUT/steps.txt"
tar czf "$OUT/logs.tgz" -C "$LOGDIR" .
