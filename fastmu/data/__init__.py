"""Data for fastmu: X-ray spectra, source maps, and mixtures made on the fly.

Spectra
    :func:`spectra` draws physics-based mixing matrices ``A (n, m, 4)``
    (synchrotron, thermal, Fe line 1, Fe line 2; unit-norm columns);
    :func:`energy_grid` and :data:`PARAMETER_RANGES` document the model.
Sources
    :func:`natural_images` (photo crops, dead leaves, 1/f fields),
    :func:`photo_crops`, :func:`dead_leaves`, :func:`power_law_field`,
    and :func:`remnant`, a procedural supernova remnant.
Files
    :func:`load_spectra`, :func:`load_maps` (``.npz``/``.npy``, validated,
    resampled), :func:`shared_data_dir` (the reference-data folder).
Mixtures
    :func:`mix` (``X = A S + N`` at an exact SNR, on any torch device),
    :class:`MixtureSet` and :func:`paper_sets` (the paper's train / simple /
    realistic sets, ``preset="paper"`` or ``"small"``).
Realism
    :func:`stats` (angles, condition numbers, Fe-line peaks and widths).

Only NumPy and SciPy are imported here; torch, scikit-image and matplotlib
load inside the functions that need them.
"""
from __future__ import annotations

from fastmu.data.io import (
    load_maps,
    load_spectra,
    normalise_maps,
    resample_maps,
    shared_data_dir,
    validate_maps,
    validate_spectra,
)
from fastmu.data.mixtures import PRESETS, MixtureSet, measured_snr_db, mix, paper_sets
from fastmu.data.remnant import remnant
from fastmu.data.sources import dead_leaves, natural_images, photo_crops, power_law_field
from fastmu.data.spectra import COMPONENTS, PARAMETER_RANGES, energy_grid, spectra
from fastmu.data.stats import angles_deg, format_stats, stats

__all__ = [
    "COMPONENTS",
    "PARAMETER_RANGES",
    "PRESETS",
    "MixtureSet",
    "angles_deg",
    "dead_leaves",
    "energy_grid",
    "format_stats",
    "load_maps",
    "load_spectra",
    "measured_snr_db",
    "mix",
    "natural_images",
    "normalise_maps",
    "paper_sets",
    "photo_crops",
    "power_law_field",
    "remnant",
    "resample_maps",
    "shared_data_dir",
    "spectra",
    "stats",
    "validate_maps",
    "validate_spectra",
]
