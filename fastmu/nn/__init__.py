"""Differentiable learned-MU layers and the learned models (imports torch).

- :func:`learned_mu_step` — one learned-MU layer (``torch.autograd.Function``
  on the fused kernels, handwritten backward).
- :class:`NALMU`, :class:`ALMU` — the unrolled models.

Numba and the kernels load on the first layer call, not on import.
"""
from __future__ import annotations

from fastmu.nn.functional import LearnedMUStep, check_layer_inputs, learned_mu_step, learned_mu_step_pg
from fastmu.nn.models import ALMU, NALMU, constant_init

__all__ = [
    "ALMU",
    "LearnedMUStep",
    "NALMU",
    "check_layer_inputs",
    "constant_init",
    "learned_mu_step",
    "learned_mu_step_pg",
]
