"""Facts about the machine a benchmark ran on, stored with every result."""
from __future__ import annotations

import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

#: seconds every timed CPU run waits first: OpenBLAS's idle threads spin for about a tenth of a
#: second after a NumPy or scikit-learn call (torch's and Numba's OpenMP threads for less), and on
#: a 2-core machine the run that follows shares its cores with them. Measured on the 2-core Xeon
#: dev machine (2026-11-29): fastmu's single-problem MU right after a NumPy MU loop took a median
#: 0.268 s per 1000 iterations, 0.248 after a 0.1 s pause and 0.183 after 0.3 s.
SETTLE_S = 0.3


def settle(seconds: float = SETTLE_S) -> None:
    """Wait until the peers' idle threads have stopped spinning, so that no peer times the last one's."""
    time.sleep(seconds)


_PACKAGES = ("fastmu", "numpy", "scipy", "numba", "numba-cuda", "llvmlite", "torch", "scikit-learn", "cupy-cuda12x", "cupy-cuda13x")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    rows = [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for d in threadpool_info()]
    return sorted(rows, key=lambda r: tuple(str(v) for v in r.values()))  # not load order: it varies by run


def machine_info() -> dict[str, Any]:
    """CPU, cores, OS, Python, package versions, BLAS, relevant environment, UTC time."""
    import numba

    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "numba_threading_layer": numba.config.THREADING_LAYER,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "blas": blas_info(),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                         "NUMBA_CPU_FEATURES", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")
                or k.startswith("FASTMU_")},
        "cpu_vectors_512bit": _zmm_status(),
        "cpu_block_products": _products(),
    }


def _products() -> str:
    """Which ``X Sᵀ`` / ``AᵀX`` tiles the blocked CPU kernels compile (kernels.cpu_products)."""
    from fastmu.kernels.cpu_products import EXPLICIT

    return "explicit 256-bit tiles" if EXPLICIT else "auto-vectorised tiles"


def _zmm_status() -> dict[str, object]:
    """The CPU kernels' vector-width setting (importing them applies it, as a solver call would)."""
    import fastmu.kernels.cpu  # noqa: F401
    from fastmu.kernels.cpu_target import status

    return status()
