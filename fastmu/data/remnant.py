"""Procedural supernova-remnant source maps (Cas A-like), for users without the real maps.

Four maps in the order sync, therm, fe1, fe2:

* sync: thin filaments at the forward-shock rim (a sharp shell with
  azimuthal brightness variations) plus a fainter inner (reverse-shock) rim;
* therm: a thick, clumpy shell (shocked ejecta / circumstellar medium);
* fe1 / fe2: Fe ejecta knots in two Doppler-separated regions: the
  red-shifted (receding, fe1) and blue-shifted (approaching, fe2) ejecta of an
  asymmetric explosion occupy different sides of the remnant.

Each map is non-negative and, like the real Cas A maps, sums to 1.
"""
from __future__ import annotations

import numpy as np

__all__ = ["remnant"]

# smallest side of a remnant map: at 2 x 2 every pixel but the centre lies outside the
# shock and whole maps come out zero (NaN after normalisation); at 3 x 3 a map can be a
# single pixel and the four maps are near-collinear (condition number up to ~5e3);
# from 4 x 4 on, 1000 seeds give finite maps, each non-zero on >= 3 pixels, cond <= ~140
_MIN_SIZE = 4


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth Gaussian noise with correlation length ``scale`` pixels (FFT filter)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    g = np.exp(-2 * (np.pi * scale) ** 2 * (fy**2 + fx**2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((h, w))) * g, s=(h, w))
    return (field - field.mean()) / (field.std() + 1e-12)


def remnant(size=128, *, seed: int | None = None) -> np.ndarray:
    """One procedural supernova-remnant source set.

    Parameters
    ----------
    size : int or (int, int)
        Map size (h, w), each at least 4.
    seed : int or None
        Seed; the same seed gives the same maps.

    Returns
    -------
    ndarray, shape (4, h, w), float64, non-negative, each map sums to 1.

    Raises
    ------
    ValueError
        A side below 4 pixels: too few to draw four distinct maps.
    """
    from fastmu.data.sources import _check_size

    h, w = _check_size(size)
    if min(h, w) < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE} x {_MIN_SIZE} for a remnant "
                         f"(smaller grids leave maps empty or a single pixel), got {size!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy = h / 2 + rng.normal(0, 0.03 * h)
    cx = w / 2 + rng.normal(0, 0.03 * w)
    dy, dx = (yy - cy) / (h / 2), (xx - cx) / (w / 2)
    theta = np.arctan2(dy, dx)
    # slightly non-circular rim, as Cas A's
    r_shock = 0.82 + 0.04 * np.cos(theta - rng.uniform(0, 2 * np.pi)) + 0.02 * np.cos(3 * theta)
    r = np.hypot(dy, dx)
    r_rev = 0.6 * r_shock  # reverse shock

    az = lambda s: np.exp(0.6 * _smooth_noise(rng, h, w, s))  # noqa: E731 - azimuthal patchiness
    fil_w = 0.012
    sync = np.exp(-0.5 * ((r - r_shock) / fil_w) ** 2) * az(6.0)
    sync += 0.4 * np.exp(-0.5 * ((r - r_rev) / (1.5 * fil_w)) ** 2) * az(4.0)
    # a few thin filaments crossing the inner shell
    for _ in range(rng.integers(3, 7)):
        a = rng.uniform(0, 2 * np.pi)
        rr = rng.uniform(0.5, 0.8)
        d = np.abs(r - rr) + 0.5 * np.abs(np.angle(np.exp(1j * (theta - a))))
        sync += 0.3 * np.exp(-0.5 * (d / 0.02) ** 2)

    shell = np.exp(-0.5 * ((r - 0.5 * (r_shock + r_rev)) / 0.12) ** 2)
    clumps = np.exp(1.2 * _smooth_noise(rng, h, w, 2.5))
    therm = shell * clumps

    # Fe ejecta: knots, red-shifted on one side, blue-shifted on the other
    phi = rng.uniform(0, 2 * np.pi)
    side = np.cos(theta - phi)
    knots = np.exp(1.5 * _smooth_noise(rng, h, w, 3.0))
    ej = np.exp(-0.5 * ((r - 0.65 * r_shock) / 0.15) ** 2) * knots
    fe1 = ej * np.clip(side + 0.2, 0, None) ** 2
    fe2 = ej * np.clip(-side + 0.2, 0, None) ** 2

    maps = np.stack([sync, therm, fe1, fe2])
    maps[:, r > r_shock + 0.05] *= 0.0  # nothing outside the forward shock
    maps = np.clip(maps, 0.0, None)
    return maps / maps.sum(axis=(1, 2), keepdims=True)
