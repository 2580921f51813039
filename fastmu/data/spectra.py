"""Physics-based X-ray mixing matrices A (m channels x 4 components).

The four columns, in this order, are the spectra of the Cassiopeia A components
used by the paper: synchrotron, thermal, Fe line 1 (red-shifted), Fe line 2
(blue-shifted).  Each column is a photon flux density (an analytic emission
model) times the interstellar absorption and the instrument's effective area,
averaged over each energy channel, then scaled to unit L2 norm.

Energy grid
-----------
The reference set (``chandra_mixing_matrices.npz``) ships without its energy
axis, so the grid below is inferred from what the reference shows:

* its Fe columns peak in channels 32-44 (fe1) and 47-59 (fe2), 15 channels
  apart, with a FWHM of 5-8 channels.  Fe-K emission of Cas A (6.4-6.7 keV
  rest, bulk velocities up to ~6000 km/s, i.e. shifts up to ~0.13 keV) can only
  spread over ~27 channels and be resolved into two Doppler families if the
  channels there are ~10 eV wide: a microcalorimeter-class band around Fe-K;
* its synchrotron and thermal columns, by contrast, show absorption cut-offs,
  the Si/S/Ar/Ca line complexes and a flat tail, i.e. they span the whole soft
  X-ray band (0.5 keV to Fe-K) in its first ~30 channels.

We therefore use a monotone two-scale grid: coarse channels (~0.2 keV,
grouped CCD-like binning) from 0.5 keV up to ~6.4 keV, a smooth transition, and
fine 10 eV channels over the Fe-K band (~6.46-6.79 keV), with channel
45.5 / 64 of the band at the Fe-K centroid of 6.60 keV.  The grid is defined
on the normalised channel coordinate ``u = k / (m - 1)``, so any ``m`` gives the
same physics sampled more or less finely.

Columns are energy flux densities ``E N(E)`` (the nu F_nu representation),
averaged over each channel -- not counts per channel, so a narrow channel does
not dim a smooth continuum.  With photon flux ``N(E)`` instead, no physical
photon index reproduces how much synchrotron and thermal flux the reference
puts under the Fe lines (its sync-fe angles of 75-82 deg).  Thermal line
complexes are drawn with a CCD-like width (0.30 keV FWHM at 1 keV, ~sqrt(E)):
at the coarse channels the He/H-like triplets, satellites and neighbouring ions
blend, and the reference's thermal column is smooth there.  See :data:`PARAMETER_RANGES` for every random parameter and
its physical reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from fastmu.validation import default_rng

__all__ = [
    "COMPONENTS",
    "PARAMETER_RANGES",
    "THERMAL_LINES",
    "energy_grid",
    "spectra",
]

#: column order of every mixing matrix in fastmu
COMPONENTS = ("sync", "therm", "fe1", "fe2")

_C_KMS = 299_792.458  # speed of light, km/s

# ---- energy grid (keV) --------------------------------------------------------
_E_LO = 0.5  # keV: below this the ISM absorption of Cas A (N_H ~ 1e22) kills all flux
_E_FEK = 6.60  # keV: Fe-K centroid of Cas A's under-ionised Fe (between Fe I 6.40 and Fe XXV 6.70)
_U_FEK = 45.5 / 64  # normalised channel of the Fe-K centroid (between the two Fe families)
_DE_FINE = 0.010 * 64  # keV per unit u: 10 eV channels at m = 65, resolves 1000 km/s at Fe-K
_U_SWITCH = 27.5 / 64  # where coarse binning gives way to fine binning
_U_WIDTH = 1.2 / 64  # width of the (logistic) transition, a few channels


@dataclass(frozen=True)
class _Range:
    lo: float
    hi: float
    log: bool  # sample log-uniformly (scale parameters) or uniformly
    why: str


#: every random parameter of :func:`spectra`, its range and the physical reason
PARAMETER_RANGES: dict[str, _Range] = {
    "nh": _Range(0.4, 6.0, True,
                 "hydrogen column, 1e22 cm^-2: Cas A lies behind N_H ~ 1-2e22 with strong "
                 "patchy variation (molecular clouds to the west)"),
    "gamma": _Range(1.0, 3.2, False,
                    "synchrotron photon index below the roll-off; Cas A's filaments show 2-3.3, "
                    "the range is widened to 1.0 (calibrated) so the family spreads as in the "
                    "reference set"),
    "e_cut": _Range(0.5, 50.0, True,
                    "synchrotron roll-off energy, keV (srcut-like exp(-sqrt(E/E_cut))): "
                    "loss-limited electrons, a few keV in Cas A"),
    "kt": _Range(1.0, 5.0, True,
                 "electron temperature, keV, of the shocked ejecta / CSM plasma (Cas A: "
                 "~1-4 keV components)"),
    "line_norm": _Range(1.5, 15.0, True,
                        "relative strength of each thermal line complex (O, Ne, Mg, Si, S, Ar, Ca): "
                        "ejecta abundances vary by an order of magnitude across Cas A"),
    "v_bulk": _Range(1000.0, 5800.0, False,
                     "Fe ejecta bulk line-of-sight speed, km/s (red: receding, blue: "
                     "approaching); Cas A Fe knots move at up to ~6000 km/s"),
    "e_rest": _Range(6.59, 6.61, False,
                     "Fe-K rest centroid, keV: set by the ionisation state of the "
                     "non-equilibrium Fe plasma"),
    "sigma_v1": _Range(1200.0, 1330.0, False,
                       "fe1 (red-shifted) velocity dispersion, km/s (ion thermal + turbulent "
                       "broadening); gives the energy-dependent width E sigma_v / c. "
                       "Calibrated on the reference, whose red family is ~15% broader"),
    "sigma_v2": _Range(1010.0, 1120.0, False,
                       "fe2 (blue-shifted) velocity dispersion, km/s, as sigma_v1"),
}

#: thermal emission-line complexes (rest energy keV, relative emissivity at solar abundance)
THERMAL_LINES: tuple[tuple[str, float, float], ...] = (
    ("O VIII", 0.65, 0.6),
    ("Ne IX", 0.92, 0.7),
    ("Ne X", 1.02, 0.4),
    ("Mg XI", 1.35, 0.7),
    ("Mg XII", 1.47, 0.3),
    ("Si XIII", 1.86, 1.6),
    ("Si XIV", 2.01, 0.6),
    ("S XV", 2.46, 0.9),
    ("S XVI", 2.62, 0.3),
    ("Ar XVII", 3.13, 0.35),
    ("Ca XIX", 3.90, 0.3),
)

_EPOW = 1.0  # columns are energy flux densities E N(E) (nu F_nu), see module doc
_BLEND_FWHM_KEV = 0.30  # keV at 1 keV, ~sqrt(E): CCD resolution + unresolved blends
_DET_FWHM_KEV = 0.006  # microcalorimeter resolution (XRISM/Resolve-class, ~5-7 eV FWHM)


#: the fewest channels the spectral model resolves (its four components' features)
MIN_CHANNELS = 8


def energy_grid(m: int = 65) -> tuple[np.ndarray, np.ndarray]:
    """Channel energies and bin edges of the inferred reference grid.

    Parameters
    ----------
    m : int
        Number of channels (65 in the paper).

    Returns
    -------
    centres : ndarray, shape (m,)
        Channel centre energies, keV, increasing.
    edges : ndarray, shape (m + 1,)
        Channel edges, keV.
    """
    m = _check_m(m)
    # dE/du: coarse then fine, logistic switch; integrate on a fine u grid
    u = np.linspace(-0.5 / (m - 1), 1 + 0.5 / (m - 1), 20001)

    def dedu(uu: np.ndarray, coarse: float) -> np.ndarray:
        s = 1.0 / (1.0 + np.exp(-(_U_SWITCH - uu) / _U_WIDTH))
        return _DE_FINE + (coarse - _DE_FINE) * s

    def integral(coarse: float) -> np.ndarray:
        d = dedu(u, coarse)
        return np.concatenate([[0.0], np.cumsum(0.5 * (d[1:] + d[:-1]) * np.diff(u))])

    # E(u) is affine in the coarse slope: solve E(0) = _E_LO, E(_U_FEK) = _E_FEK
    def e_at(coarse: float, uq: np.ndarray) -> np.ndarray:
        cum = integral(coarse)
        return np.interp(uq, u, cum)

    f0 = e_at(0.0, np.array([_U_FEK]))[0] - e_at(0.0, np.array([0.0]))[0]
    f1 = e_at(1.0, np.array([_U_FEK]))[0] - e_at(1.0, np.array([0.0]))[0]
    coarse = (_E_FEK - _E_LO - f0) / (f1 - f0)
    k = np.arange(m)
    uc = k / (m - 1)
    ue = (np.arange(m + 1) - 0.5) / (m - 1)
    base = e_at(coarse, np.array([0.0]))[0]
    centres = _E_LO + e_at(coarse, uc) - base
    edges = _E_LO + e_at(coarse, ue) - base
    return centres, edges


def _check_m(m: int) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m must be an int, got {type(m).__name__}")
    if m < MIN_CHANNELS:
        raise ValueError(f"m must be >= {MIN_CHANNELS} channels to resolve the model, got {m}")
    return int(m)


def _draw(rng: np.random.Generator, name: str, size) -> np.ndarray:
    r = PARAMETER_RANGES[name]
    if r.log:
        return np.exp(rng.uniform(np.log(r.lo), np.log(r.hi), size))
    return rng.uniform(r.lo, r.hi, size)


def _absorption(e: np.ndarray, nh: np.ndarray) -> np.ndarray:
    """exp(-N_H sigma(E)); sigma ~ 2.4e-22 (E/keV)^(-8/3) cm^2 (Morrison-McCammon slope)."""
    return np.exp(-nh[:, None] * 2.4 * e[None, :] ** (-8.0 / 3.0))


def _effective_area(e: np.ndarray) -> np.ndarray:
    """Smooth generic mirror + filter response (relative units).

    Rises through the optical-blocking filter below 1 keV, falls as grazing
    incidence reflectivity drops above ~5 keV, with the iridium M-edge dip
    near 2.1 keV that every Chandra-like mirror shows.
    """
    filt = np.exp(-0.08 * e ** (-2.6))
    mirror = 1.0 / (1.0 + (e / 6.5) ** 3)
    m_edge = 1.0 - 0.25 / (1.0 + np.exp(-(e - 2.1) / 0.04)) * np.exp(-np.clip(e - 2.1, 0, None) / 1.5)
    return filt * mirror * m_edge


def _line_profile(edges: np.ndarray, centre: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian line (unit flux) averaged over each channel: (n, m)."""
    lo = (edges[None, :-1] - centre[:, None]) / (np.sqrt(2.0) * sigma[:, None])
    hi = (edges[None, 1:] - centre[:, None]) / (np.sqrt(2.0) * sigma[:, None])
    return 0.5 * (erf(hi) - erf(lo)) / np.diff(edges)[None, :]


def _continuum_avg(f, edges: np.ndarray, n_sub: int = 8) -> np.ndarray:
    """Average a smooth (n, E) -> (n, E) function over each channel by sub-sampling."""
    t = (np.arange(n_sub) + 0.5) / n_sub
    sub = edges[:-1, None] + np.diff(edges)[:, None] * t[None, :]  # (m, n_sub)
    # Below m = 14 the first channel is so wide that it reaches below 0 keV, where the
    # power laws are undefined; no flux gets there (the filter transmits under 1e-80
    # below 0.05 keV), so those sub-samples count as 0. From m = 14 on every sub-sample
    # is positive and nothing changes.
    pos = sub.ravel() > 0
    vals = f(np.where(pos, sub.ravel(), 1.0)) * pos  # (n, m*n_sub)
    # m spelled out, not -1: with n = 0 the size cannot tell m
    return vals.reshape(vals.shape[0], sub.shape[0], n_sub).mean(-1)


def spectra(n: int, *, seed: int | None = None, m: int = 65) -> np.ndarray:
    """Draw ``n`` physics-based mixing matrices.

    Parameters
    ----------
    n : int
        Number of matrices.
    seed : int or None
        Seed of a :func:`numpy.random.default_rng` stream; the same seed gives
        the same matrices on every machine.
    m : int
        Number of energy channels (65 in the paper); see :func:`energy_grid`.

    Returns
    -------
    A : ndarray, shape (n, m, 4), float64
        Non-negative, unit-L2-norm columns in the order sync, therm, fe1, fe2.

    Examples
    --------
    >>> from fastmu.data import spectra
    >>> A = spectra(3, seed=0)
    >>> A.shape
    (3, 65, 4)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    m = _check_m(m)
    n = int(n)
    rng = default_rng(seed)
    _, edges = energy_grid(m)

    # one line of sight per region: the same absorption applies to all four components
    nh = _draw(rng, "nh", n)
    gamma = _draw(rng, "gamma", n)
    e_cut = _draw(rng, "e_cut", n)
    kt = _draw(rng, "kt", n)
    line_norm = _draw(rng, "line_norm", (n, len(THERMAL_LINES)))
    v1 = _draw(rng, "v_bulk", n)
    v2 = _draw(rng, "v_bulk", n)
    e_rest = _draw(rng, "e_rest", n)
    sv1 = _draw(rng, "sigma_v1", n)
    sv2 = _draw(rng, "sigma_v2", n)

    def response(e: np.ndarray) -> np.ndarray:
        return _absorption(e, nh) * _effective_area(e)[None, :] * e[None, :] ** _EPOW

    sync = _continuum_avg(
        lambda e: e[None, :] ** (-gamma[:, None]) * np.exp(-np.sqrt(e[None, :] / e_cut[:, None])) * response(e),
        edges,
    )

    # thermal: bremsstrahlung (Gaunt ~ E^-0.4) plus line complexes, Fe-K excluded because
    # the Fe emission is what the fe1 / fe2 components carry
    brems = _continuum_avg(
        lambda e: e[None, :] ** (-0.4) * np.exp(-e[None, :] / kt[:, None]) * response(e), edges
    )
    therm = brems.copy()
    sig_det = _DET_FWHM_KEV / 2.3548
    for j, (_, e_line, emiss) in enumerate(THERMAL_LINES):
        # line emissivity falls with E/kT like the continuum that excites it
        amp = emiss * line_norm[:, j] * np.exp(-e_line / kt) * kt ** -0.4
        # a line complex (triplet, satellites, neighbouring ions) seen at CCD resolution
        sig_blend = _BLEND_FWHM_KEV * np.sqrt(e_line) / 2.3548
        prof = _line_profile(edges, np.full(n, e_line), np.full(n, sig_blend))
        r = response(np.array([e_line]))[:, 0]
        therm += (amp * r)[:, None] * prof

    def fe_line(v: np.ndarray, sv: np.ndarray, sign: float) -> np.ndarray:
        centre = e_rest * (1.0 - sign * v / _C_KMS)  # sign +1: receding (red-shifted)
        sigma = np.sqrt(sig_det**2 + (centre * sv / _C_KMS) ** 2)
        return _line_profile(edges, centre, sigma)

    fe1 = fe_line(v1, sv1, +1.0)
    fe2 = fe_line(v2, sv2, -1.0)

    A = np.stack([sync, therm, fe1, fe2], axis=-1)
    A = np.maximum(A, 0.0)
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    return A
