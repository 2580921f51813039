"""fastmu: fast multiplicative-update NMF and its deep-unrolled learned variants.

``import fastmu`` is light: NumPy only. Numba kernels, torch and anything
GPU-related load on first use of the attribute that needs them.

Public API
----------
mu
    Batched Lee-Seung MU solver (NumPy, torch and CuPy arrays in and out).
EPS
    The ε added to every MU denominator, the same on every backend.
ScaleWarning
    Warned where X is so small that EPS pulls the factors towards 0.
metrics
    SAD (mean cosine similarity), spectral angle, RMSE/NMSE, Hungarian matching.
NMF
    scikit-learn-style estimator (a drop-in for ``sklearn.decomposition.NMF``, solvers "mu" and "cd").
NALMU, ALMU
    Learned unrolled MU models (``torch.nn.Module``).
data, nn, losses
    Data generation, differentiable layers, the paper's loss.
baselines
    The methods the paper compares with: coordinate-descent NMF, DNMF, SNMF-Net.
training, experiments
    Training with the paper's loss; the paper's Tables I-II and Fig. 2.
"""
from __future__ import annotations

import importlib
from typing import Any

# registers its at-fork hook now, so a child forked later knows what its parent ran
from fastmu import fork_safety as _fork_safety  # noqa: F401  (cheap: no Numba import)

__version__ = "0.1.0"

#: ε added to every MU denominator (``num / (den + EPS)``), on every backend and dtype.
EPS = 1e-12

_LAZY = {
    "mu": ("fastmu.solver", "mu"),
    "NMF": ("fastmu.estimator", "NMF"),
    "available_backends": ("fastmu.dispatch", "available_backends"),
    "NALMU": ("fastmu.nn.models", "NALMU"),
    "ALMU": ("fastmu.nn.models", "ALMU"),
    "ScaleWarning": ("fastmu.validation", "ScaleWarning"),
}
_SUBMODULES = {"metrics", "data", "nn", "losses", "solver", "reference", "interop", "dispatch", "baselines",
               "training", "experiments"}

__all__ = ["EPS", "__version__", *sorted(_LAZY), *sorted(_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        value = importlib.import_module(f"fastmu.{name}")
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastmu' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
