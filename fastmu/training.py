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
The batch order derives from the ``seed`` argument of :func:`train` and the
noise from the set's stored per-sample seeds. Model initialisation is
deterministic except ALMU's MLPs, drawn from torch's global random generator
when the model is built: call ``torch.manual_seed`` before
:func:`build_model` too, and a run is reproducible on the same machine and
backend.

This module imports torch.
"""
from __future__ import annotations

import copy
import io
import math
import numbers
import operator
import os
import pickle
import re
import secrets
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fastmu.interop import torch_device
from fastmu.losses import mean_component_cosine, unrolled_loss
from fastmu.validation import positive_count

__all__ = [
    "MODEL_KINDS",
    "EpochLog",
    "History",
    "ResumeError",
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
    return {k: _portable_value(v, arg=True) for k, v in kwargs.items() if k not in ("dtype", "device")}


def _portable_value(v: Any, arg: bool = False) -> Any:
    """``v`` with NumPy scalars as Python scalars and numeric arrays as CPU tensors, in lists,
    tuples and dicts too. When ``arg`` (a constructor argument): 0-d tensors become Python
    scalars (``m=torch.tensor(6)``), integer and boolean arrays nested lists (so that integer
    arguments stay integers) and floating ones float64 tensors (``A_init``). What a
    weights-only load cannot read is left as it is, for :func:`_check_loadable` to name."""
    if isinstance(v, np.generic):  # np.float64 is a float subclass, but pickles as a NumPy object
        return v.item()
    if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
        v = torch.from_numpy(np.ascontiguousarray(v))
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if not arg:
            return v.clone()
        if v.dim() == 0:
            return v.item()
        return v.to(torch.float64).clone() if v.is_floating_point() else v.tolist()
    if isinstance(v, (list, tuple)):
        items = [_portable_value(x, arg) for x in v]
        return items if arg or isinstance(v, list) else tuple(items)
    if isinstance(v, dict):
        return {k: _portable_value(x, arg) for k, x in v.items()}
    return v


def _check_loadable(payload: dict[str, Any], what: str) -> None:
    """Refuse, naming the key, a value that ``torch.load(weights_only=True)`` could not read back.

    Tried on the small part of a checkpoint (build arguments, extra), never the weights.
    """
    for key, value in payload.items():
        buf = io.BytesIO()
        try:
            torch.save(value, buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)
        except Exception as exc:  # pickling errors vary: PicklingError, AttributeError, TypeError, ...
            raise ValueError(
                f"{what} {key!r} holds a value of type {type(value).__name__}, which a checkpoint cannot store "
                f"(checkpoints load with torch.load(weights_only=True)): keep to numbers, strings, None, "
                f"tensors, NumPy numbers and numeric arrays, and lists, tuples and dicts of them "
                f"({type(exc).__name__})") from None


def _summary(exc: BaseException) -> str:
    """Why ``torch.load`` failed, in a few words: its own text where that is short and about the file
    (a truncated archive), not its advice on ``weights_only=False``."""
    if isinstance(exc, pickle.UnpicklingError):
        # the bytes are no pickle at all (JSON, an image): an opcode no pickle starts with
        if re.search(r"invalid load key|Unsupported operand", str(exc)):
            return "its bytes are neither a torch archive nor a pickle"
        return "it holds Python objects beyond tensors and plain values, as a pickled model does"
    if isinstance(exc, (KeyError, EOFError)):
        return "not a torch file, or an empty one"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = (text.splitlines()[0] if text else "").split(". ")[0]  # the first sentence: the rest is advice
    return f"{type(exc).__name__}: {first[:160]}"


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write ``model`` (made by :func:`build_model`) to ``path`` with its build arguments.

    ``extra`` (plain values: numbers, strings, lists, dicts) is stored beside
    it, e.g. the training history. NumPy numbers are stored as Python
    numbers and numeric NumPy arrays as tensors.

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

    Raises
    ------
    ValueError
        The model was not made by :func:`build_model`, or a value of ``extra``
        (or of the build arguments) is something :func:`load_model` could not
        read back (named in the message); nothing is written then.
    """
    kind = model_kind(model)
    kwargs = _portable(model._fastmu_build[1])  # type: ignore[attr-defined]
    extra = {k: _portable_value(v) for k, v in extra.items()}
    # checked before writing: a checkpoint that cannot be loaded is found out only at load time
    _check_loadable(kwargs, "the build argument")
    _check_loadable(extra, "extra")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; give the checkpoint a file name (e.g. model.pt)")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # written beside it, then renamed over it: a Ctrl-C or a full disk mid-write leaves the old file whole
    # (opened as a new file with mode 0666, so the umask applies as for any file, not mkstemp's 0600)
    dest = path.resolve() if path.is_symlink() else path  # a link's file is replaced, not the link
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if dest.exists():  # a file replaced keeps its permissions (a private 0600 checkpoint stays private)
            os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": "fastmu-model-1", "kind": kind, "kwargs": kwargs,
                        "state_dict": state, "extra": extra}, f)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not a fastmu model checkpoint (not a torch file, truncated,
        not a checkpoint dict, or one whose parts do not fit its model kind),
        or ``device`` is not a device torch sees.
    TypeError
        ``dtype`` is not float32 or float64.
    """
    from fastmu.nn.models import check_model_dtype

    path = Path(path)
    device = torch_device(device)  # the caller's arguments first: their errors are not the file's
    check_model_dtype(dtype, "load_model", allowed=(torch.float32, torch.float64))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    ckpt = _read_checkpoint(path)
    state = ckpt["state_dict"]
    if dtype is None:
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        dtype = floats[0] if floats else torch.get_default_dtype()
    try:
        model = build_model(ckpt["kind"], **ckpt["kwargs"], dtype=dtype, device=device)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v
                               for k, v in state.items()})
    except (TypeError, ValueError, RuntimeError) as exc:  # wrong arguments or weights for its kind
        raise ValueError(f"{path} is not a fastmu model checkpoint (its build arguments or weights do not fit "
                         f"a {ckpt['kind']!r} model: {' '.join(str(exc).split())})") from exc
    return model, ckpt["extra"]


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict in ``path``, its parts' types checked, or a ValueError saying why not."""
    def refuse(why: str) -> ValueError:
        return ValueError(f"{path} is not a fastmu model checkpoint ({why})")

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # a directory, no permission: the file system's own errors are clearer
        raise
    except Exception as exc:  # text: KeyError; empty: EOFError; truncated: RuntimeError; pickled module: Unpickling
        raise refuse(f"torch.load could not read it: {_summary(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "fastmu-model-1":
        raise refuse("no 'format': 'fastmu-model-1' entry")
    if ckpt.get("kind") not in MODEL_KINDS:
        raise refuse(f"model kind {ckpt.get('kind')!r} is not one of {MODEL_KINDS}")
    state, kwargs = ckpt.get("state_dict"), ckpt.get("kwargs")
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise refuse("no 'state_dict' of tensors")
    if not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
        raise refuse("no 'kwargs' dict of build arguments")
    ckpt.setdefault("extra", {})
    if not (isinstance(ckpt["extra"], dict) and all(isinstance(k, str) for k in ckpt["extra"])):
        raise refuse("its 'extra' entry is not a dict of named values")  # save_model writes one
    return ckpt


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

    @classmethod
    def from_dicts(cls, epochs: list[dict[str, Any]]) -> "History":
        """The history :meth:`as_dicts` wrote (e.g. a checkpoint's ``history``)."""
        return cls([EpochLog(**e) for e in epochs])

    @property
    def best_val(self) -> float | None:
        vals = [e.val_cos_A + e.val_cos_S for e in self.epochs if e.val_cos_A is not None]
        return max(vals) if vals else None


def _check_set(data: Any, name: str, model: nn.Module) -> None:
    """``data`` looks like a non-empty MixtureSet with the model's number of channels."""
    if not hasattr(data, "batches") or not hasattr(data, "batch") or not hasattr(data, "__len__"):
        raise TypeError(f"{name} must be a fastmu.data.MixtureSet, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    label = {"train_set": "the training set", "val_set": "the validation set"}.get(name, name)
    m, n = getattr(model, "m", None), getattr(model, "n", None)
    if m is not None and data.A.shape[1] != m:
        raise ValueError(f"the model expects m = {m} channels but {label} has {data.A.shape[1]}")
    if n is not None and data.A.shape[2] != n:
        raise ValueError(f"the model has n = {n} components but {label} has {data.A.shape[2]}")


def _n_layers(model: nn.Module) -> int | None:
    """How many layers' outputs ``model(X, return_all=True)`` lists, where the model says."""
    if hasattr(model, "nalmu_layers") and hasattr(model, "almu_layers"):
        return int(model.nalmu_layers) + int(model.almu_layers)
    n = getattr(model, "n_layers", None)
    return int(n) if isinstance(n, int) else None


def _check_train_args(model: nn.Module, train_set: Any, epochs: Any, batch_size: Any, lr: Any, *,
                      val_set: Any = None, loss_layers: Any = slice(None), seed: Any = 0,
                      on_epoch: Any = None) -> tuple[int, int, int]:
    """Check :func:`train`'s arguments before any work (a bad ``val_set`` or ``on_epoch`` would
    otherwise fail only after a whole epoch); returns ``epochs, batch_size, seed`` as ints."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(train_set, "batch") or not hasattr(train_set, "__len__"):
        raise TypeError(f"train_set must be a fastmu.data.MixtureSet, got {type(train_set).__name__}")
    epochs, batch_size = positive_count(epochs, "epochs"), positive_count(batch_size, "batch_size")
    if not (isinstance(lr, numbers.Real) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    _check_set(train_set, "train_set", model)
    if val_set is not None:
        _check_set(val_set, "val_set", model)
    if not isinstance(loss_layers, slice):
        raise TypeError(f"loss_layers must be a slice of the layers, e.g. slice(10, None), got {loss_layers!r}")
    L = _n_layers(model)
    if L is not None and not range(L)[loss_layers]:
        raise ValueError(f"loss_layers={loss_layers!r} selects none of the model's {L} layers")
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch must be callable (it is called with each EpochLog), got {type(on_epoch).__name__}")
    try:
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer (epoch e's batch order is drawn from seed + e), "
                        f"got {seed!r}") from None
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return epochs, batch_size, seed


def _check_eval_args(model: Any, data: Any, batch_size: Any) -> int:
    """:func:`predict`'s and :func:`validate`'s checks (before any work); the batch size as an int."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_set(data, "data", model)
    return positive_count(batch_size, "batch_size")


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
    batch_size = _check_eval_args(model, data, batch_size)
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
    batch_size = _check_eval_args(model, data, batch_size)
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
    snapshot: Callable[[dict[str, Any]], Any] | None = None,
    resume: dict[str, Any] | None = None,
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
        Passes over the set and problems per step (paper: mini-batches of 25);
        Python or NumPy integers.
    lr : float
        Adam's learning rate.
    val_set : MixtureSet, optional
        Scored after every epoch (mean cosines, training order).
    loss_layers : slice
        Which layers' outputs the loss weighs (``slice(L1, None)`` for
        ALMU's second stage); their weights are ``v_l = (l−1)/(L−1)`` over
        the selected layers.
    seed : int
        Batch order of epoch e is drawn from ``seed + e`` (a non-negative
        integer; None is refused). The model's initialisation is not drawn
        from it (see the module docstring).
    progress : bool
        A tqdm bar over the steps of each epoch.
    stage : str
        Label stored in the history.
    history : History, optional
        Appended to (for multi-stage training).
    on_epoch : callable, optional
        Called with each :class:`EpochLog`.
    snapshot : callable, optional
        Called after each epoch (before ``on_epoch``) with the state to resume
        from: ``{"stage", "epoch", "optimizer"}`` (epochs done in this stage,
        Adam's state dict). Save it beside the model's weights and the history
        (:func:`save_model` stores it) to go on after an interruption.
    resume : dict, optional
        Such a state, with ``model`` holding the weights saved with it and
        ``history`` the epochs before it: training goes on at the next epoch,
        with Adam's moments restored (a copy: ``resume`` is left as it is) at
        this call's ``lr``, and ends where the uninterrupted run would (the
        batch order of epoch e depends on ``seed + e`` only).

    Returns
    -------
    History

    Raises
    ------
    TypeError, ValueError
        Bad arguments, found before the first step. A ``resume`` state of
        another stage, of more epochs than ``epochs``, or whose optimizer state
        does not fit the model's trainable parameters raises
        :class:`ResumeError` (a ValueError).
    FloatingPointError
        When the loss becomes NaN or infinite: the step is not applied, so the
        model keeps its last finite parameters. Also when the model's output
        scores NaN after an epoch (on ``val_set``) or after the last step
        (on one training batch, without ``val_set``): the parameters are then
        those of the step that broke it. The fastmu models raise it
        themselves where their output is not finite: before the first step
        that error is passed on as is (X's scale, or the model as given),
        after it is reported as the training's.
    """
    epochs, batch_size, seed = _check_train_args(model, train_set, epochs, batch_size, lr, val_set=val_set,
                                                 loss_layers=loss_layers, seed=seed, on_epoch=on_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    if snapshot is not None and not callable(snapshot):
        raise TypeError(f"snapshot must be callable (it is called with the state to resume from), "
                        f"got {type(snapshot).__name__}")
    start = _check_resume(resume, stage, epochs)
    p0 = params[0]
    opt = torch.optim.Adam(params, lr=float(lr))
    if resume is not None:
        _load_optimizer(opt, resume["optimizer"], params, stage)
        for group in opt.param_groups:  # this call's rate, not the saved one (the same in a plain resume)
            group["lr"] = float(lr)
    history = History() if history is None else history
    steps = math.ceil(len(train_set) / batch_size)
    done = start * steps  # optimiser steps applied

    def broke(exc: FloatingPointError, where: str) -> FloatingPointError:
        """The model's own non-finite-output error, as the training's once a step has changed it."""
        if done == 0:
            return exc
        return FloatingPointError(f"{stage}: {where} the model's output became NaN or infinite; lower the learning "
                                  f"rate (lr={lr}) or use float64. The model said: {exc}")

    model.train()
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        total, count = 0.0, 0
        bar = _bar(steps, f"{stage} {epoch + 1}/{epochs}", progress)
        for X, A, S in train_set.batches(batch_size, shuffle=True, seed=seed + epoch,
                                          device=p0.device, dtype=p0.dtype):
            try:
                outs = model(X.clamp_min_(0), return_all=True)[loss_layers]
            except FloatingPointError as exc:
                raise broke(exc, f"in epoch {epoch + 1}") from exc
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
            done += 1
            total += value * X.shape[0]
            count += X.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.4f}")
        if bar is not None:
            bar.close()
        vA = vS = None
        if val_set is not None:
            try:
                vA, vS = validate(model, val_set, batch_size=batch_size)
            except FloatingPointError as exc:
                raise broke(exc, f"after epoch {epoch + 1}, on the validation set,") from exc
            if not (math.isfinite(vA) and math.isfinite(vS)):
                raise FloatingPointError(
                    f"{stage}: after epoch {epoch + 1} the model's output scores cos A {vA}, cos S {vS} on the "
                    f"validation set; lower the learning rate (lr={lr}) or use float64")
        log = EpochLog(stage, epoch + 1, total / count, vA, vS, time.perf_counter() - t0)
        history.epochs.append(log)
        if snapshot is not None:  # first: an interruption in on_epoch must not lose the epoch
            # a copy: state_dict() shares Adam's moment tensors, which the next step updates in place
            snapshot({"stage": stage, "epoch": epoch + 1, "optimizer": copy.deepcopy(opt.state_dict())})
        if on_epoch is not None:
            on_epoch(log)
    if val_set is None:
        # A step that breaks the model shows in the next step's loss; the last
        # step has none, so score one batch with the final parameters.
        with torch.no_grad():
            X, A, S = train_set.batch(np.arange(min(batch_size, len(train_set))), device=p0.device, dtype=p0.dtype)
            try:
                value = float(unrolled_loss(model(X.clamp_min_(0), return_all=True)[loss_layers], A, S))
            except FloatingPointError as exc:
                raise broke(exc, "the last step left a model whose loss cannot be computed:") from exc
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{stage}: the last step left a model whose loss is {value}; lower the learning rate "
                f"(lr={lr}) or use float64")
    return history


class ResumeError(ValueError):
    """A ``resume`` state that this training cannot go on from (another stage, more epochs, an optimizer
    state of other parameters); raised before any step, so the model is as it was given."""


def _check_resume(resume: Any, stage: str, epochs: int) -> int:
    """The epoch a ``resume`` state of :func:`train` goes on from (0 without one), or a clear error."""
    if resume is None:
        return 0
    if not (isinstance(resume, dict) and {"stage", "epoch", "optimizer"} <= set(resume)):
        raise TypeError("resume must be the dict given to snapshot ({'stage', 'epoch', 'optimizer'}), "
                        f"got {type(resume).__name__}")
    if resume["stage"] != stage:
        raise ResumeError(f"resume holds stage {resume['stage']!r}, but this training is stage {stage!r}")
    done = resume["epoch"]
    if isinstance(done, bool) or not isinstance(done, numbers.Integral) or not 0 <= done <= epochs:
        raise ResumeError(f"resume is after epoch {done!r}, but this training has {epochs} epochs")
    return int(done)


def _load_optimizer(opt: torch.optim.Optimizer, state: Any, params: list[torch.Tensor], stage: str) -> None:
    """Restore Adam's state, refusing one saved for other parameters (torch checks only their number)."""
    try:
        groups = state["param_groups"]
        saved = state["state"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(params):
            raise ValueError("it holds another number of parameters")
        for i, p in zip(groups[0]["params"], params):
            moments = saved.get(i, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in moments and tuple(moments[name].shape) != tuple(p.shape):
                    raise ValueError(f"a moment of shape {tuple(moments[name].shape)} for a parameter of "
                                     f"shape {tuple(p.shape)}")
        # a copy: load_state_dict keeps the caller's tensors where dtype and device match, and the
        # steps would then move them on (a second resume from the same state would start later)
        opt.load_state_dict(copy.deepcopy(state))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ResumeError(f"{stage}: resume's optimizer state does not fit the model's trainable parameters "
                         f"({exc})") from None


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
        A pair each (a single number is refused: the stages usually want
        different values). Epochs are integers.
    **kwargs
        Passed to :func:`train` (``batch_size``, ``val_set``, ``seed``, ``progress``, ``on_epoch``,
        ``history``, ``snapshot``); not ``loss_layers`` or ``stage``, which each stage sets.
        ``resume`` goes to the stage it was saved in (a stage-2 state skips stage 1).

    Returns
    -------
    History
        Stage 1's epochs (labelled ``"almu front"``; validated on the front
        alone) then stage 2's (``"almu mlps"``).
    """
    if not hasattr(model, "front") or not hasattr(model, "freeze_front"):
        raise TypeError(f"train_almu needs a fastmu.ALMU, got {type(model).__name__}")
    e1, e2 = _pair(epochs, "epochs", "(10, 10)")
    lr1, lr2 = _pair(lr, "lr", "(1e-2, 1e-3)")
    fixed = sorted({"loss_layers", "stage"} & set(kwargs))
    if fixed:
        raise TypeError(f"train_almu sets {' and '.join(fixed)} itself (stage 2 scores the layers from "
                        f"model.nalmu_layers on); call train() for other choices")
    history = kwargs.pop("history", None) or History()
    resume = kwargs.pop("resume", None)
    # both stages' arguments are checked before stage 1 runs (train checks the rest)
    _check_train_args(model, train_set, e2, kwargs.get("batch_size", 25), lr2,
                      **{k: kwargs[k] for k in ("val_set", "seed", "on_epoch") if k in kwargs})
    if resume is not None:
        stage = resume.get("stage") if isinstance(resume, dict) else None
        if stage not in ("almu front", "almu mlps"):
            raise ResumeError(f"resume must hold ALMU's stage 'almu front' or 'almu mlps', got {stage!r}")
        _check_resume(resume, stage, e1 if stage == "almu front" else e2)
    in_front = resume is None or resume["stage"] == "almu front"
    if in_front:
        model.freeze_front(False)
        train(model.front, train_set, epochs=e1, lr=lr1, stage="almu front", history=history, resume=resume,
              **kwargs)
    model.freeze_front(True)
    train(model, train_set, epochs=e2, lr=lr2, stage="almu mlps", loss_layers=slice(model.nalmu_layers, None),
          history=history, resume=None if in_front else resume, **kwargs)
    return history


def _pair(v: Any, name: str, example: str) -> tuple[Any, Any]:
    """``train_almu``'s per-stage argument: a pair (checked by :func:`train`), or a clear TypeError."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
        raise TypeError(f"{name} must be a pair (stage 1, stage 2), e.g. {name}={example}, got {v!r}")
    return v[0], v[1]


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # None: off a terminal
