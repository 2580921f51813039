"""Mixtures: exact SNR, determinism, the paper's set descriptions."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastmu.data import MixtureSet, measured_snr_db, mix, paper_sets, remnant, spectra  # noqa: E402

SHARED = Path(os.environ.get("FASTMU_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _inputs(b=6, size=16):
    A = spectra(b, seed=0)
    S = np.stack([remnant(size, seed=i) for i in range(b)])
    return A, S


@pytest.mark.parametrize("snr", [0.0, 20.0, 60.0, 95.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_snr_exact(snr, dtype):
    A, S = _inputs()
    X, At, St = mix(A, S, snr, seeds=3, dtype=dtype)
    assert X.shape == (6, 65, 256) and At.shape == (6, 65, 4) and St.shape == (6, 4, 256)
    assert X.dtype == dtype
    got = measured_snr_db(X, At, St)
    # float32 rounding of X limits how small a noise can be measured: 95 dB needs float64
    tol = 0.1 if (dtype == torch.float64 or snr <= 60) else 1.0
    np.testing.assert_allclose(got, snr, atol=tol)


def test_noise_deterministic_and_per_sample():
    A, S = _inputs()
    X1, _, _ = mix(A, S, 30.0, seeds=[10, 11, 12, 13, 14, 15])
    X2, _, _ = mix(A, S, 30.0, seeds=[10, 11, 12, 13, 14, 15])
    torch.testing.assert_close(X1, X2, rtol=0, atol=0)
    # a sample's noise depends only on its seed, not on the batch around it
    X3, _, _ = mix(A[2:4], S[2:4], 30.0, seeds=[12, 13])
    torch.testing.assert_close(X1[2:4], X3, rtol=0, atol=0)
    X4, _, _ = mix(A, S, 30.0, seeds=[99, 11, 12, 13, 14, 15])
    assert not torch.equal(X1[0], X4[0])


def test_noiseless():
    A, S = _inputs(2)
    X, At, St = mix(A, S, None, dtype=torch.float64)
    torch.testing.assert_close(X, torch.bmm(At, St))


@pytest.mark.parametrize("snr", [float("nan"), float("inf"), -float("inf")])
def test_snr_not_finite(snr):
    A, S = _inputs(1)
    with pytest.raises(ValueError, match="finite"):
        mix(A, S, snr)


def test_shape_errors():
    A, S = _inputs(2)
    with pytest.raises(ValueError, match="do not match"):
        mix(A, S[:1], 60.0)
    with pytest.raises(ValueError, match="rank"):
        mix(A, S[:, :, 0, 0], 60.0)
    with pytest.raises(TypeError):
        mix(A, S, "loud")


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, np.float64, "float64"],
                         ids=["int64", "complex64", "numpy", "str"])
def test_mix_dtype_must_be_floating_torch(dtype):
    A, S = _inputs(1, 4)
    with pytest.raises(TypeError, match="floating torch dtype"):
        mix(A, S, 60.0, dtype=dtype)


@pytest.mark.parametrize("snr", [60.0, None])
def test_mix_empty_batch(snr):
    A, S = _inputs(2, 4)
    X, At, St = mix(A[:0], S[:0], snr)
    assert X.shape == (0, 65, 16) and At.shape == (0, 65, 4) and St.shape == (0, 4, 16)
    assert measured_snr_db(X, At, St).shape == (0,)


def test_mix_refuses_bad_factors():
    A, S = _inputs(2, 4)
    S_inf = S.copy()
    S_inf[1, 2, 3, 0] = np.inf
    with pytest.raises(ValueError, match="A contains NaN or infinite"):
        mix(np.where(A > 0.3, np.nan, A), S, 60.0)
    with pytest.raises(ValueError, match="S contains NaN or infinite"):
        mix(A, S_inf, None)
    with pytest.raises(ValueError, match="A must be non-negative"):
        mix(-A, S, 60.0)
    with pytest.raises(ValueError, match="S must be non-negative"):
        mix(A, torch.from_numpy(S) - 1e-3, 60.0)
    with pytest.raises(TypeError, match="real numbers"):
        mix(A.astype(np.complex128), S, 60.0)


def test_mixture_set_batches():
    A, S = _inputs(5)
    ms = MixtureSet(A, S, 60.0, seeds=np.arange(5) + 100)
    assert len(ms) == 5 and ms.shape == (5, 65, 256)
    X, At, St = ms.batch([4, 1])
    Xr, _, _ = mix(A[[4, 1]], S[[4, 1]], 60.0, seeds=[104, 101])
    torch.testing.assert_close(X, Xr)
    seen = sum(b[0].shape[0] for b in ms.batches(2, shuffle=True, seed=0))
    assert seen == 5
    with pytest.raises(ValueError, match="finite"):
        MixtureSet(A, S, float("nan"), seeds=np.arange(5))
    with pytest.raises(ValueError, match="map_index"):
        MixtureSet(A, S, 60.0, seeds=np.arange(5), map_index=np.arange(5) + 1)


def test_mixture_set_batch_arguments():
    A, S = _inputs(3, 4)
    ms = MixtureSet(A, S, 60.0, seeds=np.arange(3))
    X, At, St = ms.batch([])
    assert X.shape == (0, 65, 16) and At.shape == (0, 65, 4) and St.shape == (0, 4, 16)
    lazy = MixtureSet(A, lambda j: S[j], 60.0, seeds=np.arange(3), n_maps=3)
    assert lazy.batch(np.array([], dtype=np.int64))[0].shape == (0, 65, 16)
    for idx in ([1.7], [True], np.array([1.0])):
        with pytest.raises(TypeError, match="idx must be an int"):
            ms.batch(idx)
    for bs in ("2", 2.0, True):
        with pytest.raises(TypeError, match="batch_size must be an int"):
            next(ms.batches(bs))


def test_paper_sets_small():
    sets = paper_sets("small", seed=0, kinds=("dead_leaves", "power_law"))
    assert [len(sets[k]) for k in ("train", "test_simple", "test_realistic")] == [64, 16, 16]
    X, A, S = sets["train"].batch(np.arange(4))
    assert X.shape == (4, 65, 1024) and X.dtype == torch.float32
    np.testing.assert_allclose(measured_snr_db(X.double(), A, S), 60.0, atol=0.1)
    # same seed, same data; test spectra are held out from training
    again = paper_sets("small", seed=0, kinds=("dead_leaves", "power_law"))
    torch.testing.assert_close(again["train"].batch([3])[0], sets["train"].batch([3])[0], rtol=0, atol=0)
    assert not np.allclose(sets["train"].A[:16], sets["test_realistic"].A)
    # the paper preset describes 750/150/150 sets of 128x128 maps without making them
    paper = paper_sets("paper", seed=0, kinds=("power_law",), realistic_maps="remnant")
    assert [len(paper[k]) for k in ("train", "test_simple", "test_realistic")] == [750, 150, 150]
    assert paper["train"].shape == (750, 65, 16384)


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(n_train=0), ValueError, "n_train must be >= 1"),
    (dict(n_train=-3), ValueError, "n_train must be >= 1"),
    (dict(n_test=0), ValueError, "n_test must be >= 1"),
    (dict(size=0), ValueError, "size must be"),
    (dict(n_train=2.5), TypeError, "n_train must be an int"),
    (dict(n_test=True), TypeError, "n_test must be an int"),
    (dict(size=8.0), TypeError, "size must be"),
])
def test_paper_sets_bad_sizes(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        paper_sets("small", kinds=("power_law",), realistic_maps="remnant", **kw)


def test_test_sets_do_not_depend_on_the_training_set_size():
    kw = dict(seed=0, size=8, kinds=("power_law",), realistic_maps="remnant")
    few, many = paper_sets("small", n_train=4, **kw), paper_sets("small", n_train=100, **kw)
    for name in ("test_simple", "test_realistic"):
        np.testing.assert_array_equal(few[name].seeds, many[name].seeds)
        torch.testing.assert_close(few[name].batch([0, 5])[0], many[name].batch([0, 5])[0], rtol=0, atol=0)
    # a training sample keeps its noise whatever the set's size, and no two samples share a seed
    np.testing.assert_array_equal(few["train"].seeds, many["train"].seeds[:4])
    seeds = np.concatenate([many[k].seeds for k in ("train", "test_simple", "test_realistic")])
    assert len(np.unique(seeds)) == len(seeds) == 132
    # the realistic set's noise does not follow the simple set's size either (both are n_test)
    small, large = paper_sets("small", n_test=3, **kw), paper_sets("small", n_test=40, **kw)
    np.testing.assert_array_equal(small["test_realistic"].seeds, large["test_realistic"].seeds[:3])
    np.testing.assert_array_equal(small["test_simple"].seeds, large["test_simple"].seeds[:3])


def test_preset_sizes_keep_the_noise_seeds_of_one_stream():
    # published tables were made at the preset's sizes: their sets must not change
    ss = np.random.SeedSequence(7)
    s_noise = int(ss.spawn(7)[5].generate_state(1, dtype=np.uint64)[0] >> 1)
    one_stream = np.random.default_rng(s_noise).integers(0, 2**62, size=64 + 16 + 16)
    sets = paper_sets("small", seed=7, kinds=("power_law",), realistic_maps="remnant")
    got = np.concatenate([sets[k].seeds for k in ("train", "test_simple", "test_realistic")])
    np.testing.assert_array_equal(got, one_stream)


def test_paper_sets_none_means_preset():
    sets = paper_sets("small", kinds=("power_law",), realistic_maps="remnant",
                      size=None, n_train=None, n_test=3)
    assert [len(sets[k]) for k in ("train", "test_simple", "test_realistic")] == [64, 3, 3]
    assert sets["train"].shape == (64, 65, 1024)


def test_realistic_uses_casa_when_present():
    f = SHARED / "casa_source_maps.npz"
    if not f.exists():
        pytest.skip(f"Cas A maps not found at {f}")
    sets = paper_sets("small", seed=0, kinds=("power_law",), realistic_maps=f)
    assert "Cas A" in sets["test_realistic"].name
    X, A, S = sets["test_realistic"].batch([0, 1])
    torch.testing.assert_close(S[0], S[1])  # same maps, different spectra
    assert not torch.equal(A[0], A[1])
    np.testing.assert_allclose(S.amax(-1).numpy(), 1.0, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_data_on_gpu():
    A, S = _inputs(3)
    Xc, _, _ = mix(A, S, 40.0, seeds=5, dtype=torch.float64)
    Xg, _, _ = mix(A, S, 40.0, seeds=5, dtype=torch.float64, device="cuda")
    assert Xg.device.type == "cuda"
    torch.testing.assert_close(Xg.cpu(), Xc, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_a_gpu_is_a_clear_error():
    A, S = spectra(1, seed=0, m=16), np.random.default_rng(0).random((1, 4, 20))
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        mix(A, S, 60.0, device="cuda")


def test_mixtures_that_overflow_the_dtype_and_bad_seeds_are_refused():
    A = np.random.default_rng(0).random((2, 10, 4))
    S = np.random.default_rng(1).random((2, 4, 50))
    with pytest.raises(FloatingPointError, match="overflow float32"):
        mix(A * 1e20, S * 1e20, 30)
    with pytest.raises(FloatingPointError, match="overflow float16"):
        mix(A * 1e5, S, 30, dtype=torch.float16)
    for seeds in (1.5, [1, 2.5], "ab"):
        with pytest.raises(TypeError, match="seeds must be an int or a sequence of ints"):
            mix(A, S, 30, seeds=seeds)
    X, _, _ = mix(A, S, 30, seeds=np.array([3, 4]))
    torch.testing.assert_close(X, mix(A, S, 30, seeds=3)[0])


def test_paper_sets_without_scikit_image_say_they_differ(monkeypatch):
    import builtins

    from fastmu.data.mixtures import paper_sets

    real = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with pytest.warns(RuntimeWarning, match="without natural-photo crops"):
        paper_sets(size=8, n_train=2, n_test=1, realistic_maps="remnant")
