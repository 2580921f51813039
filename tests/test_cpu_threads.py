"""The thread governor: its policy on simulated machines, and that it changes no bits."""
from __future__ import annotations

import numpy as np
import pytest

from fastmu import cpu_threads
from fastmu.cpu_threads import ThreadGovernor, thread_levels


class FakeMachine:
    """A kernel whose iteration takes ``cost(threads, now)`` seconds of a fake clock."""

    def __init__(self, cost, threads: int):
        self.cost = cost
        self.now = 0.0
        self.threads = threads
        self.iters_at: dict[int, int] = {}
        self.calls: list[int] = []

    def clock(self) -> float:
        return self.now

    def get(self) -> int:
        return self.threads

    def set(self, k: int) -> None:
        self.threads = k

    def step(self, k: int) -> None:
        self.calls.append(k)
        for _ in range(max(k, 0)):
            self.now += self.cost(self.threads, self.now)
        self.iters_at[self.threads] = self.iters_at.get(self.threads, 0) + max(k, 0)

    def governor(self, most: int, **kw) -> ThreadGovernor:
        kw.setdefault("recall", False)
        return ThreadGovernor(most, clock=self.clock, threads=(self.get, self.set), **kw)


def quiet(threads: int, now: float) -> float:  # the dev machine's quiet single problem, in s/it
    return {2: 0.224e-3, 1: 0.40e-3}[threads]


def busy(threads: int, now: float) -> float:  # beside torch matmuls
    return {2: 8.0e-3, 1: 0.43e-3}[threads]


def test_levels():
    assert thread_levels(1) == [1]
    assert thread_levels(2) == [2, 1]
    assert thread_levels(6) == [6, 3, 1]
    assert thread_levels(16) == [16, 8, 4, 2, 1]
    with pytest.raises(ValueError):
        thread_levels(0)


def test_quiet_machine_stays_on_every_thread_and_pays_one_short_trial():
    m = FakeMachine(quiet, 2)
    g = m.governor(2)
    g.run(m.step, 10_000)
    assert sum(m.calls) == 10_000
    assert g.threads == 2 and g.moves == []
    # one trial of one thread (1, 2, 4, ... iterations until it lasts 5 ms)
    assert 0 < m.iters_at.get(1, 0) <= 64
    assert m.now < 1.01 * 10_000 * quiet(2, 0) + 4e-3


def test_short_quiet_run_is_not_disturbed():
    m = FakeMachine(quiet, 2)
    m.governor(2).run(m.step, 200)  # 45 ms: before the first trial
    assert m.iters_at == {2: 200}


def test_busy_from_the_start_moves_to_one_thread():
    m = FakeMachine(busy, 2)
    g = m.governor(2)
    g.run(m.step, 10_000)
    assert g.moves and g.moves[0][1] == 1
    ideal = 10_000 * busy(1, 0)
    # 50 ms of runs before the early trial (the last slice lasts 36x longer than it was sized
    # for), then trials of two threads, one iteration each, further and further apart
    assert m.now < ideal + 0.05 + 36 * 5e-3 + 0.1
    assert m.iters_at[2] < 60


def test_load_that_comes_and_goes():
    def cost(threads: int, now: float) -> float:
        return busy(threads, now) if 1.0 <= now < 3.0 else quiet(threads, now)

    m = FakeMachine(cost, 2)
    g = m.governor(2)
    g.run(m.step, 20_000)
    downs = [t for t, k in g.moves if k == 1]
    ups = [t for t, k in g.moves if k == 2]
    # a slice sized on the quiet machine (5 ms) lasts 36x longer under the load, then one trial
    assert downs and 1.0 <= downs[0] < 1.0 + 36 * 5e-3 + 0.02
    assert ups and 3.0 <= ups[-1] < 3.0 + 2.0 + 0.05  # within the longest wait of it going
    assert g.threads == 2


def test_rare_long_waits_do_not_lure_it_back():
    """Busy the way a real one is: most iterations on two threads are fast, one in 20 waits 40 ms."""
    count = [0]

    def cost(threads: int, now: float) -> float:
        if threads == 1:
            return 0.43e-3
        count[0] += 1
        return 40e-3 if count[0] % 20 == 0 else 0.3e-3

    m = FakeMachine(cost, 2)
    g = m.governor(2)
    g.run(m.step, 20_000)
    ideal = 20_000 * 0.43e-3
    ups = [t for t, k in g.moves if k == 2]
    assert g.moves[0][1] == 1
    assert len(ups) <= 8  # the wait doubles each time a move up is undone
    assert m.now < 1.15 * ideal


def test_calls_in_small_pieces_keep_their_state():
    """The solver calls run() per event (a callback every iteration gives run(1))."""
    m = FakeMachine(busy, 2)
    g = m.governor(2)
    for _ in range(2000):
        g.run(m.step, 1)
    assert g.threads == 1
    assert m.iters_at[1] > 1900


def test_short_runs_in_a_loop_start_where_the_last_one_ended(monkeypatch):
    monkeypatch.setattr(cpu_threads, "_last", None)
    m = FakeMachine(busy, 2)
    g = m.governor(2, recall=True)
    g.run(m.step, 3000)
    assert g.threads == 1
    for _ in range(5):  # 200 iterations each: all before a fresh governor's first trial
        g = m.governor(2, recall=True)
        assert g.threads == 1
        before = dict(m.iters_at)
        g.run(m.step, 200)
        assert m.iters_at[2] - before[2] <= 1  # at most a one-iteration trial of two threads
    assert m.governor(3, recall=True).threads == 3  # another most: not recalled
    monkeypatch.setattr(cpu_threads, "MEMORY_S", 0.0)
    assert m.governor(2, recall=True).threads == 2  # too old


def test_short_runs_in_a_loop_go_back_up_when_the_load_goes(monkeypatch):
    """Runs shorter than the wait before a trial of more threads still try them: the schedule
    of trials carries over from run to run, as the count does."""
    monkeypatch.setattr(cpu_threads, "_last", None)

    def cost(threads: int, now: float) -> float:
        return busy(threads, now) if now < 2.0 else quiet(threads, now)

    m = FakeMachine(cost, 2)
    back_at = None
    while m.now < 8.0:
        g = m.governor(2, recall=True)
        g.run(m.step, 100)  # 43 ms on one thread, 22 ms on two: shorter than any wait
        if m.now > 2.0 and g.threads == 2 and back_at is None:
            back_at = m.now
        if back_at is not None:
            assert g.threads == 2  # and stays
    assert back_at is not None and back_at < 2.0 + 2.0 + 0.1


def test_descends_to_the_best_count_and_stops():
    def cost(threads: int, now: float) -> float:  # 8 cores, 6 taken: 2 threads is best
        return {8: 20e-3, 4: 6e-3, 2: 1e-3, 1: 1.6e-3}[threads]

    m = FakeMachine(cost, 8)
    g = m.governor(8)
    g.run(m.step, 5000)
    assert [k for _, k in g.moves] == [4, 2]
    assert g.threads == 2
    assert m.iters_at[2] > 0.95 * 5000


def test_restores_the_callers_count_and_passes_zero_through():
    m = FakeMachine(busy, 2)
    g = m.governor(2)
    g.run(m.step, 3000)
    assert m.threads == 2 and g.threads == 1
    g.run(m.step, 0)
    assert m.calls[-1] == 0


def test_a_failing_step_restores_the_count():
    m = FakeMachine(quiet, 2)
    g = m.governor(2)

    def step(k: int) -> None:
        m.set(1)
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError):
        g.run(step, 10)
    assert m.threads == 2


def test_environment_switch(monkeypatch):
    for off in ("0", "false", "No", " off "):
        monkeypatch.setenv(cpu_threads.ENV, off)
        assert not cpu_threads.enabled()
    for on in ("1", "yes", ""):
        monkeypatch.setenv(cpu_threads.ENV, on)
        assert cpu_threads.enabled()
    monkeypatch.delenv(cpu_threads.ENV)
    assert cpu_threads.enabled()


# -- on the real kernels ------------------------------------------------------------------------

numba = pytest.importorskip("numba")
needs_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")


def _problem(b: int, m: int, t: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.random((b, m, 3)) @ rng.random((b, 3, t)) + 0.01).astype(dtype)


def alternating(made: list[int]) -> type:
    """A governor class whose runs take one iteration a step, at 2, 1, 2, 1, ... threads,
    recording the thread count of each step in ``made``."""

    class Alternating(ThreadGovernor):
        def run(self, step, n_iter):
            before = numba.get_num_threads()
            try:
                for _ in range(n_iter):
                    numba.set_num_threads(2 - len(made) % 2)
                    step(1)
                    made.append(numba.get_num_threads())
            finally:
                numba.set_num_threads(before)

    return Alternating


# one problem and three (block-parallel), one tall problem (row-parallel)
SHAPES = [(1, 20, 8000), (3, 20, 3000), (1, 6000, 40)]


@needs_threads
@pytest.mark.parametrize("solver", ["mu", "cd"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_changes_no_bits(solver, shape, dtype, monkeypatch):
    """Each slice at another thread count: the result is the plain run's, bit for bit."""
    import fastmu
    from fastmu.baselines import cd
    from fastmu.kernels import cpu

    run = {"mu": fastmu.mu, "cd": cd}[solver]
    X = _problem(*shape, dtype)
    assert cpu.schedule(*shape, X.itemsize, numba.config.NUMBA_NUM_THREADS) != "problem-major"
    monkeypatch.setenv(cpu_threads.ENV, "0")
    A0, S0 = run(X, 3, n_iter=40, random_state=1)
    monkeypatch.setenv(cpu_threads.ENV, "1")

    made: list[int] = []
    monkeypatch.setattr(cpu_threads, "ThreadGovernor", alternating(made))
    A1, S1 = run(X, 3, n_iter=40, random_state=1)
    assert set(made) == {1, 2}
    np.testing.assert_array_equal(A1, A0)
    np.testing.assert_array_equal(S1, S0)


@needs_threads
def test_engine_governs_only_schedules_that_wait_each_iteration(monkeypatch):
    from fastmu.dispatch import CPUEngine

    def engine(b, m, t):
        X = _problem(b, m, t, np.float32)
        A = np.full((b, m, 3), 0.5, np.float32)
        S = np.full((b, 3, t), 0.5, np.float32)
        return CPUEngine(X, A, S, None, 1e-9)

    monkeypatch.setenv(cpu_threads.ENV, "1")
    assert engine(1, 20, 8000).governor is not None  # one problem: a region per iteration
    assert engine(1, 6000, 40).governor is not None  # tall: row-parallel
    assert engine(4, 20, 300).governor is None  # problem-major: one region for the run
    monkeypatch.setenv(cpu_threads.ENV, "0")
    assert engine(1, 20, 8000).governor is None
    monkeypatch.setenv(cpu_threads.ENV, "1")
    before = numba.get_num_threads()
    numba.set_num_threads(1)  # the caller's choice is the most the governor uses
    try:
        assert engine(1, 20, 8000).governor is None
    finally:
        numba.set_num_threads(before)


def test_schedules_agree_with_the_kernels_choice():
    """The engine decides from kernels.cpu.schedule / kernels.cpu_tiled.schedule: the same rules
    mu_run applies (problem-major: a multiple of the threads, four per thread, or tiny work)."""
    from fastmu.kernels import cpu, cpu_tiled

    assert cpu.schedule(4, 20, 8000, 4, 2) == "problem-major"
    assert cpu.schedule(9, 20, 8000, 4, 2) == "problem-major"
    assert cpu.schedule(3, 20, 8000, 4, 2) == "block-parallel"
    assert cpu.schedule(1, 20, 500, 4, 2) == "problem-major"  # one block: nothing to share
    assert cpu.schedule(1, 6000, 40, 4, 2) == "rows"
    assert cpu.schedule(1, 6000, 40, 4, 1) == "problem-major"  # one thread
    assert cpu_tiled.schedule(1, 64, 2) == "block-parallel"
    assert cpu_tiled.schedule(2, 64, 2) == "problem-major"
    assert cpu_tiled.schedule(1, 8, 2) == "problem-major"  # 8 tiles for two threads: tiny


def test_readme_busy_table_is_the_committed_measurement():
    """The README's busy-machine table is bench_busy.py's rendering of its committed JSON."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_busy", root / "bench" / "bench_busy.py")
    bench_busy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_busy)
    res = json.loads((root / "bench" / "results" / "mu_cpu_busy.json").read_text())
    table = bench_busy.format_table(res).split("\n\n")[0]
    assert table in (root / "README.md").read_text()
    assert "FASTMU_ADAPTIVE_THREADS=0" in res["configs"]
    before = json.loads((root / "bench" / "results" / "mu_cpu_busy_before.json").read_text())
    assert "| single 65 × 16384 | none |" in bench_busy.format_table(before)
    layers = json.loads((root / "bench" / "results" / "nalmu_cpu_busy.json").read_text())
    assert bench_busy.format_table(layers) in (root / "README.md").read_text()
    layers_before = json.loads((root / "bench" / "results" / "nalmu_cpu_busy_before.json").read_text())
    assert bench_busy.format_table(layers_before) in (root / "README.md").read_text()
    for name in ("nalmu_train_cpu_busy.json", "nalmu_train_cpu_busy_before.json"):
        train = json.loads((root / "bench" / "results" / name).read_text())
        assert train["unit"] == "ms per training step"
        assert bench_busy.format_table(train) in (root / "README.md").read_text()


@needs_threads
@pytest.mark.parametrize("shape", [(1, 20, 8000), (4, 20, 2000)])  # block-parallel, problem-major
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_learned_stack_thread_count_changes_no_bits(dtype, shape, monkeypatch):
    """NALMU, its layers at 2, 1, 2, ... threads in the forward and in the backward: the factors
    and every gradient are the plain run's, bit for bit, for one problem and for a batch."""
    import torch

    import fastmu
    from fastmu.nn import functional as F

    X = torch.from_numpy(_problem(*shape, dtype))

    def run():
        F._UNROLL_GOVERNORS.clear()
        torch.manual_seed(0)
        model = fastmu.NALMU(n_layers=5, m=20, n=3, dtype=X.dtype)
        A, S = model(X)
        (A.sum() + (S * S).sum()).backward()
        return [A.detach(), S.detach()] + [p.grad.clone() for p in model.parameters()]

    monkeypatch.setenv(cpu_threads.ENV, "0")
    plain = run()
    monkeypatch.setenv(cpu_threads.ENV, "1")
    made: list[int] = []
    monkeypatch.setattr(cpu_threads, "ThreadGovernor", alternating(made))
    governed = run()
    F._UNROLL_GOVERNORS.clear()
    assert set(made) == {1, 2} and len(made) == 10  # one step per layer, forward and backward
    for a, b in zip(governed, plain):
        assert torch.equal(a, b)


@needs_threads
def test_learned_stack_governs_every_schedule_forward_and_backward(monkeypatch):
    """Each layer opens its own parallel regions whatever the kernels' schedule (a problem-major
    batch too), so the stack is governed for one problem and for a batch, with a governor of its
    own for the backward; not on one thread or with FASTMU_ADAPTIVE_THREADS=0."""
    import torch

    from fastmu.nn import functional as F

    monkeypatch.setattr(F, "_UNROLL_GOVERNORS", {})
    one, batch = torch.zeros((1, 20, 8000)), torch.zeros((4, 20, 8000))
    gov = F._CpuLayers.governor(one)
    assert gov is not None and F._CpuLayers.governor(one) is gov  # kept across calls: it learns
    assert F._CpuLayers.governor(batch) is not None  # problem-major: still one region per layer
    back = F._CpuLayers.governor(one, backward=True)
    assert back is not None and back is not gov and F._CpuLayers.governor(one, backward=True) is back
    monkeypatch.setenv(cpu_threads.ENV, "0")
    assert F._CpuLayers.governor(one) is None and F._CpuLayers.governor(batch, backward=True) is None
    monkeypatch.setenv(cpu_threads.ENV, "1")
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert F._CpuLayers.governor(one) is None  # the caller's one thread
    finally:
        numba.set_num_threads(before)
    for t in range(8000, 8000 + 2 * F._MAX_UNROLL_GOVERNORS):  # many shapes: the cache stays bounded
        F._CpuLayers.governor(torch.zeros((1, 20, t)))
    assert len(F._UNROLL_GOVERNORS) == F._MAX_UNROLL_GOVERNORS


def test_run_in_slices_runs_every_iteration_in_bounded_slices():
    now = [0.0]
    calls = []
    compiled = []

    def step(k):
        calls.append(k)
        now[0] += k * (0.001 if compiled else 0.5)  # a slow first slice (a compile), then 1 ms each
        compiled.append(True)

    nxt = cpu_threads.run_in_slices(step, 10_000, slice_s=0.25, clock=lambda: now[0])
    assert sum(calls) == 10_000
    assert calls[0] == 1
    assert all(b <= 16 * a for a, b in zip(calls, calls[1:-1]))  # never more than 16-fold growth
    assert 249 <= max(calls) <= 250 and 249 <= nxt <= 250  # then about 0.25 s per slice (float rounding)
    calls.clear()  # the next run starts at the size learned: short runs stay one call each
    assert 249 <= cpu_threads.run_in_slices(step, 10, nxt, slice_s=0.25, clock=lambda: now[0]) <= 250
    assert calls == [10]


def test_run_in_slices_ends_where_a_step_says_stop():
    calls = []

    def step(k):
        calls.append(k)
        return sum(calls) >= 40  # a stopping rule met within this slice

    cpu_threads.run_in_slices(step, 10_000, slice_s=1.0, clock=lambda: float(len(calls)) * 1e-6)
    assert sum(calls) >= 40 and sum(calls) - calls[-1] < 40  # no slice after the one that stopped


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGINT"), reason="needs SIGINT")
def test_ctrl_c_stops_a_long_problem_major_run_quickly():
    """One parallel region per run (a batch): without slices Ctrl-C would wait for the whole run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import numpy as np, fastmu; X = np.random.default_rng(0).random((8, 20, 512)); "
            "fastmu.mu(X, 3, n_iter=5, random_state=0); print('go', flush=True); "
            "fastmu.mu(X, 3, n_iter=10**8, random_state=0)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "go"
        time.sleep(1.0)
        t0 = time.perf_counter()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        waited = time.perf_counter() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert "KeyboardInterrupt" in err
    assert waited < 5.0
