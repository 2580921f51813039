"""The methods the paper compares fastmu's learned models with.

cd
    Coordinate-descent NMF (scikit-learn's ``solver="cd"`` update, batched,
    on torch: any device).
DNMF
    Deep-unfolded NMF (Nasser, Eldar, Sharan): MU for S unrolled with
    learned per-layer matrices in place of ``Aᵀ`` and ``AᵀA``.
SNMFNet
    SNMF-Net (Xiong et al.): unrolled L1/2-sparse projected-gradient NMF
    with learned steps, thresholds and abundance preconditioners.

The learned ones follow fastmu's model interface: ``model(X, return_all=False)``
returns ``(A, S)`` (or every layer's), so :mod:`fastmu.training` trains them
with the paper's loss like NALMU and ALMU. Each imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "cd": ("fastmu.baselines.coordinate_descent", "cd"),
    "DNMF": ("fastmu.baselines.dnmf", "DNMF"),
    "SNMFNet": ("fastmu.baselines.snmf_net", "SNMFNet"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastmu.baselines' has no attribute {name!r}")
