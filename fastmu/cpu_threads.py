"""How many threads a CPU run uses, chosen while it runs.

Numba's OpenMP threads spin between parallel regions, and the schedules for
one or a few problems open a region per iteration. Where other work wants the
same cores, an iteration waits for a thread the scheduler took away: one
65 × 16384 problem ran 46× slower beside a torch process (README, "On a
machine busy with other work"). Fewer threads avoid the wait.

:class:`ThreadGovernor` runs such a kernel in slices and times them. It tries
half the threads where the run slows down (and once, early, in case the
machine was busy from the start), goes down while that is faster, and tries
twice the threads again from time to time, waiting longer each time that
loses. The kernels split their sums by ``NUMBA_NUM_THREADS``, not by the
threads at work (``numba.set_num_threads``), so the results stay bit for
bit as they are: only the speed changes.

``FASTMU_ADAPTIVE_THREADS=0`` in the environment turns it off; a thread count
below ``NUMBA_NUM_THREADS`` set with ``numba.set_num_threads`` is the most it
uses.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from typing import Callable

#: environment variable: ``0`` (or ``false``, ``no``, ``off``) turns the governor off
ENV = "FASTMU_ADAPTIVE_THREADS"


def enabled() -> bool:
    """Whether ``FASTMU_ADAPTIVE_THREADS`` leaves the governor on (the default)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def thread_levels(most: int) -> list[int]:
    """The thread counts the governor moves between: ``most``, halved down to 1."""
    if most < 1:
        raise ValueError(f"most must be at least 1, got {most}")
    levels = [most]
    while levels[-1] > 1:
        levels.append(levels[-1] // 2)
    return levels


#: how long a run's last thread count is remembered for the next run (seconds, wall clock)
MEMORY_S = 2.0

#: the last governed run: ``(clock at its end, most, level, wait, clock when a trial of more
#: threads is due)``; read by the next governor
_last: tuple[float, int, int, float, float] | None = None


def _numba_threads() -> tuple[Callable[[], int], Callable[[int], None]]:
    import numba

    return numba.get_num_threads, numba.set_num_threads


def adjustable_threads() -> int:
    """Numba's thread count where a governor may move it, else 0: when Numba runs one thread (the
    caller's ``numba.set_num_threads`` is the most used) or with ``FASTMU_ADAPTIVE_THREADS=0``."""
    import numba

    most = numba.get_num_threads()
    return most if most > 1 and enabled() else 0


def governed_threads(schedule: str) -> int:
    """The most threads a governor of a run of a kernel ``schedule`` would use, or 0 for none.

    0 for ``"problem-major"`` (one parallel region for the whole run: the
    threads never wait for each other), and where :func:`adjustable_threads`
    is 0.
    """
    return adjustable_threads() if schedule != "problem-major" else 0


def governor_for(schedule: str) -> "ThreadGovernor | None":
    """A new governor for a run of a kernel ``schedule``, or None (:func:`governed_threads`)."""
    most = governed_threads(schedule)
    return ThreadGovernor(most) if most else None


class ThreadGovernor:
    """Runs a kernel's iterations in timed slices at the thread count that measures fastest.

    Parameters
    ----------
    most
        The largest thread count to use (level 0).
    clock
        Seconds, monotonic (``time.perf_counter``; tests pass a fake).
    threads
        ``(get, set)`` of the thread count (Numba's by default).
    slice_s
        Target length of a slice at the chosen count: long enough that a
        kernel call's own cost (7 µs measured) does not count, short enough
        to notice a change in load soon (a slice sized on a quiet machine
        lasts as many times longer as the load slows it).
    probe_s
        Length of a trial at another count. A trial runs 1, 2, 4, ...
        iterations until it has lasted this long, so a count that is very
        slow on a busy machine costs one iteration, not a slice.
    first_probe_s
        Run time before the one early trial of fewer threads: short runs on a
        quiet machine pay nothing.
    slower
        A slice this many times slower than the fastest at its count counts as
        a slow-down and starts a trial of fewer threads.
    margin, up_margin
        A trial of fewer (more) threads must beat the current count's recent
        slices by this factor to be taken: noise must not flip the count back
        and forth, and a short trial of more threads on a busy machine often
        misses the rare long waits that make them slow.
    wait_s, max_wait_s
        Run time before the first trial of more threads after a move down; it
        doubles after each trial that loses and after each move down that
        undoes a recent move up, up to ``max_wait_s``.
    recall
        Start at the thread count the last governed run ended at, if it ended
        less than :data:`MEMORY_S` ago (on ``clock``) with the same ``most``,
        with its schedule of trials of more threads (short runs in a loop on
        a busy machine would otherwise each start on every thread), and
        leave this run's for the next.
    """

    def __init__(
        self,
        most: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
        threads: tuple[Callable[[], int], Callable[[int], None]] | None = None,
        slice_s: float = 0.005,
        probe_s: float = 0.004,
        first_probe_s: float = 0.05,
        slower: float = 1.5,
        margin: float = 1.1,
        up_margin: float = 1.25,
        wait_s: float = 0.1,
        max_wait_s: float = 2.0,
        recall: bool = True,
    ) -> None:
        self.levels = thread_levels(most)
        self._clock = clock
        self._get, self._set = threads if threads is not None else _numba_threads()
        self.slice_s, self.probe_s, self.first_probe_s = slice_s, probe_s, first_probe_s
        self.slower, self.margin, self.up_margin = slower, margin, up_margin
        self.wait_s, self.max_wait_s = wait_s, max_wait_s
        self.level = 0
        self.elapsed = 0.0  # seconds of timed kernel runs
        self._recent: list[deque] = [deque(maxlen=3) for _ in self.levels]  # s/it of the last slices
        self._best = [math.inf] * len(self.levels)
        self._warm = False
        self._tried_down_early = False
        self._slowed = False
        self._next_up = math.inf  # elapsed time of the next trial of more threads
        self._wait = wait_s
        self._go_on = 0  # after a move: keep going that way (-1 up, +1 down), 0 not
        #: ``(elapsed, threads)`` at each change of the count, for tests and reports
        self.moves: list[tuple[float, int]] = []
        self._recall = recall
        if recall and _last is not None:
            at, last_most, level, wait, due = _last
            now = clock()
            if last_most == most and level > 0 and 0 <= now - at < MEMORY_S:
                # carry the schedule of trials of more threads over too: runs shorter
                # than the wait would otherwise never try them, and stay down for good
                self.level = level
                self._tried_down_early = True
                self._wait = wait
                self._next_up = max(0.0, due - now)

    @property
    def threads(self) -> int:
        """The thread count the run is at now."""
        return self.levels[self.level]

    def run(self, step: Callable[[int], None], n_iter: int) -> None:
        """Run ``step(k)`` for ``k`` iterations at a time until ``n_iter`` are done.

        ``step`` must continue where the last call ended (the engines carry P
        and G over), so slicing changes nothing but the timing. The caller's
        thread count is restored on return.
        """
        if n_iter <= 0:
            step(n_iter)
            return
        before = self._get()
        try:
            done = 0
            if not self._warm:
                # the first call may compile or load the kernel and starts the threads: not timed
                k = min(n_iter, 2)
                self._set(self.threads)
                step(k)
                done += k
                self._warm = True
            while done < n_iter:
                trial = self._trial()
                if trial is None:
                    done += self._slice(step, n_iter - done)
                else:
                    done += self._try(step, trial, n_iter - done)
        finally:
            self._set(before)
            if self._recall:
                global _last
                now = self._clock()
                _last = (now, self.levels[0], self.level, self._wait, now + self._next_up - self.elapsed)

    # -- one slice at the current count, one trial at another ----------------------------------

    def _slice(self, step: Callable[[int], None], left: int) -> int:
        recent = self._recent[self.level]
        # the first slice is short: its time sizes the next ones
        k = min(left, 4) if not recent else max(1, min(left, int(self.slice_s / max(recent[-1], 1e-9))))
        self._set(self.threads)
        t0 = self._clock()
        step(k)
        per = (self._clock() - t0) / k
        self.elapsed += per * k
        recent.append(per)
        if per > self.slower * self._best[self.level]:
            self._slowed = True
        self._best[self.level] = min(self._best[self.level], per)
        return k

    def _trial(self) -> int | None:
        """The level to try next instead of a slice at the current one, or None."""
        if not self._recent[self.level]:
            return None  # nothing to compare with yet
        down = self.level + 1 if self.level + 1 < len(self.levels) else None
        up = self.level - 1 if self.level > 0 else None
        if self._go_on == 1 and down is not None or self._go_on == -1 and up is not None:
            return self.level + self._go_on
        self._go_on = 0
        if down is not None and (self._slowed or (not self._tried_down_early and self.elapsed >= self.first_probe_s)):
            return down
        if up is not None and self.elapsed >= self._next_up:
            return up
        return None

    def _try(self, step: Callable[[int], None], level: int, left: int) -> int:
        self._set(self.levels[level])
        k, done, spent, per = 1, 0, 0.0, math.inf
        while done < left and spent < self.probe_s:
            k = min(k, left - done)
            t0 = self._clock()
            step(k)
            dt = self._clock() - t0
            per = dt / k  # the longest run is the trial's measure: the first ones wake the threads
            done += k
            spent += dt
            k *= 2
        self.elapsed += spent
        current = sorted(self._recent[self.level])[len(self._recent[self.level]) // 2]  # median
        going_down = level > self.level
        if going_down:
            self._tried_down_early = True
            self._slowed = False
        # Waits on a busy machine are rare and long: a short trial of more threads
        # often sees none of them, so more threads must win by more.
        margin = self.margin if going_down else self.up_margin
        if per * margin < current:
            if going_down:
                up_at = self.moves[-1][0] if self.moves and self.moves[-1][1] > self.levels[level] else None
                if up_at is not None and self.elapsed - up_at < self.max_wait_s:
                    self._wait = min(2 * self._wait, self.max_wait_s)  # undoes a recent move up
                else:
                    self._wait = self.wait_s  # a new load
            self.level = level
            self._recent[level].clear()
            self._recent[level].append(per)
            self._best[level] = min(self._best[level], per)
            self.moves.append((self.elapsed, self.threads))
            self._go_on = 1 if going_down else -1
            self._next_up = self.elapsed + self._wait
        else:
            self._go_on = 0
            if not going_down:
                self._wait = min(2 * self._wait, self.max_wait_s)
                self._next_up = self.elapsed + self._wait
        if self.level == 0:
            self._next_up = math.inf
        return done


#: the longest a run of the kernels holds the interpreter without a governor (seconds): Python
#: handles Ctrl-C (KeyboardInterrupt) only between calls into compiled code
SLICE_S = 0.25


def run_in_slices(step: Callable[[int], bool | None], n_iter: int, first: int = 1, slice_s: float = SLICE_S,
                  clock: Callable[[], float] = time.perf_counter) -> int:
    """``step(k)`` calls for ``n_iter`` iterations in all, each of about ``slice_s`` seconds.

    For runs no governor slices (one parallel region per run, or one thread):
    a run of 10 000 iterations on 150 problems would otherwise hold the
    interpreter for minutes, and Ctrl-C would wait for it. The first slice has
    ``first`` iterations (a caller's earlier return value, or 1); each next
    one is sized from the last one's rate, at most 16 times the last size, so a
    slice timed with a cold cache or a compile cannot make the next one run
    long. The kernels carry their state from call to call, so the slices
    change no result. A step that returns True ends the run there (its own
    stopping rule, which it may have met before its last iteration).

    Returns
    -------
    int
        The slice size the last rate calls for: ``first`` of the caller's next
        run, so that short runs (between callbacks or tolerance checks) stay
        one call each.
    """
    done, k = 0, max(1, int(first))
    while done < n_iter:
        take = min(k, n_iter - done)
        t0 = clock()
        stop = step(take)
        dt = clock() - t0
        if stop is True:  # the step's own stopping rule (fewer iterations than take, perhaps)
            break
        done += take
        per_iter = dt / take
        k = max(1, min(16 * k, int(slice_s / per_iter))) if per_iter > 0 else 16 * k
    return k
