"""The NALMU step benchmark on a tiny CPU workload: every variant runs and they agree."""
from __future__ import annotations

import math

import pytest

from fastmu.benchmarks.nalmu import IMPLS, format_table, make_step, run_nalmu_benchmark


def test_variants_agree_and_report():
    res = run_nalmu_benchmark(batch=2, m=6, t=40, n_layers=4, n=3, dtype="float64", repeats=2,
                              measure_memory=False)
    assert res["workload"]["impls"] == list(IMPLS)
    checks = [res[name]["check"] for name in IMPLS]  # Σ|∂L/∂θ|: the same gradients in every variant
    assert all(math.isclose(c, checks[0], rel_tol=1e-9) for c in checks)
    assert math.isclose(res["unroll_gain"], res["chain"]["time_s"] / res["fused"]["time_s"])
    assert math.isclose(res["speedup"], res["plain"]["time_s"] / res["fused"]["time_s"])
    assert "one node for the stack" in format_table(res)


def test_loss_objective_and_bad_impl():
    res = run_nalmu_benchmark(batch=2, m=6, t=40, n_layers=3, n=2, dtype="float64", repeats=1,
                              measure_memory=False, objective="loss", impls=("fused", "plain"))
    assert "chain" not in res and math.isclose(res["fused"]["check"], res["plain"]["check"], rel_tol=1e-9)
    with pytest.raises(ValueError, match="impl must be"):
        make_step("fast", 2, 6, 40, 2, 3, "float64", "cpu", 0)


def test_aten_op_counter_counts_forward_and_backward_ops():
    import torch

    from fastmu.benchmarks.opcount import AtenOpCounter

    x = torch.rand(4, requires_grad=True)
    with AtenOpCounter() as fwd:
        y = (x * 2).sum()
    with AtenOpCounter() as bwd:
        y.backward()
    assert fwd.ops == 2  # mul, sum
    assert bwd.ops >= 2 and torch.equal(x.grad, torch.full((4,), 2.0))
