"""The paper's experiments: Tables I–II and Fig. 2, by one function (and ``fastmu paper``).

:func:`run_paper` builds the paper's sets (:func:`fastmu.data.paper_sets`),
trains the learned models (NALMU, ALMU, DNMF, SNMF-Net) with the paper's
loss, or loads them from a folder of checkpoints, and scores every method on
both test sets:

* Table I: ``test_simple`` (held-out spectra, natural-image maps);
* Table II: ``test_realistic`` (held-out spectra, Cas A maps or a procedural remnant);
* Fig. 2: the mean cosines of A and S along the iterations of MU and CD
  (log-spaced checkpoints up to their iteration budget) beside the learned
  models' layers, on both test sets.

Every method is scored the same way: components matched to the truth by the
Hungarian assignment (:func:`fastmu.metrics.evaluate`), then the mean cosine
(the paper's "SAD"), the spectral angle in degrees and the RMSE. The learned
models output the training order, so matching leaves them as they are
unless a component came out in another position.

This module imports torch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastmu.metrics import evaluate

__all__ = ["METHODS", "LEARNED", "ExperimentConfig", "make_sets", "new_model", "fit_model", "run_paper", "format_table", "plot_figure2",
           "iteration_checkpoints", "training_settings", "fit_resumable", "save_finished", "partial_path"]

#: every method, in table order
METHODS = ("mu", "cd", "dnmf", "snmf_net", "nalmu", "almu")
#: the methods that are trained
LEARNED = ("dnmf", "snmf_net", "nalmu", "almu")
LABELS = {"mu": "MU", "cd": "CD (coordinate descent)", "dnmf": "DNMF", "snmf_net": "SNMF-Net",
          "nalmu": "NALMU", "almu": "ALMU"}
SETS = {"test_simple": "Table I", "test_realistic": "Table II"}


@dataclass
class ExperimentConfig:
    """Everything that defines a run of the paper's experiments.

    Parameters
    ----------
    preset : {"paper", "small"}
        Set sizes and map size (:data:`fastmu.data.PRESETS`): ``"paper"`` is
        750 training and 2 × 150 test problems at 65 × 16384; ``"small"`` is
        64 and 2 × 16 at 65 × 1024 (minutes on a laptop CPU).
    seed : int
        Master seed of the data, the random starts and the training.
    snr_db : float
        SNR of every set (paper: 60 dB).
    methods : sequence of str
        Subset of :data:`METHODS`.
    mu_iters, cd_iters : int
        Iteration budgets of the MU and CD baselines (paper: 10 000 for MU).
    nalmu_layers : int
        NALMU depth (paper: 50); ALMU is ``nalmu_layers // 2`` + the rest.
    dnmf_layers, snmf_layers : int
        Depths of the two other unrolled networks.
    epochs : int
        Training epochs of each model (ALMU: this many per stage).
    batch_size : int
        Training mini-batch (paper: 25).
    lr : float
        Adam's learning rate (ALMU's MLP stage uses a tenth of it).
    train_spectra : {"generated", "real"}
        Train on generated spectra, or on the real Chandra set from the
        reference-data folder (the paper's training spectra).
    device, dtype : str
        Where the models train and every method runs.
    size, n_train, n_test : int, optional
        Override the preset's map size (t = size²) and set sizes.
    """

    preset: str = "small"
    seed: int = 0
    snr_db: float = 60.0
    methods: Sequence[str] = METHODS
    mu_iters: int = 10_000
    cd_iters: int = 1_000
    nalmu_layers: int = 50
    dnmf_layers: int = 10
    snmf_layers: int = 9
    epochs: int = 10
    batch_size: int = 25
    lr: float = 1e-2
    train_spectra: str = "generated"
    device: str = "cpu"
    dtype: str = "float32"
    size: int | None = None
    n_train: int | None = None
    n_test: int | None = None

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        for name in ("mu_iters", "cd_iters", "nalmu_layers", "dnmf_layers", "snmf_layers", "epochs",
                     "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.nalmu_layers < 2 and "almu" in self.methods:
            raise ValueError("ALMU needs nalmu_layers >= 2 (half front, half adaptive layers)")
        for name in ("size", "n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.preset not in ("paper", "small"):
            raise ValueError(f"preset must be 'paper' or 'small', got {self.preset!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.train_spectra not in ("generated", "real"):
            raise ValueError(f"train_spectra must be 'generated' or 'real', got {self.train_spectra!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                                             and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in 0 ... 2**32 - 1, got {self.seed!r}")
        if isinstance(self.snr_db, bool) or not (isinstance(self.snr_db, (int, float))
                                                 and math.isfinite(self.snr_db)):
            raise ValueError(f"snr_db must be a finite number, got {self.snr_db!r}")
        from fastmu.training import torch_device

        if torch_device(self.device).type == "meta":  # shapes only: nothing to train on or score
            raise ValueError("device 'meta' holds no values; the experiments need a device with data "
                             "(cpu, cuda, ...)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def iteration_checkpoints(n_iter: int, per_decade: int = 8) -> list[int]:
    """Log-spaced iteration counts ``1 … n_iter`` (inclusive, unique, increasing).

    Parameters
    ----------
    n_iter : int
        At least 1; always the last count.
    per_decade : int, default 8

    Returns
    -------
    list of int
    """
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    k = np.unique(np.round(np.logspace(0, np.log10(n_iter), per_decade * max(1, int(np.ceil(np.log10(n_iter)))) + 1)))
    pts = sorted(set(int(v) for v in k if 1 <= v <= n_iter) | {n_iter})
    return pts


def _load_set(data: Any, cfg: ExperimentConfig) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    X, A, S = data.batch(np.arange(len(data)), device=cfg.device, dtype=cfg.torch_dtype)
    # The Gaussian noise leaves a few entries of X slightly negative, which MU
    # and CD reject; every method gets the same clipped X.
    return X.clamp_min_(0), A.cpu().numpy(), S.cpu().numpy()


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _scores(A, S, A_true, S_true) -> dict[str, list[float]]:
    sc = evaluate(A, S, A_true, S_true, match=True)
    return {k: np.asarray(getattr(sc, k), dtype=float).tolist()
            for k in ("cos_A", "cos_S", "angle_A_deg", "angle_S_deg", "rmse_A", "rmse_S")}


def _solver_curve(solve: Callable, X: torch.Tensor, n: int, n_iter: int, A_true, S_true, seed: int,
                  per_decade: int = 8, progress: bool = False,
                  desc: str = "") -> tuple[dict[str, Any], tuple[Any, Any], float]:
    """Run an iterative solver in chunks up to log-spaced checkpoints; score at each.

    Chunking changes nothing: MU and CD carry no state besides (A, S), so
    restarting from the last factors continues the same sequence of iterates
    (to rounding for MU on a tall X on the CPU, whose restart forms its first
    A update outside the kernels: :mod:`fastmu.transposed`).
    """
    pts = iteration_checkpoints(n_iter, per_decade)
    A = S = None
    done = 0
    cA, cS = [], []
    seconds = 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_iter, desc=desc, unit="it", leave=False, dynamic_ncols=True, disable=None)
    for p in pts:
        t0 = time.perf_counter()
        if A is None:
            A, S = solve(X, n, n_iter=p, random_state=seed)
        else:
            A, S = solve(X, n, A0=A, S0=S, n_iter=p - done)
        _synchronize(X.device.type)
        seconds += time.perf_counter() - t0
        if bar is not None:
            bar.update(p - done)
        done = p
        sc = evaluate(A, S, A_true, S_true, match=True)
        cA.append(float(np.mean(sc.cos_A)))
        cS.append(float(np.mean(sc.cos_S)))
    if bar is not None:
        bar.close()
    return {"x": pts, "cos_A": cA, "cos_S": cS}, (A, S), seconds


def _layer_curve(outs: list[list[tuple]], A_true, S_true) -> dict[str, Any]:
    L = len(outs[0])
    cA, cS = [], []
    for layer in range(L):
        A = torch.cat([o[layer][0] for o in outs]).cpu()
        S = torch.cat([o[layer][1] for o in outs]).cpu()
        sc = evaluate(A, S, A_true, S_true, match=True)
        cA.append(float(np.mean(sc.cos_A)))
        cS.append(float(np.mean(sc.cos_S)))
    return {"x": list(range(1, L + 1)), "cos_A": cA, "cos_S": cS}


def _mu(X, n, **kw):
    import fastmu

    return fastmu.mu(X, n, init="random", **kw)


def _cd(X, n, **kw):
    from fastmu.baselines import cd

    return cd(X, n, init="random", **kw)


def _warm_up(kind: str, model: Any, X: torch.Tensor, n: int, seed: int) -> None:
    # Compile the kernels (and fill caches) outside the timed region.
    if kind in ("mu", "cd"):
        (_mu if kind == "mu" else _cd)(X[:1], n, n_iter=2, random_state=seed)
    else:
        with torch.no_grad():
            model(X[:1])
    _synchronize(X.device.type)


def _mean_spectra(A: np.ndarray) -> np.ndarray:
    M = A.mean(axis=0)
    return M / np.linalg.norm(M, axis=0, keepdims=True)


def new_model(kind: str, cfg: ExperimentConfig, train_set: Any) -> torch.nn.Module:
    """An untrained model of ``kind`` sized for ``train_set``, with ``cfg``'s depth, dtype and device.

    DNMF and SNMF-Net start from the mean of the training spectra (columns
    renormalised): the reference spectra their layers are initialised from.
    The parameters are drawn on the CPU (seeded with ``cfg.seed``) and then
    moved, so a seed gives the same initial model on every device.

    Parameters
    ----------
    kind : {"nalmu", "almu", "dnmf", "snmf_net"}
    cfg : ExperimentConfig
    train_set : MixtureSet
        Gives m and n (and, for DNMF and SNMF-Net, the mean spectra).

    Returns
    -------
    torch.nn.Module
    """
    from fastmu.training import build_model

    if kind not in LEARNED:
        raise ValueError(f"kind must be one of {LEARNED}, got {kind!r}")
    m, n = train_set.A.shape[1], train_set.A.shape[2]
    common = dict(m=m, n=n, dtype=cfg.torch_dtype)
    torch.manual_seed(cfg.seed)
    if kind == "nalmu":
        model = build_model("nalmu", n_layers=cfg.nalmu_layers, **common)
    elif kind == "almu":
        half = cfg.nalmu_layers // 2
        model = build_model("almu", nalmu_layers=half, almu_layers=cfg.nalmu_layers - half, **common)
    elif kind == "dnmf":
        model = build_model("dnmf", n_layers=cfg.dnmf_layers, A_init=_mean_spectra(train_set.A), **common)
    else:
        model = build_model("snmf_net", n_layers=cfg.snmf_layers, A_init=_mean_spectra(train_set.A), **common)
    return model.to(cfg.device)


def fit_model(kind: str, model: torch.nn.Module, cfg: ExperimentConfig, train_set: Any, **kwargs: Any):
    """Train ``model`` as ``cfg`` says (ALMU: two stages, the MLPs at a tenth of the rate).

    Seeds torch with ``cfg.seed`` first.

    Parameters
    ----------
    kind : {"nalmu", "almu", "dnmf", "snmf_net"}
    model : torch.nn.Module
        As :func:`new_model` makes it; trained in place.
    cfg : ExperimentConfig
        Epochs, batch size, learning rate and seed.
    train_set : MixtureSet
    **kwargs
        Passed to :func:`fastmu.training.train` (``val_set``, ``progress``,
        ``on_epoch``, ``history``, ``snapshot``, ``resume``).

    Returns
    -------
    fastmu.training.History
    """
    from fastmu.training import train, train_almu

    torch.manual_seed(cfg.seed)
    kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, **kwargs)
    if kind == "almu":
        return train_almu(model, train_set, epochs=(cfg.epochs, cfg.epochs), lr=(cfg.lr, cfg.lr / 10), **kw)
    return train(model, train_set, epochs=cfg.epochs, lr=cfg.lr, stage=kind, **kw)


#: the ExperimentConfig field that sets each learned kind's depth
_DEPTH_FIELD = {"nalmu": "nalmu_layers", "almu": "nalmu_layers", "dnmf": "dnmf_layers", "snmf_net": "snmf_layers"}


def _depth(kind: str, config: ExperimentConfig | dict[str, Any]) -> int | list[int]:
    """The depth a configuration (or its results.json dict) gives ``kind``; ALMU's as [NALMU front,
    adaptive layers], split as :func:`new_model` splits it."""
    total = config[_DEPTH_FIELD[kind]] if isinstance(config, dict) else getattr(config, _DEPTH_FIELD[kind])
    return [total // 2, total - total // 2] if kind == "almu" else total


def training_settings(kind: str, cfg: ExperimentConfig, train_set: Any) -> dict[str, Any]:
    """The settings that determine a model of ``kind`` trained as ``cfg`` says on ``train_set``.

    :func:`run_paper` and ``fastmu train`` store them in the checkpoint
    (``trained_with``) and compare them when a checkpoint is reused. The
    training set enters through its shape (the preset's sizes or their
    overrides), seed, SNR and spectra; the device does not enter.

    Parameters
    ----------
    kind : {"nalmu", "almu", "dnmf", "snmf_net"}
    cfg : ExperimentConfig
    train_set : MixtureSet

    Returns
    -------
    dict
        Plain values (JSON-able, and loadable with ``torch.load(weights_only=True)``).
    """
    m, n = (int(v) for v in train_set.A.shape[1:])
    return {"kind": kind, "m": m, "n": n, "layers": _depth(kind, cfg), "epochs": cfg.epochs, "lr": float(cfg.lr),
            "batch_size": cfg.batch_size, "snr_db": float(cfg.snr_db), "seed": cfg.seed, "preset": cfg.preset,
            "train_shape": [int(v) for v in train_set.shape], "train_spectra": cfg.train_spectra,
            "train_maps": list(kinds) if (kinds := getattr(train_set, "map_kinds", None)) else None,
            "dtype": cfg.dtype}


#: settings that fix a model's architecture: a checkpoint that differs in one is another model
_ARCHITECTURE = ("kind", "m", "n", "layers")
#: settings of its training; "preset" too, as it places the noise seeds (a small preset grown to the paper's
#: sizes has the paper's shapes but not its noise)
_TRAINING = ("epochs", "lr", "batch_size", "snr_db", "seed", "preset", "train_shape", "train_spectra", "train_maps",
             "dtype")
_SETTING_NAMES = {"m": "channels m", "n": "components n", "batch_size": "batch size", "snr_db": "SNR (dB)",
                  "train_shape": "training set shape", "train_spectra": "training spectra",
                  "train_maps": "training maps"}
#: settings that checkpoints saved before fastmu recorded them lack; unknown, they are not held against one
_RECORDED_LATER = ("train_maps",)


def _architecture(model: torch.nn.Module) -> dict[str, Any]:
    """A loaded model's kind, m, n and depth, from the model itself (not from what its file claims)."""
    from fastmu.training import model_kind

    kind = model_kind(model)
    layers = ([int(model.nalmu_layers), int(model.almu_layers)] if kind == "almu"
              else int(model.n_layers))
    return {"kind": kind, "m": int(model.m), "n": int(model.n), "layers": layers}


def _differences(keys: Sequence[str], have: dict[str, Any], want: dict[str, Any]) -> str:
    """'layers 50 (this run: 10), SNR (dB) -10.0 (this run: 60.0)' for the keys in which have and want differ."""
    diffs = [f"{_SETTING_NAMES.get(k, k)} {have.get(k, 'unrecorded')} (this run: {want[k]})"
             for k in keys if have.get(k) != want[k]]
    return ", ".join(diffs)


def _checkpoint_path(mdir: Path, kind: str) -> Path | None:
    """``<kind>.pt`` in ``mdir``, else ``fastmu-<kind>.pt`` (``fastmu train``'s default name), else None."""
    for name in (f"{kind}.pt", f"fastmu-{kind}.pt"):
        if (mdir / name).is_file():
            return mdir / name
    return None


@dataclass
class _ModelPlan:
    """What :func:`run_paper` does for one learned kind: load ``model`` or train one (``reason`` says why)."""

    kind: str
    want: dict[str, Any]
    path: Path | None
    model: torch.nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    note: str | None = None


def _plan_model(kind: str, cfg: ExperimentConfig, sets: dict, mdir: Path | None, own_dir: bool) -> _ModelPlan:
    """Decide, before any training, whether ``kind`` is loaded from ``mdir`` or trained.

    ``own_dir`` (run_paper's ``out_dir/models``): a checkpoint is reused only when it records exactly
    this run's settings; otherwise it is trained anew and overwritten. A folder the caller gave: its
    checkpoints are never overwritten; one that cannot be read, or whose kind, m, n or depth differ,
    is refused; one trained with other (or unrecorded) settings is used, and the results say so.
    """
    from fastmu.training import load_model

    want = training_settings(kind, cfg, sets["train"])
    path = _checkpoint_path(mdir, kind) if mdir is not None else None
    if path is None:
        return _ModelPlan(kind, want, mdir / f"{kind}.pt" if mdir is not None else None)
    try:
        # load_model raises ValueError, saying why, for a file that is not a fastmu checkpoint
        model, extra = load_model(path, device=cfg.device, dtype=cfg.torch_dtype)
        arch = _architecture(model)
    except ValueError as exc:
        if own_dir:
            return _ModelPlan(kind, want, mdir / f"{kind}.pt", reason=f"{exc}")
        raise ValueError(f"{exc}; remove it, or give another models folder, to train {LABELS[kind]} anew") from None
    have = extra.get("trained_with")
    have = have if isinstance(have, dict) else None
    unrecorded = [k for k in _RECORDED_LATER if have is not None and k not in have]
    wrong_model = _differences(_ARCHITECTURE, arch, want)
    trained_otherwise = (_differences([k for k in _TRAINING if k not in unrecorded], have, want)
                         if have is not None else None)
    # e.g. the map kinds: whether it was trained on natural-photo crops cannot be told, so the tables say so
    lacks = ("does not record its " + " or ".join(_SETTING_NAMES.get(k, k) for k in unrecorded)
             + " (saved before fastmu recorded them)") if unrecorded else None
    unknown = f"{LABELS[kind]}: loaded from {path}, which {lacks}" if lacks else None
    if own_dir:
        if wrong_model or trained_otherwise or have is None:
            why = ", ".join(d for d in (wrong_model, trained_otherwise) if d) or "it records no training settings"
            return _ModelPlan(kind, want, mdir / f"{kind}.pt", reason=f"{path} differs: {why}")
        return _ModelPlan(kind, want, path, model, extra, note=unknown)
    if wrong_model:
        raise ValueError(f"{path} is not the {LABELS[kind]} this run asks for: {wrong_model}; give matching "
                         "options, or another models folder to train it anew")
    if have is None:
        note = f"{LABELS[kind]}: loaded from {path}, which records no training settings"
    elif trained_otherwise:
        note = f"{LABELS[kind]}: loaded from {path}, trained with other settings: {trained_otherwise}"
        if lacks:
            note += f"; it {lacks}"
    else:
        note = unknown
    return _ModelPlan(kind, want, path, model, extra, note=note)


def _train_or_load(plan: _ModelPlan, cfg: ExperimentConfig, sets: dict, progress: bool,
                   log: Callable[[str], None]) -> tuple[torch.nn.Module, list, float | None]:
    kind = plan.kind
    if plan.model is not None:
        log(f"{plan.note}" if plan.note else f"{LABELS[kind]}: loaded {plan.path}")
        _drop_finished_partial(plan.path, plan.extra.get("trained_with"))
        return plan.model, plan.extra.get("history", []), plan.extra.get("train_seconds")
    if plan.reason:
        log(f"{LABELS[kind]}: {plan.reason}; training it anew")

    def on_epoch(e: Any) -> None:
        # train() names the stage after the kind ("nalmu"); ALMU's are "almu front" and "almu mlps"
        stage = e.stage[len(kind):].strip() if e.stage.startswith(kind) else e.stage
        log(f"{LABELS[kind]} {stage + ' ' if stage else ''}epoch {e.epoch}: loss {e.train_loss:.4f}")

    model, hist, seconds = fit_resumable(kind, cfg, sets["train"], plan.path, log=log, progress=progress,
                                         on_epoch=on_epoch)
    if plan.path is not None:
        save_finished(model, plan.path, hist, seconds, trained_with=plan.want)
        log(f"{LABELS[kind]}: trained in {seconds:.1f} s, saved {plan.path}")
    return model, hist.as_dicts(), seconds


def _drop_finished_partial(path: Path | None, trained_with: Any) -> None:
    """Remove the ``.part`` of a checkpoint that was written (a run stopped between the two writes)."""
    from fastmu.training import load_model

    part = partial_path(path) if path is not None else None
    if part is None or not part.is_file() or not isinstance(trained_with, dict):
        return
    try:
        if load_model(part)[1].get("trained_with") == trained_with:
            part.unlink(missing_ok=True)
    except (ValueError, OSError):
        pass  # not ours to judge: it stays, and a training of these settings would replace it


def partial_path(path: str | Path) -> Path:
    """Where the training of the checkpoint ``path`` keeps its state after every epoch.

    Parameters
    ----------
    path : str or Path
        The finished checkpoint's path.

    Returns
    -------
    Path
        ``<path>.part``, in the same folder.
    """
    path = Path(path)
    return path.with_name(path.name + ".part")


def save_finished(model: torch.nn.Module, path: str | Path, history: Any, seconds: float, **extra: Any) -> Path:
    """Save a model :func:`fit_resumable` trained to ``path``, then remove its ``.part`` file.

    Parameters
    ----------
    model : torch.nn.Module
    path : str or Path
    history : fastmu.training.History
    seconds : float
        Training time, stored as ``train_seconds``.
    **extra
        Stored beside them (:func:`fastmu.training.save_model`), e.g. ``trained_with``.

    Returns
    -------
    Path
    """
    from fastmu.training import save_model

    saved = save_model(model, path, history=history.as_dicts(), train_seconds=seconds, **extra)
    partial_path(path).unlink(missing_ok=True)  # only once the checkpoint is whole
    return saved


def fit_resumable(kind: str, cfg: ExperimentConfig, train_set: Any, path: str | Path | None, *,
                  log: Callable[[str], None] | None = None, **kwargs: Any) -> tuple[torch.nn.Module, Any, float]:
    """Train a new model of ``kind`` as :func:`fit_model` does, keeping ``<path>.part`` after every
    epoch, and go on from that file when an earlier run left it.

    The ``.part`` file is a checkpoint that also holds Adam's state and the
    epochs done; it is used only when it records exactly this training's
    settings (:func:`training_settings`), and then the result is the one the
    uninterrupted run gives. Another one is replaced, and the log says so.
    The caller saves the finished model with :func:`save_finished`, which
    removes the ``.part`` file.

    Parameters
    ----------
    kind, cfg, train_set
        As for :func:`new_model` and :func:`fit_model`.
    path : str or Path or None
        The checkpoint the finished model goes to; None keeps nothing.
    log : callable, optional
        Told when a ``.part`` file is used or replaced.
    **kwargs
        Passed to :func:`fit_model` (``val_set``, ``progress``, ``on_epoch``).

    Returns
    -------
    (model, History, seconds)
        ``seconds``: training time, the interrupted runs' included.
    """
    from fastmu.training import History, ResumeError, save_model

    taken = sorted({"history", "resume", "snapshot"} & set(kwargs))
    if taken:
        raise TypeError(f"fit_resumable sets {', '.join(taken)} itself (from and into the .part file)")
    say = log if log is not None else (lambda _: None)
    want = training_settings(kind, cfg, train_set)
    part = partial_path(path) if path is not None else None
    model, history, before, resume = None, History(), 0.0, None
    if part is not None and part.is_file():
        model, history, before, resume = _read_partial(part, kind, cfg, want, say)
    if model is None:
        model = new_model(kind, cfg, train_set)
    t0 = time.perf_counter()

    def keep(state: dict[str, Any]) -> None:
        save_model(model, part, history=history.as_dicts(), train_seconds=before + time.perf_counter() - t0,
                   trained_with=want, device=str(cfg.device), resume=state)

    try:
        hist = fit_model(kind, model, cfg, train_set, history=history, resume=resume,
                         snapshot=keep if part is not None else None, **kwargs)
    except ResumeError as exc:  # raised before any step: the saved state does not fit this training
        refused = f"{exc}"
    else:
        return model, hist, before + time.perf_counter() - t0
    say(f"{LABELS[kind]}: cannot go on from {part} ({refused}); it will be replaced")
    model, history, before = new_model(kind, cfg, train_set), History(), 0.0  # keep() writes these from now
    t0 = time.perf_counter()
    hist = fit_model(kind, model, cfg, train_set, history=history, snapshot=keep, **kwargs)
    return model, hist, before + time.perf_counter() - t0


def _read_partial(part: Path, kind: str, cfg: ExperimentConfig, want: dict[str, Any],
                  say: Callable[[str], None]) -> tuple[Any, Any, float, dict[str, Any] | None]:
    """(model, history, seconds, resume state) from a ``.part`` file that records ``want``;
    (None, empty history, 0, None), said why, for any other."""
    from fastmu.training import History, load_model

    try:
        model, extra = load_model(part, device=cfg.device, dtype=cfg.torch_dtype)
    except ValueError as exc:
        say(f"{LABELS[kind]}: {exc}; it will be replaced")
        return None, History(), 0.0, None
    have = extra.get("trained_with")
    state = extra.get("resume")
    if not isinstance(have, dict) or have != want:
        differ = _differences(_ARCHITECTURE + _TRAINING, have, want) if isinstance(have, dict) else ""
        say(f"{LABELS[kind]}: {part} was left by a training with other settings"
            + (f" ({differ})" if differ else "") + "; it will be replaced")
        return None, History(), 0.0, None
    try:
        if not (isinstance(state, dict) and isinstance(state.get("stage"), str)
                and isinstance(state.get("epoch"), int) and isinstance(state.get("optimizer"), dict)):
            raise TypeError("no resume state")
        history = History.from_dicts(extra["history"])
        seconds = float(extra.get("train_seconds") or 0.0)
    except (KeyError, TypeError, ValueError):
        say(f"{LABELS[kind]}: {part} holds no training state fastmu can go on from; it will be replaced")
        return None, History(), 0.0, None
    where = extra.get("device")
    moved = f" (its epochs ran on {where}, these run on {cfg.device})" if where and where != str(cfg.device) else ""
    say(f"{LABELS[kind]}: going on from {part}, after {state['stage']} epoch {state['epoch']}{moved}")
    return model, history, seconds, state


def _check_outputs(out: Path | None, models_dir: Path | None, kinds: Sequence[str] = ()) -> None:
    """Refuse unwritable outputs, and a models folder or checkpoint path that is not what it
    must be, before the sets are built (not after the training)."""
    from fastmu.paths import check_output_file, check_output_folder

    if models_dir is not None and models_dir.exists() and not models_dir.is_dir():
        raise ValueError(f"models folder {models_dir} is a file, not a folder")
    if out is not None:
        check_output_folder(out, "output folder")
        for name in ("results.json", "table1.md", "table2.md", "fig2.png"):
            check_output_file(out / name, "output")
    if models_dir is not None:
        if out is not None and models_dir == out / "models":  # fastmu writes there (a given folder may be read-only)
            check_output_folder(models_dir, "models folder")
        for kind in kinds:
            for f in (models_dir / f"{kind}.pt", partial_path(models_dir / f"{kind}.pt")):
                if f.is_dir():
                    raise ValueError(f"checkpoint {f} is a folder, not a file")


@dataclass
class PaperResults:
    """What :func:`run_paper` measured; ``as_dict()`` is what ``results.json`` holds."""

    config: dict[str, Any]
    machine: dict[str, Any]
    sets: dict[str, Any]
    scores: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    #: per learned kind, what was scored: trained or loaded (from where), its depth and the settings
    #: it was trained with (None when a loaded checkpoint does not record them)
    models: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("config", "machine", "sets", "scores", "seconds", "curves",
                                               "training", "models")}


def _machine(device: str) -> dict[str, Any]:
    from fastmu.benchmarks.machine import machine_info

    info = machine_info()
    info["device"] = str(device)
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def make_sets(cfg: ExperimentConfig) -> dict[str, Any]:
    """The paper's three sets for ``cfg`` (:func:`fastmu.data.paper_sets`), described, not materialised.

    Parameters
    ----------
    cfg : ExperimentConfig
        Its preset, seed, SNR, sizes and ``train_spectra`` (``"real"`` reads
        the Chandra matrices from the reference-data folder).

    Returns
    -------
    dict of str to MixtureSet
        ``"train"``, ``"test_simple"``, ``"test_realistic"``.
    """
    from fastmu.data import load_spectra, paper_sets, shared_data_dir

    train_spectra = None
    if cfg.train_spectra == "real":
        d = shared_data_dir()
        f = d / "chandra_mixing_matrices.npz" if d is not None else None
        if f is None or not f.exists():
            raise FileNotFoundError("the real training spectra (train_spectra='real', --train-spectra real) need "
                                    "chandra_mixing_matrices.npz in the reference-data folder: set "
                                    "FASTMU_SHARED_DATA to the folder that holds it")
        train_spectra = load_spectra(f)
    return paper_sets(cfg.preset, seed=cfg.seed, snr_db=cfg.snr_db, train_spectra=train_spectra, size=cfg.size,
                      n_train=cfg.n_train, n_test=cfg.n_test)


def run_paper(config: ExperimentConfig | None = None, out_dir: str | Path | None = None, *,
              models_dir: str | Path | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> PaperResults:
    """Train (or load) every learned model, score every method, write tables and Fig. 2.

    Parameters
    ----------
    config : ExperimentConfig, optional
        Default: ``ExperimentConfig()`` (the small preset, every method).
    out_dir : path, optional
        Writes ``results.json``, ``table1.md``, ``table2.md`` and
        ``fig2.png`` (with matplotlib) there, and the checkpoints under
        ``models/`` unless ``models_dir`` is given. A checkpoint found in
        ``out_dir/models`` is reused only when it records exactly this run's
        training settings (:func:`training_settings`); otherwise the model is
        trained anew and the file overwritten (the log says why).
    models_dir : path, optional
        A folder of checkpoints (``<kind>.pt``, or ``fastmu train``'s
        ``fastmu-<kind>.pt``) to load instead of training; the models not
        found there are trained and saved there. Its checkpoints are never
        overwritten: one that cannot be read, or whose kind, m, n or depth
        differ from this run's, is refused (ValueError, before any
        training); one trained with other settings (epochs, SNR, ...), or
        that records none, is used, and ``results.json`` (``models``), the
        tables and the log say so.
    progress : bool
        Progress bars for training and the baselines, and, unless ``log`` is
        given, the log lines: ``progress=False`` is quiet.
    log : callable, optional
        Receives one line per step. Default: ``print`` when ``progress`` is
        true, else nothing.

    Returns
    -------
    PaperResults
    """
    cfg = config or ExperimentConfig()
    say = log if log is not None else (print if progress else (lambda s: None))
    out = Path(out_dir) if out_dir is not None else None
    own_dir = models_dir is None
    mdir = Path(models_dir) if models_dir is not None else (out / "models" if out is not None else None)
    _check_outputs(out, mdir, [k for k in cfg.methods if k in LEARNED])
    sets = make_sets(cfg)
    res = PaperResults(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        machine=_machine(cfg.device),
        sets={k: {"name": v.name, "shape": list(v.shape)} for k, v in sets.items()},
    )
    say("sets: " + ", ".join(f"{v.name} {v.shape}" for v in sets.values()))

    # every checkpoint is read and checked before the first model is trained
    plans = [_plan_model(kind, cfg, sets, mdir, own_dir) for kind in METHODS if kind in cfg.methods and kind in LEARNED]
    if not own_dir and any(p.model is None for p in plans):
        from fastmu.paths import check_output_folder

        check_output_folder(mdir, "models folder")  # it will receive the models trained here
    models = {}
    for plan in plans:
        kind = plan.kind
        model, hist, secs = _train_or_load(plan, cfg, sets, progress, say)
        models[kind] = model
        res.training[kind] = {"history": hist, "seconds": secs}
        loaded = plan.model is not None
        res.models[kind] = {
            "source": "loaded" if loaded else "trained",
            "path": str(plan.path) if plan.path is not None else None,
            "layers": _architecture(model)["layers"],
            "trained_with": (plan.extra.get("trained_with") if loaded else plan.want),
            "note": plan.note,
        }

    for set_name in SETS:
        data = sets[set_name]
        X, A_true, S_true = _load_set(data, cfg)
        n = A_true.shape[-1]
        res.scores[set_name], res.seconds[set_name], res.curves[set_name] = {}, {}, {}
        for kind in (k for k in METHODS if k in cfg.methods):
            _warm_up(kind, models.get(kind), X, n, cfg.seed)
            if kind in ("mu", "cd"):
                budget = cfg.mu_iters if kind == "mu" else cfg.cd_iters
                solve = _mu if kind == "mu" else _cd
                # timed: the solver's calls only (the chunks between checkpoints), not the scoring
                curve, (A, S), secs = _solver_curve(solve, X, n, budget, A_true, S_true, cfg.seed,
                                                    progress=progress, desc=f"{LABELS[kind]}, {set_name}")
            else:
                model = models[kind]
                with torch.no_grad():
                    t0 = time.perf_counter()
                    outs = [model(Xb, return_all=True)
                            for Xb in torch.split(X, cfg.batch_size)]
                    _synchronize(cfg.device)
                    secs = time.perf_counter() - t0
                curve = _layer_curve(outs, A_true, S_true)
                A = torch.cat([o[-1][0] for o in outs])
                S = torch.cat([o[-1][1] for o in outs])
            res.scores[set_name][kind] = _scores(A, S, A_true, S_true)
            res.seconds[set_name][kind] = secs
            res.curves[set_name][kind] = curve
            s = res.scores[set_name][kind]
            say(f"{SETS[set_name]} {LABELS[kind]}: cos A {np.mean(s['cos_A']):.4f}, "
                f"cos S {np.mean(s['cos_S']):.4f} ({secs:.2f} s)")

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res.as_dict(), indent=1))
        for i, set_name in enumerate(SETS, 1):
            (out / f"table{i}.md").write_text(format_table(res, set_name) + "\n")
        try:
            plot_figure2(res, out / "fig2.png")
        except ImportError:
            say("matplotlib is not installed: fig2.png not drawn (pip install matplotlib, or fastmu's data extra)")
        say(f"wrote {out}/results.json, table1.md, table2.md, fig2.png")
    return res


def format_table(res: PaperResults | dict[str, Any], set_name: str) -> str:
    """A Markdown table of one test set: mean ± std over its problems, and the time.

    Parameters
    ----------
    res : PaperResults or dict
        A run's results, or their ``results.json``.
    set_name : {"test_simple", "test_realistic"}

    Returns
    -------
    str
    """
    d = res.as_dict() if isinstance(res, PaperResults) else res
    if set_name not in d["scores"]:
        raise ValueError(f"no scores for {set_name!r}; have {sorted(d['scores'])}")
    sc, secs = d["scores"][set_name], d["seconds"][set_name]
    cfg = d["config"]
    name = d["sets"][set_name]["name"]
    lines = [f"{SETS.get(set_name, set_name)}: {name}, {d['sets'][set_name]['shape'][0]} problems "
             f"of {d['sets'][set_name]['shape'][1]} × {d['sets'][set_name]['shape'][2]}, "
             f"{cfg['snr_db']:g} dB, on {d['machine'].get('gpu', d['machine'].get('cpu', '?'))} ({cfg['device']})",
             "",
             "| method | cos A ↑ | cos S ↑ | angle A (°) ↓ | angle S (°) ↓ | RMSE A ↓ | time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ms(v: list[float], f: str) -> str:
        return f"{np.mean(v):{f}} ± {np.std(v):{f}}"

    models = d.get("models", {})  # results.json before fastmu recorded the models scored: the config's depths
    for kind in METHODS:
        if kind not in sc:
            continue
        s = sc[kind]
        label = LABELS[kind]
        if kind == "mu":
            label += f" ({cfg['mu_iters']} it.)"
        elif kind == "cd":
            label = f"CD ({cfg['cd_iters']} it.)"
        else:  # the depth of the model scored, which a loaded checkpoint gives
            layers = models.get(kind, {}).get("layers") or _depth(kind, cfg)
            # ALMU: a NALMU front, then adaptive layers (build_model)
            label += f" ({layers[0]} + {layers[1]} layers)" if kind == "almu" else f" ({layers} layers)"
        lines.append(f"| {label} | {ms(s['cos_A'], '.4f')} | {ms(s['cos_S'], '.4f')} | "
                     f"{ms(s['angle_A_deg'], '.2f')} | {ms(s['angle_S_deg'], '.2f')} | "
                     f"{np.mean(s['rmse_A']):.4f} | {secs[kind]:.2f} |")
    notes = [models[k]["note"] for k in METHODS if k in sc and models.get(k, {}).get("note")]
    if notes:  # loaded checkpoints not trained as this run's configuration says
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def plot_figure2(res: PaperResults | dict[str, Any], path: str | Path) -> Path:
    """Fig. 2: mean cosine of A and S along iterations (MU, CD) and layers (learned), both test sets.

    Parameters
    ----------
    res : PaperResults or dict
        A run's results, or their ``results.json``.
    path : str or Path
        The image file (its suffix picks the format).

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = res.as_dict() if isinstance(res, PaperResults) else res
    set_names = [s for s in SETS if s in d["curves"]]
    fig, axes = plt.subplots(len(set_names), 2, figsize=(10, 3.6 * len(set_names)), squeeze=False)
    styles = {"mu": ("k", "-"), "cd": ("0.5", "--"), "dnmf": ("tab:orange", "-"),
              "snmf_net": ("tab:purple", "-"), "nalmu": ("tab:blue", "-"), "almu": ("tab:red", "-")}
    for row, set_name in enumerate(set_names):
        for col, key in enumerate(("cos_A", "cos_S")):
            ax = axes[row][col]
            for kind, c in d["curves"][set_name].items():
                color, ls = styles[kind]
                ax.plot(c["x"], c[key], color=color, ls=ls, marker="." if kind not in ("mu", "cd") else None,
                        ms=3, label=LABELS[kind])
            ax.set_xscale("log")
            ax.set_xlabel("iterations (MU, CD) / layers (learned)")
            ax.set_ylabel(f"mean cosine of {'A (spectra)' if key == 'cos_A' else 'S (maps)'}")
            ax.set_title(f"{SETS[set_name]} set: {d['sets'][set_name]['name']}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            lo = min(min(c[key]) for c in d["curves"][set_name].values())
            ax.set_ylim(max(lo, 0.0) - 0.02, 1.005)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
