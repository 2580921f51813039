"""fastmu.kernels: the fused kernels (pure array code, no torch).

- :mod:`fastmu.kernels.cpu` — Numba parallel CPU kernels.
- :mod:`fastmu.kernels.cuda` — Numba CUDA kernels (imported only on demand).

Nothing here is imported by ``import fastmu``.
"""
