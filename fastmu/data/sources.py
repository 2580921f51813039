"""Natural-image source maps: photo crops and procedural natural-image models.

The paper trains on natural images (Tiny ImageNet); offline we use random
crops (with flips, 90-degree rotations and rescaling) of the photographs that
ship inside the scikit-image wheel, and two procedural models of natural-image
statistics: dead leaves (occlusion of random discs, the classic model of
natural-image edges and scale invariance) and 1/f^beta Gaussian fields (the
power spectrum of natural scenes).  All maps are non-negative and scaled to a
maximum of 1.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from fastmu.validation import default_rng

__all__ = [
    "SKIMAGE_IMAGES",
    "natural_images",
    "photo_crops",
    "dead_leaves",
    "power_law_field",
]

#: scikit-image sample images bundled in the wheel (load without network)
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins",
    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page",
    "retina", "rocket", "text",
)

_SKIMAGE_HINT = "natural-image crops need scikit-image (pip install scikit-image, or fastmu's data extra)"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_size(size) -> tuple[int, int]:
    if _is_int(size):
        parts = (size, size)
    else:
        try:  # a str is iterable but never a size
            parts = None if isinstance(size, (str, bytes)) else tuple(size)
        except TypeError:
            parts = None
    if parts is None or not all(_is_int(s) for s in parts):
        raise TypeError(f"size must be an int or a pair of ints (h, w), got {size!r}")
    if len(parts) != 2 or min(parts) < 2:
        raise ValueError(f"size must be an int or (h, w) with h, w >= 2, got {size!r}")
    return int(parts[0]), int(parts[1])


def _check_n(n) -> int:
    if not _is_int(n):
        raise TypeError(f"n must be an int, got {n!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return int(n)


def _check_real(x, name: str) -> float:
    try:
        if isinstance(x, (str, bytes)):
            raise TypeError
        v = float(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real number, got {x!r}") from exc
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return v


def _unit_max(x: np.ndarray) -> np.ndarray:
    x = x - x.min()
    mx = x.max()
    return x / mx if mx > 0 else np.full_like(x, 1.0)


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    try:
        import skimage.data as skd
        from skimage.color import rgb2gray, rgba2rgb
    except ImportError as exc:  # pragma: no cover - exercised only without skimage
        raise ImportError(_SKIMAGE_HINT) from exc
    out = []
    for name in SKIMAGE_IMAGES:
        try:  # an image a given skimage build fetches over the network is skipped
            im = np.asarray(getattr(skd, name)())
        except Exception:  # noqa: BLE001 - any fetch/IO failure means "not bundled"
            continue
        if im.ndim == 3:
            im = rgb2gray(rgba2rgb(im) if im.shape[2] == 4 else im)
        out.append(np.asarray(im, dtype=np.float64) / (255.0 if im.max() > 1.0 else 1.0))
    if not out:
        raise ImportError("no scikit-image sample image could be loaded; " + _SKIMAGE_HINT)
    return tuple(out)


def photo_crops(n: int, size=128, *, seed: int | None = None) -> np.ndarray:
    """Random crops of scikit-image's bundled photographs.

    Each crop picks an image, a scale in [0.5, 1.5] (the crop window is
    ``size / scale`` pixels, then resized to ``size`` with anti-aliasing), a
    position, a random flip and a multiple of 90 degrees of rotation.

    Parameters
    ----------
    n : int
        Number of maps.
    size : int or (int, int)
        Output size (h, w).
    seed : int or None
        Seed; the same seed gives the same maps.

    Returns
    -------
    ndarray, shape (n, h, w), float64, values in [0, 1] with max 1.

    Raises
    ------
    ImportError
        If scikit-image is not installed (``pip install scikit-image``, or fastmu's data extra).
    """
    n = _check_n(n)
    h, w = _check_size(size)
    photos = _photos()
    from skimage.transform import resize

    rng = default_rng(seed)
    out = np.empty((n, h, w))
    for i in range(n):
        im = photos[rng.integers(len(photos))]
        scale = rng.uniform(0.5, 1.5)
        ch = min(im.shape[0], max(2, int(round(h / scale))))
        cw = min(im.shape[1], max(2, int(round(w / scale))))
        y = rng.integers(0, im.shape[0] - ch + 1)
        x = rng.integers(0, im.shape[1] - cw + 1)
        crop = resize(im[y:y + ch, x:x + cw], (h, w), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        k = int(rng.integers(4))
        if h == w:
            crop = np.rot90(crop, k)
        elif k % 2 == 0:
            crop = np.rot90(crop, k)
        out[i] = _unit_max(crop)
    return out


def dead_leaves(n: int, size=128, *, seed: int | None = None, r_min: float = 2.0,
                r_max: float | None = None, alpha: float = 3.0) -> np.ndarray:
    """Dead-leaves images: random discs of random grey level occluding one another.

    Radii follow the scale-invariant law ``p(r) ~ r^-alpha`` on
    ``[r_min, r_max]``; discs are stacked until the image is covered.

    Parameters
    ----------
    n : int
        Number of images.
    size : int or (int, int), default 128
    seed : int, optional
    r_min : float, default 2.0
        Smallest radius, in pixels; finite and > 0.
    r_max : float, optional
        Largest radius, finite and >= ``r_min``; default a third of the larger side.
    alpha : float, default 3.0
        Exponent of the radius law; finite and not 1.

    Returns
    -------
    ndarray, shape (n, h, w), float64, max 1.
    """
    n = _check_n(n)
    h, w = _check_size(size)
    r_min = _check_real(r_min, "r_min")
    if r_min <= 0:  # the radius law r^-alpha needs r > 0
        raise ValueError(f"r_min must be > 0, got {r_min!r}")
    if r_max is None:
        r_max = max(h, w) / 3
    else:
        r_max = _check_real(r_max, "r_max")
        if r_max < r_min:
            raise ValueError(f"r_max must be >= r_min ({r_min!r}), got {r_max!r}")
    alpha = _check_real(alpha, "alpha")
    if alpha == 1.0:  # the inverse CDF below divides by 1 - alpha
        raise ValueError("alpha must not be 1 (the radius law's inverse CDF divides by 1 - alpha); "
                         "use a value near it, e.g. 1.001")
    rng = default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w))
    a1 = 1.0 - alpha
    chunk = 128
    for i in range(n):
        img = np.full((h, w), np.nan)
        # painted front to back: a disc only fills pixels still empty (occlusion);
        # discs are tested a chunk at a time, the first in a chunk wins
        for _ in range(400):
            u = rng.random(chunk)
            r = ((r_max**a1 - r_min**a1) * u + r_min**a1) ** (1.0 / a1)
            cy = rng.uniform(-r, h + r)
            cx = rng.uniform(-r, w + r)
            grey = rng.random(chunk)
            empty = np.isnan(img)
            ys, xs = yy[empty], xx[empty]
            hit = (ys[None, :] - cy[:, None]) ** 2 + (xs[None, :] - cx[:, None]) ** 2 <= (r * r)[:, None]
            any_hit = hit.any(0)
            first = hit.argmax(0)
            vals = np.where(any_hit, grey[first], np.nan)
            img[empty] = vals
            if np.isnan(img).mean() < 0.003:
                break
        holes = np.isnan(img)
        if holes.any():  # the last specks take most of the discs: give them their nearest leaf
            from scipy.ndimage import distance_transform_edt

            idx = distance_transform_edt(holes, return_distances=False, return_indices=True)
            img = img[idx[0], idx[1]]
        out[i] = _unit_max(img)
    return out


def power_law_field(n: int, size=128, *, seed: int | None = None,
                    beta: tuple[float, float] = (1.6, 2.4)) -> np.ndarray:
    """Gaussian random fields with a ``1/f^beta`` power spectrum, made positive.

    ``beta`` is drawn per map in the given range (natural scenes: ~2).  The
    field is exponentiated (a log-normal field, like the intensity of clouds
    and textures), then scaled to max 1.

    Parameters
    ----------
    n : int
        Number of maps.
    size : int or (int, int), default 128
    seed : int, optional
    beta : (float, float), default (1.6, 2.4)
        Range ``(lo, hi)`` of the spectral exponent, finite, ``lo <= hi``.

    Returns
    -------
    ndarray, shape (n, h, w), float64, max 1.
    """
    n = _check_n(n)
    h, w = _check_size(size)
    try:
        lo, hi = beta
    except (TypeError, ValueError) as exc:
        raise TypeError(f"beta must be a pair (lo, hi) of real numbers, got {beta!r}") from exc
    lo, hi = _check_real(lo, "beta[0]"), _check_real(hi, "beta[1]")
    if lo > hi:
        raise ValueError(f"beta must be a range (lo, hi) with lo <= hi, got {beta!r}")
    rng = default_rng(seed)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    out = np.empty((n, h, w))
    for i in range(n):
        b = rng.uniform(lo, hi)
        spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) * f ** (-b / 2)
        spec[0, 0] = 0.0
        field = np.fft.irfft2(spec, s=(h, w))
        field = (field - field.mean()) / (field.std() + 1e-12)
        out[i] = _unit_max(np.exp(rng.uniform(0.3, 0.8) * field))
    return out


def natural_images(n: int, size=128, *, seed: int | None = None,
                   kinds: tuple[str, ...] = ("photo", "dead_leaves", "power_law")) -> np.ndarray:
    """A mix of natural-image maps, each map drawn from one of ``kinds``.

    Each map has its own sub-seed, derived from ``seed`` and its index, so the
    i-th map does not depend on ``n``.

    Parameters
    ----------
    n : int
        Number of maps.
    size : int or (int, int)
        Output size.
    seed : int or None
        Seed.
    kinds : tuple of str
        Any of ``"photo"`` (needs scikit-image), ``"dead_leaves"``, ``"power_law"``.

    Returns
    -------
    ndarray, shape (n, h, w), float64, max 1 per map.
    """
    gens = {"photo": photo_crops, "dead_leaves": dead_leaves, "power_law": power_law_field}
    bad = [k for k in kinds if k not in gens]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {tuple(gens)}, got {kinds}")
    n = _check_n(n)
    h, w = _check_size(size)
    ss = np.random.SeedSequence(seed)
    children = ss.spawn(n)
    out = np.empty((n, h, w))
    for i, child in enumerate(children):
        r = np.random.default_rng(child)
        kind = kinds[int(r.integers(len(kinds)))]
        out[i] = gens[kind](1, (h, w), seed=int(r.integers(2**63)))[0]
    return out
