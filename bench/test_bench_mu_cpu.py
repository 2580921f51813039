"""pytest-benchmark: plain MU on the CPU, fastmu beside its peers (same inputs, same iterations).

Run: ``python -m pytest bench/test_bench_mu_cpu.py --benchmark-only --benchmark-group-by=param:workload``
(the ``fastmu bench`` command runs the same workloads and prints ratios).
Not part of the test suite: nothing here asserts a time.
"""
from __future__ import annotations

import pytest

from fastmu.benchmarks.mu_cpu import WORKLOADS, _peers, make_problem

ITERS = 200  # per benchmark round; ms/iteration is what compares


@pytest.fixture(scope="module", params=sorted(WORKLOADS))
def workload(request):
    spec = WORKLOADS[request.param]
    X, A0, S0 = make_problem(spec["b"], spec["m"], spec["n"], spec["t"])
    peers = _peers(X, A0, S0, ITERS, with_sklearn=spec["b"] == 1)
    for warm in ("fastmu", "fastmu-blocked", "fastmu-untransposed"):  # compile / load outside the timing
        if warm in peers:
            peers[warm]()
    return request.param, peers


@pytest.mark.parametrize("peer", ["fastmu", "fastmu-blocked", "fastmu-untransposed", "numpy", "torch", "sklearn"])
def test_mu_cpu(benchmark, workload, peer):
    name, peers = workload
    if peer not in peers:
        pytest.skip(f"{peer} is not a peer of workload {name}")
    benchmark.group = f"{name} ({ITERS} iterations)"
    benchmark.extra_info.update(workload=name, peer=peer, iterations=ITERS, **WORKLOADS[name])
    benchmark.pedantic(peers[peer], rounds=3, iterations=1)
