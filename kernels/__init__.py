"""fastmu.kernels: the fused kernels (pure array code, no torch).

- :mod:`fastmu.kernels.cpu` — Numba parallel CPU kernels.
- :mod:`fastmu.kernels.cuda` — Numba CUDA kernels (imported only on demand).

Nothing here is imported by ``import fastmu``.
"""

import numpy as _np

# numba-cuda <= 0.30 registers an overload for ``np.row_stack`` when it first
# compiles a kernel; NumPy 2.5 removed that alias (deprecated since 2.0), so
# every CUDA compilation failed with AttributeError. Restore the alias (it was
# exactly ``np.vstack``) before any kernel is compiled.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack
