"""512-bit vectors for the CPU kernels on AVX-512 machines.

LLVM's x86 tuning prefers 256-bit vectors even where AVX-512 exists (older
Xeons lowered their clock under heavy 512-bit use). On this project's dev
machine (Xeon, Emerald Rapids class) the fused MU iteration ran about 12 %
faster with 512-bit vectors (150 × 65×1024, float32: about 1.00 against
1.14 ms per iteration, medians of three alternating runs), so fastmu asks for
them, the only way Numba allows: the process-wide CPU feature string, set
before Numba's CPU code generator is created.

The change applies to every Numba function compiled in the process
afterwards, not only fastmu's. It is skipped when

- ``FASTMU_CPU_ZMM=0`` is set,
- the user set ``NUMBA_CPU_FEATURES`` (their choice wins),
- the CPU has no AVX-512F, or
- Numba already compiled something in this process (its code generator
  then exists and keeps its features).

:func:`status` reports what happened (the benchmarks record it).
"""
from __future__ import annotations

import os

_state = {"requested": False, "active": False, "reason": "not attempted"}


def _codegen_exists() -> bool:
    from numba.core.registry import cpu_target

    return "_toplevel_target_context" in vars(cpu_target)


def prefer_512bit_vectors() -> None:
    """Turn off LLVM's 256-bit preference for Numba's CPU target, when allowed (see module doc)."""
    if _state["requested"]:
        return
    _state["requested"] = True
    if os.environ.get("FASTMU_CPU_ZMM", "1") == "0":
        _state["reason"] = "FASTMU_CPU_ZMM=0"
        return
    from numba.core import config

    if config.CPU_FEATURES is not None or config.CPU_NAME is not None:
        _state["reason"] = "NUMBA_CPU_FEATURES / NUMBA_CPU_NAME set by the user"
        _state["active"] = "-prefer-256-bit" in (config.CPU_FEATURES or "")
        return
    import llvmlite.binding as ll

    features = ll.get_host_cpu_features()
    if not features.get("avx512f", False):
        _state["reason"] = "no AVX-512F"
        return
    if _codegen_exists():
        _state["reason"] = "Numba's CPU code generator already existed (something was compiled first)"
        return
    config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
    _state.update(active=True, reason="AVX-512F host: 512-bit vectors preferred")


def status() -> dict[str, object]:
    """Whether the kernels compile with 512-bit vectors preferred, and why (not)."""
    return dict(_state)
