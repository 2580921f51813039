"""Differentiable learned-MU layers and the learned models (imports torch).

- :func:`learned_mu_step` — one learned-MU layer (``torch.autograd.Function``
  on the fused kernels, handwritten backward).
- :func:`learned_mu_unroll` — ``L`` such layers as one autograd node (what
  the models run).
- :class:`NALMU`, :class:`ALMU` — the unrolled models.

Numba and the kernels load on the first layer call, not on import.
"""
from __future__ import annotations

from fastmu.nn.functional import (
    LearnedMUStep,
    LearnedMUUnroll,
    check_layer_inputs,
    check_unroll_weights,
    learned_mu_step,
    learned_mu_step_pg,
    learned_mu_unroll,
)
from fastmu.nn.models import ALMU, NALMU, constant_init

__all__ = [
    "ALMU",
    "LearnedMUStep",
    "LearnedMUUnroll",
    "NALMU",
    "check_layer_inputs",
    "check_unroll_weights",
    "constant_init",
    "learned_mu_step",
    "learned_mu_step_pg",
    "learned_mu_unroll",
]
