"""Training the unrolled models with the paper's loss.

:func:`train` fits any model with fastmu's interface (``model(X,
return_all=True)`` → every layer's ``(A_l, S_l)``, components in training
order) on a :class:`fastmu.data.MixtureSet` with Adam and the layer-weighted
cosine loss of :func:`fastmu.losses.unrolled_loss` (paper eq. 3).
:func:`train_almu` runs ALMU's two stages: the NALMU front alone, then the
MLPs with the front frozen. :func:`build_model`, :func:`save_model` and
:func:`load_model` give every model kind one checkpoint format.

Mixtures are made batch by batch on the training device
(:meth:`fastmu.data.MixtureSet.batch`), never materialised as a whole set.
The Gaussian noise leaves a few entries of X slightly negative (at 60 dB,
about −1e-3 of X's maximum); the models assume X ≥ 0 (MU's ratios, DNMF's
checks), so every batch is clipped at 0 before it reaches a model, here and
in :mod:`fastmu.experiments`.
Every random choice (batch order, parameter init, noise) derives from the
``seed`` argument, so a run is reproducible on the same machine and backend.

This module imports torch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fastmu.losses import mean_component_cosine, unrolled_loss

__all__ = [
    "MODEL_KINDS",
    "EpochLog",
    "History",
    "build_model",
    "load_model",
    "model_kind",
    "predict",
    "save_model",
    "torch_device",
    "train",
    "train_almu",
    "validate",
]

#: model kinds a checkpoint can hold, and the class each builds
MODEL_KINDS = ("nalmu", "almu", "dnmf", "snmf_net")


def torch_device(spec: str | torch.device) -> torch.device:
    """A torch device that exists here, or a clear error.

    Parameters
    ----------
    spec : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        Not a device name, or a CUDA device that torch does not see (torch's own
        error there is an ``AssertionError`` from deep inside its CUDA setup).
    """
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {spec!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def _model_class(kind: str) -> type[nn.Module]:
    if kind == "nalmu":
        from fastmu.nn.models import NALMU

        return NALMU
    if kind == "almu":
        from fastmu.nn.models import ALMU

        return ALMU
    if kind == "dnmf":
        from fastmu.baselines.dnmf import DNMF

        return DNMF
    if kind == "snmf_net":
        from fastmu.baselines.snmf_net import SNMFNet

        return SNMFNet
    raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")


def build_model(kind: str, **kwargs: Any) -> nn.Module:
    """Build a model of ``kind`` and remember how, so :func:`save_model` can rebuild it.

    Parameters
    ----------
    kind : {"nalmu", "almu", "dnmf", "snmf_net"}
    **kwargs
        The class's constructor arguments (arrays such as ``A_init`` may be
        NumPy arrays or tensors).

    Returns
    -------
    torch.nn.Module
    """
    model = _model_class(kind)(**kwargs)
    model._fastmu_build = (kind, _portable(kwargs))  # type: ignore[attr-defined]
    return model


def model_kind(model: nn.Module) -> str:
    """The kind of a model made by :func:`build_model` or :func:`load_model`.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    str
        ``"nalmu"``, ``"almu"``, ``"dnmf"`` or ``"snmf_net"``.

    Raises
    ------
    ValueError
        The model was built some other way.
    """
    build = getattr(model, "_fastmu_build", None)
    if build is None:
        raise ValueError("this model was not made by fastmu.training.build_model; build it with build_model(kind, ...)")
    return build[0]


def _portable(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Checkpoints load with torch.load(weights_only=True): keep only plain
    # Python values and tensors in them, and leave dtype/device to load time.
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k in ("dtype", "device"):
            continue
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
        elif isinstance(v, torch.Tensor):
            v = v.detach().to("cpu", torch.float64).clone()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write ``model`` (made by :func:`build_model`) to ``path`` with its build arguments.

    ``extra`` (plain values: numbers, strings, lists, dicts) is stored beside
    it, e.g. the training history.

    Parameters
    ----------
    model : torch.nn.Module
        Made by :func:`build_model` (or loaded by :func:`load_model`).
    path : str or Path
        Parent folders are created.
    **extra
        Plain values stored beside the weights.

    Returns
    -------
    Path
    """
    kind = model_kind(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": "fastmu-model-1", "kind": kind, "kwargs": model._fastmu_build[1],  # type: ignore[attr-defined]
                "state_dict": state, "extra": extra}, path)
    return path


def load_model(path: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by :func:`save_model`.

    Parameters
    ----------
    path : str or Path
    device, dtype
        Where and in which precision to put the parameters (default: the
        dtype they were saved in).

    Returns
    -------
    (model, extra)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "fastmu-model-1":
        raise ValueError(f"{path} is not a fastmu model checkpoint")
    state = ckpt["state_dict"]
    if dtype is None:
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        dtype = floats[0] if floats else torch.get_default_dtype()
    model = build_model(ckpt["kind"], **ckpt["kwargs"], dtype=dtype, device=device)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v
                           for k, v in state.items()})
    return model, ckpt.get("extra", {})


def _model_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


@dataclass
class EpochLog:
    """One epoch: mean training loss, validation scores (training order), seconds.

    Attributes
    ----------
    stage : str
        The ``stage`` given to :func:`train` (``"train"`` by default; ``"almu front"``
        and ``"almu mlps"`` for ALMU's two stages).
    epoch : int
        From 1, counted within the stage.
    train_loss : float
        Mean of the batches' losses.
    val_cos_A, val_cos_S : float or None
        Mean cosines on the validation set, in training order; None without one.
    seconds : float
        Wall time of the epoch, validation included.
    """

    stage: str
    epoch: int
    train_loss: float
    val_cos_A: float | None
    val_cos_S: float | None
    seconds: float


@dataclass
class History:
    """Every epoch of a training run.

    Attributes
    ----------
    epochs : list of EpochLog
    """

    epochs: list[EpochLog] = field(default_factory=list)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.epochs]

    @property
    def best_val(self) -> float | None:
        vals = [e.val_cos_A + e.val_cos_S for e in self.epochs if e.val_cos_A is not None]
        return max(vals) if vals else None


def _check_train_args(model: nn.Module, train_set: Any, epochs: int, batch_size: int, lr: float) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(train_set, "batch") or not hasattr(train_set, "__len__"):
        raise TypeError(f"train_set must be a fastmu.data.MixtureSet, got {type(train_set).__name__}")
    if len(train_set) == 0:
        raise ValueError("train_set is empty")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    m = getattr(model, "m", None)
    if m is not None and train_set.A.shape[1] != m:
        raise ValueError(f"the model expects m = {m} channels but the training set has {train_set.A.shape[1]}")


@torch.no_grad()
def predict(model: nn.Module, data: Any, *, batch_size: int = 25, return_all: bool = False,
            ) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """Run ``model`` over a whole :class:`~fastmu.data.MixtureSet`.

    Negative entries of X (noise) are clipped to 0 first, as in training.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode, on its parameters' device and dtype.
    data : MixtureSet
    batch_size : int, default 25
    return_all : bool, default False
        Keep every layer's factors, not only the last layer's.

    Returns
    -------
    (outputs, A_true, S_true)
        ``outputs``: per batch, the model's output (``(A, S)`` or the list of
        every layer's); the truths as NumPy arrays ``(N, m, n)``, ``(N, n, t)``.
    """
    p = _model_param(model)
    was_training = model.training
    model.eval()
    outs, As, Ss = [], [], []
    try:
        for X, A, S in data.batches(batch_size, device=p.device, dtype=p.dtype):
            outs.append(model(X.clamp_min_(0), return_all=return_all))
            As.append(A.cpu().numpy())
            Ss.append(S.cpu().numpy())
    finally:
        model.train(was_training)
    return outs, np.concatenate(As), np.concatenate(Ss)


@torch.no_grad()
def validate(model: nn.Module, data: Any, *, batch_size: int = 25) -> tuple[float, float]:
    """Mean cosine of A's columns and S's rows with the truth, in training order (no matching).

    Parameters
    ----------
    model : torch.nn.Module
    data : MixtureSet
    batch_size : int, default 25

    Returns
    -------
    cos_A, cos_S : float
        Means over the set's problems.
    """
    p = _model_param(model)
    cA = cS = 0.0
    was_training = model.training
    model.eval()
    try:
        for X, A, S in data.batches(batch_size, device=p.device, dtype=p.dtype):
            Ae, Se = model(X.clamp_min_(0))
            cA += float(mean_component_cosine(Ae, A, dim=-2).sum())
            cS += float(mean_component_cosine(Se, S, dim=-1).sum())
    finally:
        model.train(was_training)
    return cA / len(data), cS / len(data)


def train(
    model: nn.Module,
    train_set: Any,
    *,
    epochs: int = 10,
    batch_size: int = 25,
    lr: float = 1e-2,
    val_set: Any = None,
    loss_layers: slice = slice(None),
    seed: int = 0,
    progress: bool = True,
    stage: str = "train",
    history: History | None = None,
    on_epoch: Callable[[EpochLog], Any] | None = None,
) -> History:
    """Train ``model`` with Adam and the paper's layer-weighted loss.

    Parameters
    ----------
    model : torch.nn.Module
        ``model(X, return_all=True)`` returns every layer's ``(A_l, S_l)``
        in training order (NALMU, ALMU, DNMF, SNMF-Net). Only parameters
        with ``requires_grad`` are optimised (a frozen ALMU front stays).
        Batches are made on the device and in the dtype of its parameters.
    train_set : fastmu.data.MixtureSet
        Mixtures with their truth; reshuffled every epoch.
    epochs, batch_size : int
        Passes over the set and problems per step (paper: mini-batches of 25).
    lr : float
        Adam's learning rate.
    val_set : MixtureSet, optional
        Scored after every epoch (mean cosines, training order).
    loss_layers : slice
        Which layers' outputs the loss weighs (``slice(L1, None)`` for
        ALMU's second stage); their weights are ``v_l = (l−1)/(L−1)`` over
        the selected layers.
    seed : int
        Batch order of epoch e is drawn from ``seed + e``.
    progress : bool
        A tqdm bar over the steps of each epoch.
    stage : str
        Label stored in the history.
    history : History, optional
        Appended to (for multi-stage training).
    on_epoch : callable, optional
        Called with each :class:`EpochLog`.

    Returns
    -------
    History

    Raises
    ------
    FloatingPointError
        When the loss becomes NaN or infinite: the step is not applied, so the
        model keeps its last finite parameters. Also when the model's output
        scores NaN after an epoch (on ``val_set``) or after the last step
        (on one training batch, without ``val_set``): the parameters are then
        those of the step that broke it.
    """
    _check_train_args(model, train_set, epochs, batch_size, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    p0 = params[0]
    opt = torch.optim.Adam(params, lr=lr)
    history = History() if history is None else history
    steps = math.ceil(len(train_set) / batch_size)
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total, count = 0.0, 0
        bar = _bar(steps, f"{stage} {epoch + 1}/{epochs}", progress)
        for X, A, S in train_set.batches(batch_size, shuffle=True, seed=seed + epoch,
                                          device=p0.device, dtype=p0.dtype):
            outs = model(X.clamp_min_(0), return_all=True)[loss_layers]
            loss = unrolled_loss(outs, A, S)  # MixtureSet batches give S as (b, n, t)
            # one read of the loss per step, before the backward is queued: a second
            # read after opt.step() would make the host wait for the whole step on a GPU
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{stage}: the loss became {value} in epoch {epoch + 1}; lower the learning rate "
                    f"(lr={lr}) or use float64")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += value * X.shape[0]
            count += X.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.4f}")
        if bar is not None:
            bar.close()
        vA = vS = None
        if val_set is not None:
            vA, vS = validate(model, val_set, batch_size=batch_size)
            if not (math.isfinite(vA) and math.isfinite(vS)):
                raise FloatingPointError(
                    f"{stage}: after epoch {epoch + 1} the model's output scores cos A {vA}, cos S {vS} on the "
                    f"validation set; lower the learning rate (lr={lr}) or use float64")
        log = EpochLog(stage, epoch + 1, total / count, vA, vS, time.perf_counter() - t0)
        history.epochs.append(log)
        if on_epoch is not None:
            on_epoch(log)
    if val_set is None:
        # A step that breaks the model shows in the next step's loss; the last
        # step has none, so score one batch with the final parameters.
        with torch.no_grad():
            X, A, S = train_set.batch(np.arange(min(batch_size, len(train_set))), device=p0.device, dtype=p0.dtype)
            value = float(unrolled_loss(model(X.clamp_min_(0), return_all=True)[loss_layers], A, S))
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{stage}: the last step left a model whose loss is {value}; lower the learning rate "
                f"(lr={lr}) or use float64")
    return history


def train_almu(
    model: nn.Module,
    train_set: Any,
    *,
    epochs: tuple[int, int] = (10, 10),
    lr: tuple[float, float] = (1e-2, 1e-3),
    **kwargs: Any,
) -> History:
    """ALMU's two stages: its NALMU front alone, then the MLPs with the front frozen.

    Parameters
    ----------
    model : fastmu.ALMU
    train_set : MixtureSet
    epochs, lr : (stage 1, stage 2)
    **kwargs
        Passed to :func:`train` (``batch_size``, ``val_set``, ``seed``, ``progress``, ``on_epoch``).

    Returns
    -------
    History
        Stage 1's epochs (labelled ``"almu front"``; validated on the front
        alone) then stage 2's (``"almu mlps"``).
    """
    if not hasattr(model, "front") or not hasattr(model, "freeze_front"):
        raise TypeError(f"train_almu needs a fastmu.ALMU, got {type(model).__name__}")
    history = kwargs.pop("history", None) or History()
    model.freeze_front(False)
    train(model.front, train_set, epochs=int(epochs[0]), lr=float(lr[0]), stage="almu front",
          history=history, **kwargs)
    model.freeze_front(True)
    train(model, train_set, epochs=int(epochs[1]), lr=float(lr[1]), stage="almu mlps",
          loss_layers=slice(model.nalmu_layers, None), history=history, **kwargs)
    return history


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
