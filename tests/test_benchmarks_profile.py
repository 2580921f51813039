"""The profiling helper of the benchmarks, on the CPU (the GPU fields stay empty)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fastmu.benchmarks.profile import profile_call  # noqa: E402


def test_profile_call_on_cpu():
    x = torch.rand(200, 200)
    out = profile_call(lambda: (x @ x).sum(), "cpu", rows=5)
    assert out["wall_ms"] > 0
    assert out["device_kernel_ms"] is None and out["device_kernels"] is None
    assert out["device_busy_fraction"] is None
    assert "aten::mm" in out["table"] or "aten::matmul" in out["table"]
