"""Shared fixtures: the reference data folder, seeded generators, small problems."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The suite runs in two processes (the README's `pytest -n 2`) on as few as two
# cores: OpenMP threads spinning between parallel regions would hold the cores
# the other process needs (README, "On a machine busy with other work"). Read
# when Numba or torch loads OpenMP, so set before either is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$FASTMU_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("FASTMU_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "chandra_mixing_matrices.npz").exists():
        pytest.skip(f"reference data not found in {d} (set FASTMU_SHARED_DATA)")
    return d


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
