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
    with pytest.raises(ImportError, match=r"pip install fastmu\[data\]"):
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
