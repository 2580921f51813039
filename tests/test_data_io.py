"""Loaders: validation of user files, resampling, the shared Cas A maps."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fastmu.data import load_maps, load_spectra, validate_maps, validate_spectra

SHARED = Path(os.environ.get("FASTMU_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def test_spectra_roundtrip(tmp_path):
    A = np.random.default_rng(0).random((3, 20, 4))
    np.savez(tmp_path / "a.npz", A=A)
    np.save(tmp_path / "a.npy", A[0])
    got = load_spectra(tmp_path / "a.npz")
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0)
    assert load_spectra(tmp_path / "a.npy").shape == (1, 20, 4)


@pytest.mark.parametrize("bad, exc, msg", [
    (np.ones((3, 20, 3)), ValueError, "4 components"),
    (np.ones((2, 3, 20, 4)), ValueError, "shape"),
    (-np.ones((3, 20, 4)), ValueError, "negative"),
    (np.full((3, 20, 4), np.nan), ValueError, "non-finite"),
    (np.full((3, 20, 4), np.inf), ValueError, "non-finite"),
    (np.zeros((3, 20, 4)), ValueError, "all-zero"),
    (np.array([["a"]]), TypeError, "real numbers"),
])
def test_spectra_errors(tmp_path, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        validate_spectra(bad)
    if bad.dtype.kind == "f":
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(exc, match=msg):
            load_spectra(tmp_path / "bad.npy")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_spectra(tmp_path / "missing.npz")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(ValueError, match="unsupported"):
        load_spectra(tmp_path / "x.txt")
    np.savez(tmp_path / "k.npz", B=np.ones((2, 8, 4)), C=np.ones(3))
    with pytest.raises(ValueError, match="no array 'A'"):
        load_spectra(tmp_path / "k.npz")
    assert load_spectra(tmp_path / "k.npz", key="B").shape == (2, 8, 4)


def _damaged(tmp_path, kind):
    """A file NumPy cannot read as arrays of numbers; its name is its suffix's."""
    if kind == "not numpy":
        for suffix in (".npy", ".npz"):
            (tmp_path / f"garbage{suffix}").write_bytes(b"hello, world")
        return "garbage", r"is not a NumPy \.np[yz] file"
    if kind == "object array":
        np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        np.savez(tmp_path / "obj.npz", A=np.array([{"a": 1}, None], dtype=object))
        return "obj", "holds an object array"
    full = tmp_path / "full"
    np.save(f"{full}.npy", np.ones((2, 8, 4)))
    np.savez_compressed(f"{full}.npz", A=np.random.default_rng(0).random((2, 8, 4)))
    for suffix, keep in ((".npy", 200), (".npz", None)):
        data = bytearray((tmp_path / f"full{suffix}").read_bytes())
        if keep is not None:
            data = data[:keep]  # truncated
        else:
            data[60:120] = b"\x07" * 60  # corrupted inside the compressed member
        (tmp_path / f"damaged{suffix}").write_bytes(bytes(data))
    return "damaged", "could not be read"


@pytest.mark.parametrize("kind", ["not numpy", "object array", "damaged"])
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_unreadable_files_say_what_is_wrong(tmp_path, kind, suffix):
    # np.load(allow_pickle=False) calls a file that is not NumPy's "pickled (object) data"
    stem, msg = _damaged(tmp_path, kind)
    with pytest.raises(ValueError, match=msg):
        load_spectra(tmp_path / f"{stem}{suffix}")


@pytest.mark.parametrize("bad, msg", [
    (np.ones((4, 8)), "rank 2"),
    (np.ones((1, 1, 4, 8, 8)), "rank 5"),
    (np.ones((3, 8, 8)), "4 components"),
    (-np.ones((4, 8, 8)), "negative"),
    (np.full((4, 8, 8), np.nan), "non-finite"),
])
def test_maps_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        validate_maps(bad)


def test_maps_resample_normalise(tmp_path):
    S = np.random.default_rng(1).random((4, 40, 30))
    np.savez(tmp_path / "s.npz", S=S)
    out = load_maps(tmp_path / "s.npz", size=16)
    assert out.shape == (1, 4, 16, 16) and np.all(out >= 0)
    np.testing.assert_allclose(out.max(axis=(2, 3)), 1.0)
    out = load_maps(tmp_path / "s.npz", size=(10, 12), normalise="sum")
    np.testing.assert_allclose(out.sum(axis=(2, 3)), 1.0)


def test_casa_maps():
    f = SHARED / "casa_source_maps.npz"
    if not f.exists():
        pytest.skip(f"Cas A maps not found at {f} (set FASTMU_SHARED_DATA)")
    S = load_maps(f, size=32)
    assert S.shape == (1, 4, 32, 32) and np.all(S >= 0)
    np.testing.assert_allclose(S.max(axis=(2, 3)), 1.0)
