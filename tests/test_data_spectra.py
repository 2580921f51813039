"""Generated spectra: shape, determinism, and realism against the real Chandra set."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fastmu.data import energy_grid, format_stats, spectra, stats

SHARED = Path(os.environ.get("FASTMU_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CHANDRA = SHARED / "chandra_mixing_matrices.npz"


def test_shape_norm_sign():
    A = spectra(10, seed=1)
    assert A.shape == (10, 65, 4) and A.dtype == np.float64
    assert np.all(A >= 0) and np.all(np.isfinite(A))
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), 1.0, rtol=1e-12)


def test_deterministic_by_seed():
    np.testing.assert_array_equal(spectra(5, seed=3), spectra(5, seed=3))
    assert not np.allclose(spectra(5, seed=3), spectra(5, seed=4))


@pytest.mark.parametrize("m", [33, 65, 130])
def test_m_configurable(m):
    A = spectra(4, seed=0, m=m)
    assert A.shape == (4, m, 4)
    e, edges = energy_grid(m)
    assert np.all(np.diff(e) > 0) and np.all(np.diff(edges) > 0)
    # the Fe lines sit in the same part of the band whatever m
    u = A[:, :, 2].argmax(1) / (m - 1)
    assert np.all((u > 0.45) & (u < 0.72))


def test_bad_arguments():
    with pytest.raises(TypeError):
        spectra(2.5)
    with pytest.raises(ValueError):
        spectra(-1)
    with pytest.raises(ValueError):
        spectra(2, m=3)


def test_no_spectra():
    A = spectra(0, seed=0, m=33)
    assert A.shape == (0, 33, 4) and A.dtype == np.float64


@pytest.mark.parametrize("bad, msg", [
    (np.full((3, 20, 4), np.nan), "non-finite"),
    (-np.ones((3, 20, 4)), "negative"),
    (np.zeros((3, 20, 4)), "all-zero"),
    (np.ones((0, 20, 4)), "at least one matrix"),
])
def test_stats_refuses_bad_spectra(bad, msg):
    with pytest.raises(ValueError, match=msg):
        stats(bad)


def test_stats_ignore_column_scale():
    A = spectra(6, seed=0)
    scaled, plain = stats(A * np.array([3.0, 0.2, 1.0, 50.0])), stats(A)
    assert scaled.keys() == plain.keys()
    np.testing.assert_allclose(list(scaled.values()), list(plain.values()), rtol=1e-9)


def test_format_stats_needs_a_set():
    for columns in ({}, {"generated": {}}):
        with pytest.raises(ValueError, match="at least one set"):
            format_stats(columns)


@pytest.fixture(scope="module")
def real_and_generated():
    if not CHANDRA.exists():
        pytest.skip(f"reference spectra not found at {CHANDRA} (set FASTMU_SHARED_DATA)")
    real = np.load(CHANDRA)["A"]
    return stats(real), stats(spectra(750, seed=0))


# Bands.  Family spreads (angle to mean) are 20-40 deg in the real set and
# 200-row subsets of it move them by 2-4 deg; the generator is a physics model
# with a dozen parameters, not a fit, and its worst figures are 6-7 deg off
# (sync spread, sync-therm and sync-fe1 angles).  An 8-deg band keeps every
# figure within a quarter of the spread it describes while letting the model
# differ from the unknown simulation pipeline of the real set.  A condition
# number within a factor 1.5 keeps the separation problem equally hard.
ANGLE_BAND_DEG = 8.0
COND_FACTOR = 1.5


@pytest.mark.parametrize("key", [
    "angle_to_mean_sync", "angle_to_mean_therm", "angle_to_mean_fe1", "angle_to_mean_fe2",
    "pair_sync_therm", "pair_sync_fe1", "pair_sync_fe2", "pair_therm_fe1", "pair_therm_fe2",
    "pair_fe1_fe2",
])
def test_angles_within_band(real_and_generated, key):
    real, gen = real_and_generated
    assert abs(gen[key] - real[key]) <= ANGLE_BAND_DEG, (key, real[key], gen[key])


def test_condition_number_within_band(real_and_generated):
    real, gen = real_and_generated
    r = gen["cond_median"] / real["cond_median"]
    assert 1 / COND_FACTOR <= r <= COND_FACTOR, (real["cond_median"], gen["cond_median"])


@pytest.mark.parametrize("fe", ["fe1", "fe2"])
def test_fe_lines_in_real_channel_ranges(real_and_generated, fe):
    real, gen = real_and_generated
    # peaks: 1st-99th percentile of the generated peaks inside the real set's range
    assert gen[f"{fe}_peak_lo"] >= real[f"{fe}_peak_lo"] - 1
    assert gen[f"{fe}_peak_hi"] <= real[f"{fe}_peak_hi"] + 1
    assert abs(gen[f"{fe}_peak_med"] - real[f"{fe}_peak_med"]) <= 1
    # widths: median FWHM within half a channel; the spread within 1 channel of the real range
    # (fe1 lines at the low edge fall where the channels widen, so the 1st percentile may be
    # narrower: checked on the bulk below)
    assert abs(gen[f"{fe}_fwhm_med"] - real[f"{fe}_fwhm_med"]) <= 0.5
    assert gen[f"{fe}_fwhm_hi"] <= real[f"{fe}_fwhm_hi"] + 1.0


@pytest.mark.parametrize("k", [2, 3])
def test_fe_width_bulk(k):
    if not CHANDRA.exists():
        pytest.skip(f"reference spectra not found at {CHANDRA}")
    from fastmu.data.stats import fwhm_channels

    real = fwhm_channels(np.load(CHANDRA)["A"][:, :, k])
    gen = fwhm_channels(spectra(400, seed=5)[:, :, k])
    lo, hi = np.percentile(real, [1, 99])
    inside = np.mean((gen >= lo - 1.0) & (gen <= hi + 1.0))
    assert inside >= 0.95, inside


@pytest.mark.parametrize("m", [8, 10, 13, 14])
def test_few_channels_give_finite_spectra(m):
    """Below m = 14 the first channel reaches below 0 keV: no flux there, no NaN."""
    with np.errstate(invalid="raise", divide="raise"):  # underflow is expected: no flux at the edge
        A = spectra(3, seed=0, m=m)
    assert A.shape == (3, m, 4) and np.isfinite(A).all() and (A >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("seed,err", [(-1, ValueError), (1.5, TypeError), ("0", TypeError)])
def test_a_bad_seed_is_named(seed, err):
    with pytest.raises(err, match="seed must be None or a non-negative integer"):
        spectra(2, seed=seed)
