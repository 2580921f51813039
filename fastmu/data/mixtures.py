"""Mixtures ``X = A S + N`` made on the fly, on the device that uses them.

A :class:`MixtureSet` stores only mixing matrices ``A (n_sets, m, 4)``, a map
pool ``(n_maps, 4, h, w)`` (or a function that makes map sets on demand) and
one noise seed per sample; :meth:`MixtureSet.batch` builds ``X`` for the
requested samples on the requested device.  The paper's sets (750 + 150 + 150
samples of 65 x 16384) would take 3.2 GB as X; stored like this they take the
maps plus a few kB.

Noise is white Gaussian, drawn in float32 on the CPU from a
``torch.Generator`` seeded with the sample's seed, then scaled so that
``||N|| = 10^(-SNR/20) ||A S||`` holds exactly (the measured SNR equals the
target up to rounding), then moved to the device.  Drawing on the CPU is what
makes the noise of a sample identical on every device and for any batch
composition; its cost (m * t normal draws per sample) is small next to a
training step.
"""
from __future__ import annotations

import operator
import warnings

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from fastmu.interop import torch_device
from fastmu.data.io import normalise_maps, resample_maps, shared_data_dir, validate_maps, validate_spectra
from fastmu.data.sources import _check_real
from fastmu.validation import check_tensors_nonnegative_finite

__all__ = ["mix", "measured_snr_db", "MixtureSet", "PRESETS", "paper_sets"]


def _check_snr(snr_db) -> float:
    try:
        return _check_real(snr_db, "snr_db")
    except ValueError as exc:
        raise ValueError(f"{exc} (use snr_db=None for noiseless mixtures)") from None


def _noise(seeds: Sequence[int], shape: tuple[int, int]):
    """Standard normal noise (b, m, t), on the CPU, one generator per seed.

    Drawn in float32 (6x faster than float64 in torch on CPU); the SNR is still
    exact because the scale is computed from the norm of the noise actually drawn.
    """
    import torch

    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for i, s in enumerate(seeds):
        g.manual_seed(int(s) % (2**63))
        out[i] = torch.randn(shape, generator=g, dtype=torch.float32)
    return out


def mix(A, S, snr_db: float | None = 60.0, *, seeds: Sequence[int] | int | None = None,
        device="cpu", dtype=None):
    """Batched ``X = A S + N`` with white Gaussian noise at an exact SNR.

    Parameters
    ----------
    A : array_like or torch.Tensor, shape (b, m, n)
        Mixing matrices.
    S : array_like or torch.Tensor, shape (b, n, t) or (b, n, h, w)
        Sources (maps are flattened to t = h * w, row-major).
    snr_db : float or None
        Target SNR in dB, ``||N|| = 10^(-snr/20) ||A S||`` per sample. None:
        no noise.
    seeds : int or sequence of int, optional
        Noise seed per sample (an int ``s`` means ``s, s+1, ...``). Default 0.
    device : str or torch.device
        Where X, A, S are returned (and the product computed).
    dtype : torch.dtype, optional
        Output dtype, a floating one (default float32).

    Returns
    -------
    X, A, S : torch.Tensor
        Shapes (b, m, t), (b, m, n), (b, n, t); empty when b = 0.

    Raises
    ------
    TypeError
        A non-floating ``dtype``; complex A or S.
    ValueError
        Shapes that do not match; NaN, inf or negative entries in A or S.
    """
    import torch

    dtype = dtype or torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype (e.g. torch.float32, torch.float64), got {dtype!r}")
    device = torch_device(device)
    A = torch.as_tensor(np.asarray(A) if not isinstance(A, torch.Tensor) else A)
    S = torch.as_tensor(np.asarray(S) if not isinstance(S, torch.Tensor) else S)
    for name, v in (("A", A), ("S", S)):
        if v.is_complex():  # casting to the work dtype would drop the imaginary part
            raise TypeError(f"{name} must be real numbers, got dtype {v.dtype}")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (b, m, n), got {tuple(A.shape)}")
    if S.ndim == 4:
        S = S.flatten(2)  # not reshape(b, n, -1): with b = 0 the -1 is ambiguous
    if S.ndim != 3:
        raise ValueError(f"S must have shape (b, n, t) or (b, n, h, w), got rank {S.ndim} {tuple(S.shape)}")
    if S.shape[0] != A.shape[0] or S.shape[1] != A.shape[2]:
        raise ValueError(f"A {tuple(A.shape)} and S {tuple(S.shape)} do not match (b, m, n) x (b, n, t)")
    b, m, _ = A.shape
    t = S.shape[2]
    # float64 work for float64 output; float32 otherwise (X for a paper batch of 25 is
    # 107 MB in float32, 213 MB in float64).  Norms are always accumulated in float64.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    A64 = A.to(device=device, dtype=work)
    S64 = S.to(device=device, dtype=work)
    check_tensors_nonnegative_finite({"A": A64, "S": S64})  # one pass each, one read on the host
    X = torch.bmm(A64, S64)
    if snr_db is not None:
        snr = _check_snr(snr_db)
        if seeds is None:
            seeds = 0
        if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
            seeds = [int(seeds) + i for i in range(b)]
        try:
            seeds = [operator.index(s) for s in seeds]
        except TypeError:
            raise TypeError(f"seeds must be an int or a sequence of ints, got {seeds!r}") from None
        if len(seeds) != b:
            raise ValueError(f"need one seed per sample ({b}), got {len(seeds)}")
        N = _noise(seeds, (m, t)).to(device=device, dtype=work)
        norm = lambda v: torch.linalg.vector_norm(v, dim=(1, 2), dtype=torch.float64)  # noqa: E731
        scale = 10.0 ** (-snr / 20.0) * norm(X) / norm(N)
        X = X + N * scale.to(work)[:, None, None]
    X, A, S = X.to(dtype), A64.to(dtype), S64.to(dtype)
    # A and S were checked finite: an inf or NaN here is A S (or a cast) past the dtype's range
    if not bool(torch.stack([torch.isfinite(v).all() for v in (X, A, S)]).all()):
        raise FloatingPointError(
            f"the mixtures overflow {str(dtype).removeprefix('torch.')}: A, S or A S passes its largest value, "
            f"{torch.finfo(dtype).max:.3g} (the largest entries of A and S: {float(A64.max()):.3g} and "
            f"{float(S64.max()):.3g}); scale A or S down, or pass a wider dtype")
    return X, A, S


def measured_snr_db(X, A, S) -> np.ndarray:
    """SNR in dB of mixtures: ``20 log10(||A S|| / ||X - A S||)`` per sample.

    Parameters
    ----------
    X : array_like or Tensor, shape (b, m, t)
    A : array_like or Tensor, shape (b, m, n)
    S : array_like or Tensor, shape (b, n, t) or (b, n, h, w)

    Returns
    -------
    ndarray, shape (b,), float64
        ``inf`` for a noiseless mixture.
    """
    import torch

    X, A, S = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in (X, A, S))
    clean = torch.bmm(A.double(), S.double().flatten(2))
    noise = X.double() - clean
    return (20 * torch.log10(torch.linalg.vector_norm(clean, dim=(1, 2))
                              / torch.linalg.vector_norm(noise, dim=(1, 2)))).cpu().numpy()


@dataclass
class MixtureSet:
    """A set of mixtures described by stored A, maps and seeds; X is made per batch.

    Parameters
    ----------
    A : ndarray, shape (n_sets, m, 4)
        Mixing matrices; sample i uses ``A[a_index[i]]``.
    maps : ndarray (n_maps, 4, h, w) or callable
        Map pool, or ``maps(j) -> (4, h, w)`` producing map set j on demand
        (memoised; ``n_maps`` must then be given).
    n_maps : int, optional
        How many map sets a ``maps`` function can make (``map_index`` must be
        below it); taken from the pool otherwise.
    snr_db : float or None
        Target SNR.
    seeds : ndarray of int, shape (n,)
        Noise seed per sample.
    a_index, map_index : ndarray of int, shape (n,)
        Which A and which map set each sample uses (default: sample i uses i).
    name : str
        For display.
    map_kinds : tuple of str, optional
        The natural-image kinds the maps were drawn from, when they were
        (:func:`paper_sets` records them; checkpoints keep them as a training setting).
    """

    A: np.ndarray
    maps: np.ndarray | Callable[[int], np.ndarray]
    snr_db: float | None
    seeds: np.ndarray
    a_index: np.ndarray | None = None
    map_index: np.ndarray | None = None
    n_maps: int | None = None
    name: str = "mixtures"
    map_kinds: tuple[str, ...] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.A = validate_spectra(self.A)
        if self.snr_db is not None:
            self.snr_db = _check_snr(self.snr_db)
        self.seeds = np.asarray(self.seeds, dtype=np.int64)
        if self.map_kinds is not None:
            if isinstance(self.map_kinds, str) or not all(isinstance(k, str) for k in self.map_kinds):
                raise TypeError(f"map_kinds must be a sequence of kind names, e.g. ('photo',), "
                                f"got {self.map_kinds!r}")
            self.map_kinds = tuple(self.map_kinds)
        n = len(self.seeds)
        if callable(self.maps):
            if self.n_maps is None:
                raise ValueError("n_maps is required when maps is a function")
        else:
            self.maps = validate_maps(self.maps).astype(np.float32)
            self.n_maps = self.maps.shape[0]
        self.a_index = np.arange(n) if self.a_index is None else np.asarray(self.a_index, dtype=np.int64)
        self.map_index = np.arange(n) if self.map_index is None else np.asarray(self.map_index, dtype=np.int64)
        for nm, idx, hi in (("a_index", self.a_index, self.A.shape[0]), ("map_index", self.map_index, self.n_maps)):
            if idx.shape != (n,):
                raise ValueError(f"{nm} must have one entry per sample ({n}), got shape {idx.shape}")
            if n and (idx.min() < 0 or idx.max() >= hi):
                raise ValueError(f"{nm} out of range [0, {hi})")

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n, m, t) of the X this set describes."""
        h, w = self.map_set(0).shape[1:]
        return len(self), self.A.shape[1], h * w

    def map_set(self, j: int) -> np.ndarray:
        """Map set j, shape (4, h, w), float32."""
        if not callable(self.maps):
            return self.maps[j]
        if j not in self._cache:
            self._cache[j] = validate_maps(self.maps(int(j)))[0].astype(np.float32)
        return self._cache[j]

    def batch(self, idx, *, device="cpu", dtype=None):
        """Mixtures for some samples of the set.

        Parameters
        ----------
        idx : int or sequence of int
            Sample indices (negative ones count from the end).
        device : str or torch.device, default "cpu"
        dtype : torch.dtype, optional
            Default: torch's default dtype.

        Returns
        -------
        X : Tensor, shape (b, m, t)
        A : Tensor, shape (b, m, 4)
        S : Tensor, shape (b, 4, t)
            Empty (b = 0) for an empty ``idx``.
        """
        idx = np.atleast_1d(np.asarray(idx))
        if idx.size and idx.dtype.kind not in "iu":  # casting would truncate 1.7 to 1, read True as 1
            raise TypeError(f"idx must be an int or a sequence of ints, got {np.array2string(idx, threshold=6)} "
                            f"(dtype {idx.dtype})")
        idx = idx.astype(np.int64)  # an empty list comes as float64
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range for a set of {len(self)}")
        idx = idx % max(len(self), 1)
        A = self.A[self.a_index[idx]]
        if idx.size:
            S = np.stack([self.map_set(j) for j in self.map_index[idx]])
        else:  # nothing to stack, but X still needs the set's t = h * w
            hw = self.map_set(0).shape[1:] if callable(self.maps) else self.maps.shape[2:]
            S = np.empty((0, self.A.shape[2], *hw), dtype=np.float32)
        return mix(A, S, self.snr_db, seeds=self.seeds[idx].tolist(), device=device, dtype=dtype)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int | None = None,
                device="cpu", dtype=None) -> Iterator[tuple]:
        """Iterate over the set in batches (the last one may be smaller).

        Parameters
        ----------
        batch_size : int
        shuffle : bool, default False
            Visit the samples in a random order drawn from ``seed``.
        seed : int, optional
        device, dtype
            As in :meth:`batch`.

        Yields
        ------
        (X, A, S) : tuple of Tensor
            As :meth:`batch` returns.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for s in range(0, len(self), batch_size):
            yield self.batch(order[s:s + batch_size], device=device, dtype=dtype)


def _check_set_size(value, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None (the preset's size), got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 or None (the preset's size), got {value}")
    return int(value)


def _noise_seeds(base: int, more: Sequence[int], preset_sizes: Sequence[int],
                 sizes: Sequence[int]) -> list[np.ndarray]:
    """One noise seed per sample of each set; sample i's depends on (set, i) only.

    The preset's samples take consecutive slots of one stream, set after set,
    at offsets fixed by the preset's sizes (not the requested ones), so a
    larger training set cannot shift the test sets' noise; samples past the
    preset's size come from the set's own extra stream. At the preset's sizes
    this is the single stream fastmu has always cut, so published sets stay
    as they were.
    """
    shared = np.random.default_rng(base).integers(0, 2**62, size=sum(preset_sizes))
    out, start = [], 0
    for extra, cap, n in zip(more, preset_sizes, sizes):
        seeds = shared[start:start + min(n, cap)]
        if n > cap:
            seeds = np.concatenate([seeds, np.random.default_rng(extra).integers(0, 2**62, size=n - cap)])
        out.append(seeds)
        start += cap
    return out


#: set sizes and map size of each preset
PRESETS: dict[str, dict[str, int]] = {
    "paper": {"train": 750, "test_simple": 150, "test_realistic": 150, "size": 128},
    "small": {"train": 64, "test_simple": 16, "test_realistic": 16, "size": 32},
}


def paper_sets(preset: str = "paper", *, seed: int = 0, snr_db: float = 60.0, m: int = 65,
               size: int | None = None, n_train: int | None = None, n_test: int | None = None,
               train_spectra: np.ndarray | None = None, realistic_maps: np.ndarray | str | None = "auto",
               kinds: tuple[str, ...] | None = None) -> dict[str, MixtureSet]:
    """The paper's three sets, described (not materialised).

    * ``train``: generated spectra, 4 natural-image maps per sample;
    * ``test_simple``: held-out generated spectra, fresh natural-image maps;
    * ``test_realistic``: held-out generated spectra mixed with the Cas A
      maps (``casa_source_maps.npz`` from the reference folder, resampled with
      anti-aliasing) or, when that file is absent, one procedural remnant.

    Every map is scaled to max 1 (fastmu's source normalisation; the Cas A
    file's unit-sum maps are rescaled too), so all sources have comparable
    dynamic range whatever their size.

    Parameters
    ----------
    preset : {"paper", "small"}
        Sizes from :data:`PRESETS` (paper: 750/150/150 at 128x128, t = 16384).
    seed : int
        Master seed: spectra, maps and noise seeds of all sets derive from it,
        with distinct streams so the test spectra are held out from training.
        A sample's noise seed depends on its set and index only, so
        ``n_train`` does not change the test sets.
    snr_db : float
        SNR of all sets (paper: 60 dB).
    m : int
        Channels.
    size : int or (int, int), optional
        Override the preset's map size (h, w >= 2; >= 4 for the procedural remnant).
    n_train, n_test : int, optional
        Override the preset's set sizes (>= 1).
    train_spectra : ndarray (n, m, 4), optional
        Use these (e.g. the real Chandra set) for training instead of generated ones.
    realistic_maps : "auto", "remnant", path or ndarray
        Maps of the realistic set: "auto" (Cas A file if found, else remnant).
    kinds : tuple of str, optional
        Natural-image kinds (see :func:`fastmu.data.natural_images`); default
        photos + dead leaves + 1/f when scikit-image is present, else procedural only.

    Returns
    -------
    dict with keys ``train``, ``test_simple``, ``test_realistic``.
    """
    from fastmu.data.remnant import remnant
    from fastmu.data.sources import _check_size, natural_images
    from fastmu.data.spectra import spectra

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    cfg = dict(PRESETS[preset])
    # only None means "the preset's": a 0 must not quietly become the preset's value
    size = _check_size(cfg["size"] if size is None else size)
    n_tr = _check_set_size(n_train, "n_train", cfg["train"])
    n_te = _check_set_size(n_test, "n_test", cfg["test_simple"])
    n_re = _check_set_size(n_test, "n_test", cfg["test_realistic"])
    if kinds is None:
        try:
            import skimage  # noqa: F401

            kinds = ("photo", "dead_leaves", "power_law")
        except ImportError:
            kinds = ("dead_leaves", "power_law")
            # other maps, so other sets, other models and other scores than with scikit-image
            warnings.warn("scikit-image is not installed: the training and simple test sets are made "
                          "without natural-photo crops, so they differ from the sets made with it (and "
                          "so do the models trained and the scores). Install scikit-image (fastmu's data "
                          "extra) to reproduce published results", RuntimeWarning, stacklevel=2)

    ss = np.random.SeedSequence(seed)
    (s_spec_tr, s_spec_te, s_spec_re, s_maps_tr, s_maps_te, s_noise, s_rem,
     s_more_tr, s_more_te, s_more_re) = (
        int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for c in ss.spawn(10)
    )
    noise_tr, noise_te, noise_re = _noise_seeds(
        s_noise, (s_more_tr, s_more_te, s_more_re),
        (cfg["train"], cfg["test_simple"], cfg["test_realistic"]), (n_tr, n_te, n_re))

    def map_maker(base: int) -> Callable[[int], np.ndarray]:
        # map set j depends on (base, j) only: lazily made, identical in any order
        def make(j: int) -> np.ndarray:
            return natural_images(4, size, seed=base + 7919 * j, kinds=kinds)
        return make

    A_tr = spectra(n_tr, seed=s_spec_tr, m=m) if train_spectra is None else validate_spectra(train_spectra)
    train = MixtureSet(A_tr, map_maker(s_maps_tr), snr_db, noise_tr,
                       a_index=np.arange(n_tr) % A_tr.shape[0], n_maps=n_tr, name="train", map_kinds=kinds)
    test_simple = MixtureSet(spectra(n_te, seed=s_spec_te, m=m), map_maker(s_maps_te), snr_db,
                             noise_te, n_maps=n_te, name="test_simple", map_kinds=kinds)

    if isinstance(realistic_maps, str) and realistic_maps == "auto":
        d = shared_data_dir()
        f = d / "casa_source_maps.npz" if d is not None else None
        realistic_maps = f if f is not None and f.exists() else "remnant"
    if isinstance(realistic_maps, str) and realistic_maps == "remnant":
        S_re = remnant(size, seed=s_rem)[None]
        re_name = "test_realistic (procedural remnant)"
    else:
        if isinstance(realistic_maps, np.ndarray):
            S_re = validate_maps(realistic_maps)
        else:
            from fastmu.data.io import load_maps

            S_re = load_maps(realistic_maps, normalise=None)
        re_name = "test_realistic (Cas A maps)"
    S_re = normalise_maps(resample_maps(S_re, size), "max")
    test_realistic = MixtureSet(spectra(n_re, seed=s_spec_re, m=m), S_re, snr_db,
                                noise_re, map_index=np.zeros(n_re, dtype=np.int64) % S_re.shape[0],
                                name=re_name)
    return {"train": train, "test_simple": test_simple, "test_realistic": test_realistic}
