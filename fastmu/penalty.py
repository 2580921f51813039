"""L1 and L2 penalties on the factors: fastmu's regularised MU objective.

With penalties the objective is::

    ½‖X − A S‖²_F + l1_A ‖A‖₁ + ½ l2_A ‖A‖²_F + l1_S ‖S‖₁ + ½ l2_S ‖S‖²_F

and the multiplicative updates keep their numerators; each penalty adds its
gradient to a denominator::

    A ← A ⊙ (X Sᵀ) ⊘ (A (S Sᵀ + l2_A I) + ε + l1_A)
    S ← S ⊙ (Aᵀ X) ⊘ ((Aᵀ A + l2_S I) S + ε + l1_S)

These are scikit-learn's regularised MU updates (its ``l1_reg_W`` …
``l2_reg_H``, see :func:`from_sklearn`). The kernels take the four weights
as a plain tuple of floats: the L2 weights go on the diagonals of the Gram
matrices, where they cost nothing per pixel, and the L1 weights join ε.
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple


class Penalty(NamedTuple):
    """The four penalty weights of :mod:`fastmu.penalty` (all ≥ 0; zeros: plain MU)."""

    l1_A: float = 0.0
    l2_A: float = 0.0
    l1_S: float = 0.0
    l2_S: float = 0.0

    @property
    def active(self) -> bool:
        """Whether any weight is non-zero."""
        return any(v != 0.0 for v in self)

    def transposed(self) -> "Penalty":
        """The penalty of the transposed problem ``Xᵀ ≈ Sᵀ Aᵀ`` (A's and S's weights swapped)."""
        return Penalty(self.l1_S, self.l2_S, self.l1_A, self.l2_A)


#: no penalty
NONE = Penalty()


def _weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (v >= 0.0) or v == float("inf"):  # also refuses NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_penalty(l1_A: Any = 0.0, l2_A: Any = 0.0, l1_S: Any = 0.0, l2_S: Any = 0.0) -> Penalty:
    """Validated :class:`Penalty` from the four weights (finite, non-negative reals)."""
    return Penalty(_weight(l1_A, "l1_A"), _weight(l2_A, "l2_A"), _weight(l1_S, "l1_S"), _weight(l2_S, "l2_S"))


def from_sklearn(alpha_W: float, alpha_H: float, l1_ratio: float, n_samples: int, n_features: int) -> Penalty:
    """scikit-learn's regularisation of ``X (n_samples, n_features) ≈ W H`` as a :class:`Penalty`
    on ``A = W``, ``S = H``.

    scikit-learn (≥ 1.2) scales the weights by the other factor's dimension:
    ``l1_reg_W = n_features·alpha_W·l1_ratio``, ``l2_reg_W = n_features·alpha_W·(1 − l1_ratio)``,
    and the same for H with ``n_samples``. ``alpha_H`` is a number here
    (the estimator resolves ``"same"``).
    """
    return Penalty(
        n_features * alpha_W * l1_ratio,
        n_features * alpha_W * (1.0 - l1_ratio),
        n_samples * alpha_H * l1_ratio,
        n_samples * alpha_H * (1.0 - l1_ratio),
    )
