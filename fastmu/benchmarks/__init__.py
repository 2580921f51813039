"""Benchmark workloads, shared by ``fastmu bench`` and the pytest-benchmark suite in ``bench/``.

They live in the package (not only in ``bench/``) so that an installed
``fastmu bench`` can run them. Every workload times its peers side by side in
one run on the same inputs and reports ratios, GFLOP/s and GB/s.
"""
