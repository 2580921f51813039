"""Run the CPU kernels only where Numba will not kill the process.

Two cases, each turned into something a caller can live with:

- a forked child of a process that ran Numba's OpenMP layer: a clear error
  (below);
- two Python threads in Numba's ``workqueue`` layer at once (Numba aborts the
  process: "Concurrent access has been detected"): the kernels take turns
  (:func:`cpu_kernels`).

The first case in detail:

Numba's OpenMP threading layer (``omp``, its default on Linux without TBB)
is not fork-safe: in a process forked after its threads started (``os.fork``,
``multiprocessing``'s default ``"fork"`` start method on Linux before Python
3.14), the first parallel region prints "Terminating: fork() called from a
process already using GNU OpenMP" and sends the process SIGTERM. A
``multiprocessing.Pool`` whose workers die that way waits forever for their
results. :func:`check_cpu_kernels_usable` turns that into a RuntimeError, which
a pool hands back to the caller, before any parallel kernel runs.

torch's CPU operations in such a process wait forever on the same OpenMP
runtime, so fastmu's torch paths on the CPU (``backend="torch"``, CD in torch
operations, the models with ``fused=False``, DNMF, SNMF-Net, the loss in
torch operations) check too. A process forked before fastmu's first CPU run,
or whose parent ran Numba's ``workqueue`` or ``tbb`` layer
(``NUMBA_THREADING_LAYER``), is not affected.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

#: set in a forked child whose parent had started Numba's OpenMP threads
_forked_after_omp = False
#: whether Numba's threading layer is ``workqueue`` (None: its threads have not started yet)
_workqueue: bool | None = None
#: held around parallel CPU kernels where the layer is ``workqueue``; reentrant, because
#: entry points nest (the estimator calls the solver, a model the layers)
_workqueue_turns = threading.RLock()


def _after_fork_in_child() -> None:
    global _forked_after_omp, _workqueue_turns
    _workqueue_turns = threading.RLock()  # a thread of the parent may have held it: it has no thread here
    if _forked_after_omp or "numba" not in sys.modules:
        return  # already marked (a grandchild), or Numba never ran in the parent
    try:
        layer = sys.modules["numba"].threading_layer()
    except Exception:  # ValueError: no parallel region has run, so no threads to inherit
        return
    _forked_after_omp = layer == "omp"


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_cpu_kernels_usable() -> None:
    """Raise RuntimeError where a parallel CPU kernel would kill this process.

    That is a process forked from one that had already run Numba's OpenMP
    threading layer (module docstring). Costs an attribute read.

    Raises
    ------
    RuntimeError
        Naming the remedies: the ``"spawn"`` or ``"forkserver"`` start method,
        or a fork-safe Numba threading layer chosen before the first run.
    """
    if _forked_after_omp:
        raise RuntimeError(
            "fastmu cannot compute on the CPU in a process forked from one that already ran its "
            "CPU kernels: Numba's OpenMP threading layer is not fork-safe (its kernels would "
            "terminate this process, and torch's CPU operations wait forever on the same OpenMP "
            "runtime). Start worker processes with multiprocessing.get_context('spawn') or "
            "'forkserver' (e.g. ProcessPoolExecutor(mp_context=...)), or choose a fork-safe "
            "threading layer before the parent's first run: NUMBA_THREADING_LAYER=workqueue, "
            "or 'tbb' with the tbb package installed")


def _layer_is_workqueue() -> bool | None:
    """Whether Numba's threading layer is ``workqueue``; None until its threads have started
    (starting them just to ask would mark a process forked later as unable to compute)."""
    global _workqueue
    if _workqueue is None:
        import numba

        try:
            _workqueue = numba.threading_layer() == "workqueue"
        except ValueError:  # no parallel region has run yet
            return None
    return _workqueue


@contextlib.contextmanager
def cpu_kernels() -> Iterator[None]:
    """The context in which fastmu runs its parallel CPU kernels.

    Checks :func:`check_cpu_kernels_usable`. Where Numba's threading layer is
    ``workqueue`` (``NUMBA_THREADING_LAYER=workqueue``, or the fallback where
    neither OpenMP nor TBB loads), which aborts the process when two threads
    enter parallel code at once, it also holds a process-wide lock, so that
    concurrent calls from several Python threads run one after another.
    Under ``omp`` and ``tbb`` it holds nothing: their calls run together.
    Until a parallel region has run, the layer is not known (and starting
    Numba's threads to learn it would make a later fork's child refuse to
    compute), so the lock is held then too.

    Raises
    ------
    RuntimeError
        As :func:`check_cpu_kernels_usable`.
    """
    check_cpu_kernels_usable()
    if _layer_is_workqueue() is not False:  # workqueue, or not known yet: the lock costs nothing uncontended
        with _workqueue_turns:
            yield
    else:
        yield
