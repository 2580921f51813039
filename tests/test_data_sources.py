"""Source maps: natural images, procedural models, the remnant."""
from __future__ import annotations

import numpy as np
import pytest

from fastmu.data import dead_leaves, natural_images, photo_crops, power_law_field, remnant


@pytest.mark.parametrize("gen", [dead_leaves, power_law_field, photo_crops])
def test_generators(gen):
    if gen is photo_crops:
        pytest.importorskip("skimage")
    x = gen(3, (24, 32), seed=2)
    assert x.shape == (3, 24, 32)
    assert np.all(x >= 0) and np.all(np.isfinite(x))
    np.testing.assert_allclose(x.max(axis=(1, 2)), 1.0)
    np.testing.assert_array_equal(x, gen(3, (24, 32), seed=2))
    assert not np.allclose(x[0], x[1])  # distinct maps


def test_natural_images_index_stable():
    a = natural_images(5, 16, seed=7)
    b = natural_images(3, 16, seed=7)
    np.testing.assert_array_equal(a[:3], b)


def test_many_distinct_maps_offline():
    x = natural_images(60, 16, seed=0, kinds=("dead_leaves", "power_law"))
    flat = x.reshape(60, -1).round(6)
    assert len({r.tobytes() for r in flat}) == 60


def test_photo_crops_without_skimage(monkeypatch):
    import builtins

    from fastmu.data import sources

    sources._photos.cache_clear()
    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("skimage"):
            raise ImportError("no skimage")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"pip install scikit-image"):
        photo_crops(1, 16, seed=0)
    # procedural generators keep working
    assert natural_images(2, 16, seed=0, kinds=("dead_leaves", "power_law")).shape == (2, 16, 16)
    monkeypatch.undo()
    sources._photos.cache_clear()


def test_remnant():
    s = remnant(48, seed=1)
    assert s.shape == (4, 48, 48) and np.all(s >= 0)
    np.testing.assert_allclose(s.sum(axis=(1, 2)), 1.0)
    np.testing.assert_array_equal(s, remnant(48, seed=1))
    # Doppler-separated Fe regions: the two Fe maps barely overlap
    fe1, fe2 = s[2].ravel(), s[3].ravel()
    assert fe1 @ fe2 / (np.linalg.norm(fe1) * np.linalg.norm(fe2)) < 0.5
    # synchrotron filaments are at the rim: their mean radius exceeds the thermal shell's
    yy, xx = np.mgrid[0:48, 0:48]
    r = np.hypot(yy - 24, xx - 24)
    assert (s[0] * r).sum() > (s[1] * r).sum()


def test_bad_size():
    with pytest.raises(ValueError):
        dead_leaves(1, (1, 5))
    with pytest.raises(ValueError):
        natural_images(1, 8, kinds=("nope",))


@pytest.mark.parametrize("gen", [natural_images, dead_leaves, power_law_field, photo_crops, remnant])
@pytest.mark.parametrize("size", [2.5, None, "8", (8.0, 8.0)])
def test_size_must_be_ints(gen, size):
    with pytest.raises(TypeError, match="size must be an int or a pair of ints"):
        gen(size) if gen is remnant else gen(1, size)


@pytest.mark.parametrize("gen", [natural_images, dead_leaves, power_law_field, photo_crops])
@pytest.mark.parametrize("n, exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)])
def test_n_errors(gen, n, exc):
    with pytest.raises(exc, match="n must be"):
        gen(n, 8)


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(r_min=0), ValueError, "r_min must be > 0"),
    (dict(r_min=-1.0), ValueError, "r_min must be > 0"),
    (dict(r_min=float("nan")), ValueError, "r_min must be finite"),
    (dict(r_min="2"), TypeError, "r_min must be a real number"),
    (dict(r_max=1.0), ValueError, "r_max must be >= r_min"),
    (dict(r_max=float("inf")), ValueError, "r_max must be finite"),
    (dict(alpha=1), ValueError, "alpha must not be 1"),
    (dict(alpha=float("nan")), ValueError, "alpha must be finite"),
])
def test_dead_leaves_parameter_errors(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        dead_leaves(1, 8, seed=0, **kw)


def test_dead_leaves_parameters_near_limits():
    x = dead_leaves(1, 8, seed=0, r_min=2.0, r_max=2.0, alpha=1.001)
    assert x.shape == (1, 8, 8) and np.all(np.isfinite(x))


@pytest.mark.parametrize("beta, exc, msg", [
    ((float("nan"), 2.0), ValueError, r"beta\[0\] must be finite"),
    ((1.6, float("inf")), ValueError, r"beta\[1\] must be finite"),
    ((2.4, 1.6), ValueError, "lo <= hi"),
    (2.0, TypeError, "pair"),
    ((1.0, 2.0, 3.0), TypeError, "pair"),
])
def test_power_law_beta_errors(beta, exc, msg):
    with pytest.raises(exc, match=msg):
        power_law_field(1, 8, seed=0, beta=beta)


def test_remnant_smallest_size():
    for size in (2, 3, (3, 16), (16, 3)):
        with pytest.raises(ValueError, match="at least 4 x 4"):
            remnant(size, seed=0)
    for seed in range(5):
        s = remnant(4, seed=seed)
        assert np.all(np.isfinite(s))
        np.testing.assert_allclose(s.sum(axis=(1, 2)), 1.0)
