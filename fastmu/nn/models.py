"""Learned unrolled MU models: NALMU and ALMU (``torch.nn.Module``).

NALMU
    ``L`` unrolled learned-MU layers, layer ``l`` with its own non-negative
    ``W_l (m, n)`` shared by every problem of a batch.
ALMU
    A NALMU front of ``L1`` layers whose output ``A_NALMU`` feeds one MLP per
    following layer; MLP ``l`` predicts that layer's ``W_l`` for each problem
    (``(b, m, n)``). Trained in two stages: the front first (as a NALMU),
    then frozen (:meth:`ALMU.freeze_front`) while the MLPs train.

Choices (and why)
-----------------
Non-negative W in NALMU: ``W_l = exp(θ_l)`` with ``θ_l = 0`` at init, so an
untrained NALMU is *exactly* MU (``exp(0) == 1`` in every dtype). The
exponential keeps W strictly positive without clipping, and an optimiser step
on θ is a *relative* change of W, which suits a multiplicative update whose W
scales A entry-wise. (Softplus with an inverse-softplus init gives W = 1 only
to rounding, and its gradient vanishes as W → 0.)

Non-negative W in ALMU: ``W = softplus(MLP(z))``; the MLP's last layer starts
with zero weights and bias ``softplus⁻¹(1)``, so an untrained ALMU is MU too
(to rounding: ``softplus(log(e − 1))`` is 1 ± 1 ulp). Softplus, not exp, because
an MLP output is unbounded and exp of it could overflow early in training.

Initial factors: the constant ``c = sqrt(mean(X)/n)`` for every entry of A and
S, per problem — the same start as ``fastmu.mu(..., init="constant")``. Under
MU the product ``A S`` of a layer's output does not depend on the constant (up
to ε), nor do the cosines the loss scores; A and S themselves do (from a start
``c`` the outputs are those of the start 1 with A divided by ``c`` and S
multiplied by it), so ``c`` is part of the differentiated function of X. The
value keeps ``A S`` at the scale of X: ε = 1e-12 is then as small a share of
the denominators as X's scale allows (negligible unless X's mean is below
about 1e-7; see :class:`fastmu.ScaleWarning`). With constant factors every column starts identical;
only the column-specific ``W`` separate them, which is why the learned
models output components in the training order.

Backends: ``fused=True`` runs the layers as one autograd node,
:func:`fastmu.nn.learned_mu_unroll` (fused kernels, handwritten backward;
CPU and CUDA); ``fused=False`` runs the same
model through :func:`fastmu.reference.mu_step_torch` with plain autograd —
the reference the tests and the benchmark compare against, and the fallback
for devices without a fused kernel.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
from torch import nn

from fastmu import EPS
from fastmu.nn.functional import unroll_unchecked
from fastmu.validation import check_eps, check_tensors_nonnegative_finite, positive_count

__all__ = ["NALMU", "ALMU", "WeightMLPs", "check_finite_output", "check_model_dtype", "constant_init", "model_device"]

Factors = tuple[torch.Tensor, torch.Tensor]

#: softplus⁻¹(1) = log(e − 1): the bias that makes an untrained ALMU MLP output W = 1
_INV_SOFTPLUS_1 = math.log(math.e - 1.0)


def constant_init(X: torch.Tensor, n: int) -> Factors:
    """Constant starting factors ``sqrt(mean(X)/n)`` per problem, differentiable in X.

    The models' A and S depend on this constant (only their product does not),
    so gradients with respect to X flow through it.

    Parameters
    ----------
    X : Tensor (b, m, t)
    n : int

    Returns
    -------
    A0 : Tensor (b, m, n)
    S0 : Tensor (b, n, t)
    """
    b, m, t = X.shape
    q = X.mean(dim=(1, 2)) / n
    # A problem with an all-zero X would start at 0 and stay there; start at 1
    # instead (MU then still returns 0 · anything for it). The where comes
    # before the sqrt, so that no infinite sqrt'(0) meets the where's zero
    # gradient there (0 · inf = NaN).
    c = torch.sqrt(torch.where(q > 0, q, torch.ones_like(q)))
    A0 = c.view(b, 1, 1).expand(b, m, n).contiguous()
    S0 = c.view(b, 1, 1).expand(b, n, t).contiguous()
    return A0, S0


def check_model_dtype(dtype: object, who: str, allowed: tuple[torch.dtype, ...] | None = None) -> None:
    """Refuse a parameter ``dtype`` that is not a floating-point ``torch.dtype`` (or not in ``allowed``).

    Without this check an integer dtype fails deep inside torch ("Only Tensors of
    floating point can require gradients").

    Parameters
    ----------
    dtype : torch.dtype or None
        None (torch's default dtype) passes.
    who : str
        The model (or function) named in the message.
    allowed : tuple of torch.dtype, optional
        The dtypes accepted; default every floating-point one.

    Raises
    ------
    TypeError
        Not a torch.dtype, not floating point, or not in ``allowed``.
    """
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{who}: dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    if not dtype.is_floating_point or (allowed is not None and dtype not in allowed):
        raise TypeError(f"{who}: the parameters must be float32 or float64 (torch.float32, torch.float64), "
                        f"got {dtype}")


def model_device(device: object) -> torch.device | None:
    """``device`` as a torch device that exists here (None stays None).

    Parameters
    ----------
    device : str, torch.device or None

    Returns
    -------
    torch.device or None

    Raises
    ------
    ValueError
        Not a device name, or a CUDA device torch does not see
        (:func:`fastmu.interop.torch_device`; torch's own error is an
        ``AssertionError`` from deep inside its CUDA setup).
    """
    if device is None:
        return None
    from fastmu.interop import torch_device

    return torch_device(device)


def _widths(hidden: object) -> tuple[int, ...]:
    """ALMU's hidden widths: an int (one hidden layer) or a sequence of positive ints."""
    if isinstance(hidden, (str, bytes)):  # tuple("12") would be the widths (1, 2)
        raise TypeError(f"hidden must be an int or a sequence of ints, got {hidden!r}")
    if isinstance(hidden, bool):
        raise TypeError(f"hidden must be an int or a sequence of ints, got {hidden!r}")
    try:
        widths: tuple = (operator.index(hidden),)
    except TypeError:  # not one integer: a sequence of them
        try:
            widths = tuple(hidden)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"hidden must be an int or a sequence of ints, got {hidden!r}") from None
    return tuple(positive_count(h, "each hidden width") for h in widths)


def _check_fused_dtype(dtype: torch.dtype, fused: bool, device: torch.device) -> None:
    # other devices run the torch ops whatever fused says (run_layers)
    if fused and device.type in ("cpu", "cuda") and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the fused kernels compute in float32 or float64, got {dtype}; "
                        "convert the model (e.g. model.float()) or build it with fused=False (torch ops)")


def _check_model_input(
    X: object, m: int, ref: torch.Tensor, check_values: bool = True, eps: float | None = None,
) -> tuple[torch.Tensor, bool]:
    """Validate ``X`` for a model of ``m`` channels (and the model's ``eps`` against the dtype it
    computes in); returns the batched X and whether it was 2-D."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.layout != torch.strided:  # sparse layouts have no amin, isfinite or strides
        raise TypeError(f"X is a sparse torch tensor ({X.layout}); the models work on dense tensors: "
                        "pass X.to_dense()")
    squeeze = X.dim() == 2
    if squeeze:
        X = X.unsqueeze(0)
    if X.dim() != 3:
        raise ValueError(f"X must be (m, t) or (b, m, t), got shape {tuple(X.shape)}")
    if X.device.type == "cpu":  # Numba's kernels or torch's OpenMP, in a forked child
        from fastmu import fork_safety

        fork_safety.check_cpu_kernels_usable()
    if X.shape[1] != m:
        raise ValueError(f"X has {X.shape[1]} channels but the model was built for m={m}")
    if not X.is_floating_point():  # convert X, not the model: its parameters must stay floating point
        raise TypeError(f"X has dtype {X.dtype}, but the model computes in {ref.dtype}; convert X "
                        f"(e.g. X.to({ref.dtype}))")
    if X.dtype != ref.dtype:
        raise TypeError(
            f"X has dtype {X.dtype} but the model's parameters are {ref.dtype}; "
            f"convert one of them (e.g. model.to({X.dtype}))"
        )
    if X.device != ref.device:
        raise ValueError(f"X is on {X.device} but the model is on {ref.device}; move one of them")
    if X.shape[0] == 0 or X.shape[2] == 0:
        raise ValueError(f"X must have at least one problem and one pixel, got shape {tuple(X.shape)}")
    if eps is not None:  # the model may have been converted (model.half()) since it was built
        check_eps(eps, X.dtype)
    if check_values:
        check_tensors_nonnegative_finite({"X": X}, hint=" (noisy data? X.clamp_min(0) clips the noise's negatives)")
    return X.contiguous(), squeeze


def check_finite_output(model: nn.Module, X: torch.Tensor, A: torch.Tensor, S: torch.Tensor) -> None:
    """Refuse NaN or infinite returned factors or model parameters, with one read on the host.

    X was checked finite on entry, so non-finite factors come from X's scale
    (the layers' products overflow the dtype) or from the model's parameters
    (NaN ones, or ones so large that the layers overflow). The factors and the
    parameters (and floating-point buffers), not X, are read: ``(b, m, n)`` and
    ``(b, n, t)`` are far smaller than X. Skipped
    while a CUDA graph is being captured, where no value may be read back, and
    on meta tensors.

    Parameters
    ----------
    model : torch.nn.Module
        The model that computed them (named in the message; its parameters
        are read on the error path only).
    X : Tensor
        Its (checked, batched) input.
    A, S : Tensor
        The factors it returns (the last layer's).

    Raises
    ------
    FloatingPointError
        Naming the cause (X's largest value against its dtype's limit, or
        the parameters that are not finite) and the cure.
    """
    if A.is_meta or (A.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    # The parameters too (small next to X): a NaN one does not always reach the output
    # (SNMF-Net's thresholding maps NaN to 0), and the output would then be silently wrong.
    tensors = [A, S, *(t for _, t in _float_state(model))]
    with torch.no_grad():
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one synchronisation
    if not finite:
        raise _non_finite_output_error(model, X)


def _float_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's floating-point parameters and buffers, by name."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [(name, t) for name, t in named if t.is_floating_point() and t.numel()]


def _non_finite_output_error(model: nn.Module, X: torch.Tensor) -> FloatingPointError:
    """The :func:`check_finite_output` error (reads what it needs; only on the error path)."""
    from fastmu.validation import X_SCALE_BLAME

    who, dtype = type(model).__name__, str(X.dtype).replace("torch.", "")
    with torch.no_grad():
        xmax = float(X.max())
        bad = [name for name, p in _float_state(model) if not bool(torch.isfinite(p).all())]
    head = f"{who}'s output is NaN or infinite ({dtype}): "
    if bad:
        head = f"{who}'s output cannot be trusted ({dtype}): "
        return FloatingPointError(
            head + f"its parameter(s) {', '.join(bad)} hold NaN or infinite values (a diverged training, or a "
            "broken checkpoint); retrain or reload them")
    if xmax >= X_SCALE_BLAME * math.sqrt(torch.finfo(X.dtype).max):
        return FloatingPointError(
            head + f"X's largest value, {xmax:.3g}, is too large for {dtype}: the layers' products overflow. "
            "The model is scale-equivariant: divide X by its mean (X / X.mean()) and rescale the factors"
            + (", or use float64." if X.dtype == torch.float32 else "."))
    return FloatingPointError(
        head + f"X's largest value, {xmax:.3g}, is far from {dtype}'s limit, so the model's parameters produced "
        "the non-finite values (finite but so large that the layers overflow, e.g. NALMU's W = exp(θ) or "
        "an ALMU MLP's output after a diverged training); retrain or reload them, or use float64")


def run_layers(
    X: torch.Tensor, A: torch.Tensor, S: torch.Tensor, Ws: torch.Tensor, *, fused: bool, eps: float,
    return_all: bool = False,
) -> Factors | list[Factors]:
    """The layers ``Ws (L, m, n)`` or ``(L, b, m, n)`` from ``(A, S)``, with one backend.

    ``fused``: the stack as one autograd node on the fused kernels
    (:func:`fastmu.nn.functional.unroll_unchecked`; CPU and CUDA), else (or on
    another device) layer by layer through :func:`fastmu.reference.mu_step_torch`
    with plain autograd.
    """
    # a host-side check (no synchronisation): the fused kernels index W by A's shape and
    # would read past a smaller W (a replaced theta, a subclass's weights of another shape)
    want = (X.shape[0], A.shape[1], A.shape[2])
    if Ws.dim() not in (3, 4) or Ws.shape[-2:] != want[1:] or (Ws.dim() == 4 and Ws.shape[1] != want[0]):
        raise ValueError(f"the layer weights have shape {tuple(Ws.shape)}; the model needs (layers, m, n) = "
                         f"(layers, {want[1]}, {want[2]}) or (layers, b, m, n) = (layers, {', '.join(map(str, want))})")
    if fused and X.device.type in ("cpu", "cuda"):
        _check_fused_dtype(X.dtype, fused, X.device)
        return unroll_unchecked(X, A, S, Ws, eps, return_all)
    from fastmu.reference import mu_step_torch

    outs: list[Factors] = []
    # unbind, not W[l]: its backward stacks the layers' gradients in one op, where
    # L selects would each scatter into a zeroed (L, m, n) copy and add them up
    for W in Ws.unbind(0):
        A, S = mu_step_torch(X, A, S, W, eps)
        if return_all:
            outs.append((A, S))
    return outs if return_all else (A, S)


class NALMU(nn.Module):
    """Non-adaptive learned MU: ``n_layers`` unrolled MU iterations with trainable ``W_l``.

    Parameters
    ----------
    n_layers : int, default 50
    m : int, default 65
        Channels (rows of X).
    n : int, default 4
        Components.
    fused : bool, default True
        Fused kernels with the handwritten backward (CPU, CUDA); ``False``
        runs the same model with torch ops and autograd.
    eps : float, optional
        Added to the MU denominators. Default: :data:`fastmu.EPS` (1e-12),
        or the dtype's smallest normal number where that is larger
        (float16: 6.1e-5; 1e-12 is 0 there), following the parameters'
        dtype through ``model.half()`` and the like. A given eps must be at
        least that smallest normal number. The attribute reads the value
        in use.
    dtype, device
        Of the parameters (X must match them): float32 or float64 (with
        ``fused=False`` any floating dtype), and a device torch sees.
    check_input : bool, default True
        Check on every forward that X is finite and non-negative (one pass
        over X and one read on the host) and that the returned factors and
        the parameters are finite (one more read, not of X; on a GPU each read
        is a synchronisation). ``False`` skips both, for inference loops on
        checked data with a trusted model. The attribute of the same name can
        be changed later.

    Attributes
    ----------
    theta : Parameter (n_layers, m, n)
        ``W_l = exp(θ_l)``; zeros at init (untrained NALMU == MU).

    Examples
    --------
    >>> import torch, fastmu
    >>> model = fastmu.NALMU(n_layers=5, m=8, n=3)
    >>> X = torch.rand(2, 8, 64)
    >>> A, S = model(X)
    >>> A.shape, S.shape
    (torch.Size([2, 8, 3]), torch.Size([2, 3, 64]))
    """

    def __init__(
        self,
        n_layers: int = 50,
        m: int = 65,
        n: int = 4,
        *,
        fused: bool = True,
        eps: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        check_input: bool = True,
    ):
        super().__init__()
        n_layers, m, n = positive_count(n_layers, "n_layers"), positive_count(m, "m"), positive_count(n, "n")
        check_model_dtype(dtype, type(self).__name__)
        device = model_device(device)
        self.n_layers, self.m, self.n = n_layers, m, n
        self.fused = bool(fused)
        self._eps = None if eps is None else check_eps(eps)
        self.check_input = bool(check_input)
        self.theta = nn.Parameter(torch.zeros(n_layers, m, n, dtype=dtype, device=device))
        _check_fused_dtype(self.theta.dtype, self.fused, self.theta.device)
        self.eps_for(self.theta.dtype)  # a given eps the dtype cannot hold fails here, not at the first forward

    @property
    def eps(self) -> float:
        """The ε the layers use at the parameters' dtype (see the class's ``eps``)."""
        return self.eps_for(self.theta.dtype)

    def eps_for(self, dtype: torch.dtype) -> float:
        """The ε for layers computing in ``dtype``: the given one (checked against the dtype's
        smallest normal number), or by default :data:`fastmu.EPS` raised to that number."""
        if self._eps is None:
            return max(EPS, float(torch.finfo(dtype).tiny))
        return check_eps(self._eps, dtype)

    def weights(self) -> torch.Tensor:
        """The layer weights ``W = exp(θ)``, shape ``(n_layers, m, n)``, all positive."""
        return torch.exp(self.theta)

    def unroll(
        self, X: torch.Tensor, A: torch.Tensor, S: torch.Tensor, return_all: bool = False
    ) -> Factors | list[Factors]:
        """Run the layers from given factors (X batched, contiguous, validated)."""
        return run_layers(X, A, S, self.weights(), fused=self.fused, eps=self.eps, return_all=return_all)

    def forward(self, X: torch.Tensor, return_all: bool = False) -> Factors | list[Factors]:
        """Unmix ``X``.

        Parameters
        ----------
        X : Tensor (b, m, t) or (m, t)
            Non-negative data, the dtype and device of the model.
        return_all : bool
            Return every layer's ``(A_l, S_l)`` (for the layer-weighted loss)
            instead of only the last.

        Returns
        -------
        (A, S), or a list of ``n_layers`` such pairs; 2-D input gives unbatched factors.

        Raises
        ------
        TypeError, ValueError
            X of the wrong kind, dtype, device or shape, or (``check_input``)
            negative or non-finite.
        FloatingPointError
            (``check_input``) The factors came out NaN or infinite: X too large
            for the dtype, or non-finite or overflowing parameters.
        """
        X, squeeze = _check_model_input(X, self.m, self.theta, self.check_input)
        A0, S0 = constant_init(X, self.n)
        out = self.unroll(X, A0, S0, return_all)
        if self.check_input:
            check_finite_output(self, X, *(out[-1] if return_all else out))
        return _squeeze(out, squeeze)

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, m={self.m}, n={self.n}, fused={self.fused}"


def _squeeze(out: Factors | list[Factors], squeeze: bool) -> Factors | list[Factors]:
    if not squeeze:
        return out
    if isinstance(out, list):
        return [(A[0], S[0]) for A, S in out]
    return out[0][0], out[1][0]


class WeightMLPs(nn.Module):
    """The ALMU layers' MLPs, one per layer, evaluated together.

    MLP ``l``: Linear–ReLU–…–Linear with widths ``in_features, *hidden,
    out_features``, then softplus: that layer's ``W`` per problem. The
    parameters are stacked over the layers, ``weights[i]`` ``(L, in_i,
    out_i)`` (``h @ W``, the transpose of ``nn.Linear.weight``) and
    ``biases[i]`` ``(L, out_i)``, so the ``L`` MLPs run as one batched product
    per linear layer (``torch.baddbmm``): about a dozen torch ops forward for
    all of them, where ``L`` separate MLPs cost ``L`` times as many, each a
    launch on a GPU. Initialised as ``nn.Linear`` initialises (uniform in
    ``±1/sqrt(fan_in)``), except the last layer: zero weights and bias
    ``softplus⁻¹(1)``, so ``W = 1`` for every input (an untrained ALMU is MU).
    """

    def __init__(self, n_layers: int, in_features: int, hidden: Sequence[int], out_features: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden), int(out_features)]
        self.n_layers, self.widths = int(n_layers), tuple(widths)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            w = torch.empty(n_layers, a, b, dtype=dtype, device=device)
            bias = torch.empty(n_layers, b, dtype=dtype, device=device)
            if k == len(widths) - 2:
                nn.init.zeros_(w)
                nn.init.constant_(bias, _INV_SOFTPLUS_1)
            else:
                bound = 1.0 / math.sqrt(a)
                nn.init.uniform_(w, -bound, bound)
                nn.init.uniform_(bias, -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(bias))

    def __len__(self) -> int:
        return self.n_layers

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z (b, in_features)`` → every layer's output ``(L, b, out_features)``."""
        h = z.unsqueeze(0).expand(self.n_layers, -1, -1)
        last = len(self.weights) - 1
        for k, (w, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias.unsqueeze(1), h, w)
            if k < last:
                h = torch.relu(h)
        return nn.functional.softplus(h)

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, widths={self.widths}"


class ALMU(nn.Module):
    """Adaptive learned MU: a NALMU front, then layers whose ``W`` MLPs predict from ``A_NALMU``.

    Parameters
    ----------
    nalmu_layers : int, default 25
        Layers of the NALMU front (``L1``).
    almu_layers : int, default 25
        Adaptive layers (``L2``), each with its own MLP (all of them in
        ``model.mlps``, a :class:`WeightMLPs`).
    m, n : int, default 65, 4
    hidden : int or sequence of int, default (130, 75)
        Hidden widths of every MLP (paper: three linear layers, ReLU, 130 and
        75); an int is one hidden layer of that width.
    in_features : int, optional
        MLP input width; default ``m·n`` (``vec(A_NALMU)``). Set it when
        subclassing :meth:`features` to feed something else.
    normalize_input : bool, default True
        Feed ``A_NALMU`` with unit-norm columns, so the MLPs see the shape of
        the spectra, not the data's intensity scale (which MU spreads
        arbitrarily between A and S). ``False`` feeds ``vec(A_NALMU)`` as is.
    fused, eps, dtype, device, check_input
        As in :class:`NALMU`.

    Notes
    -----
    Stage 1: train ``model.front`` (a :class:`NALMU`) alone. Stage 2:
    ``model.freeze_front()`` and train the MLPs on ``model(X)`` — the frozen
    front then runs without building a graph (unless X requires grad).
    The MLPs' first layers are initialised from torch's global random
    generator: call ``torch.manual_seed`` before building the model for a
    reproducible initialisation. ``return_all`` returns the
    ``L1 + L2`` layers' factors; the stage-2 loss usually weighs
    ``outs[model.nalmu_layers:]``.
    """

    def __init__(
        self,
        nalmu_layers: int = 25,
        almu_layers: int = 25,
        m: int = 65,
        n: int = 4,
        *,
        hidden: Sequence[int] = (130, 75),
        in_features: int | None = None,
        normalize_input: bool = True,
        fused: bool = True,
        eps: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        check_input: bool = True,
    ):
        super().__init__()
        almu_layers = positive_count(almu_layers, "almu_layers")
        hidden = _widths(hidden)
        check_model_dtype(dtype, type(self).__name__)
        device = model_device(device)
        self.check_input = bool(check_input)
        self.front = NALMU(nalmu_layers, m, n, fused=fused, eps=eps, dtype=dtype, device=device)
        nalmu_layers, m, n = self.front.n_layers, self.front.m, self.front.n
        self.nalmu_layers, self.almu_layers, self.m, self.n = nalmu_layers, almu_layers, m, n
        self.normalize_input = bool(normalize_input)
        self.in_features = m * n if in_features is None else positive_count(in_features, "in_features")
        if self.in_features != m * n and type(self).features is ALMU.features:
            raise ValueError(f"in_features={self.in_features}, but features() feeds the MLPs vec(A), m·n = {m * n} "
                             "values; set in_features only when a subclass overrides features()")
        self.hidden = hidden
        self.mlps = WeightMLPs(almu_layers, self.in_features, hidden, m * n, dtype, device)

    @property
    def fused(self) -> bool:
        return self.front.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.front.fused = bool(value)

    def freeze_front(self, frozen: bool = True) -> "ALMU":
        """Freeze (or unfreeze) the NALMU front for the second training stage."""
        self.front.requires_grad_(not frozen)
        return self

    def features(self, A: torch.Tensor) -> torch.Tensor:
        """MLP input from ``A_NALMU (b, m, n)``: ``vec(A)``, columns unit-norm if ``normalize_input``."""
        if self.normalize_input:
            A = A / A.norm(dim=1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
        return A.reshape(A.shape[0], -1)

    def predict_weights(self, A_nalmu: torch.Tensor) -> torch.Tensor:
        """Every adaptive layer's ``W`` for each problem: ``(almu_layers, b, m, n)``."""
        z = self.features(A_nalmu)
        if z.dim() != 2 or z.shape[1] != self.in_features:
            raise ValueError(f"the MLPs take (b, {self.in_features}) features, but features() gave shape "
                             f"{tuple(z.shape)}")
        return self.mlps(z).view(self.almu_layers, A_nalmu.shape[0], self.m, self.n)

    def forward(self, X: torch.Tensor, return_all: bool = False) -> Factors | list[Factors]:
        """Unmix ``X`` (see :meth:`NALMU.forward`); ``return_all`` gives all ``L1 + L2`` layers."""
        X, squeeze = _check_model_input(X, self.m, self.front.theta, self.check_input)
        A, S = constant_init(X, self.n)
        # A frozen front needs no graph, unless a gradient w.r.t. X must pass through it
        # (X is the only other input of the front: the start A, S is a function of X)
        frozen = not any(p.requires_grad for p in self.front.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and (not frozen or X.requires_grad)):
            front = self.front.unroll(X, A, S, return_all)
        outs: list[Factors] = list(front) if return_all else []
        A, S = front[-1] if return_all else front
        Ws = self.predict_weights(A)
        adaptive = run_layers(X, A, S, Ws, fused=self.fused, eps=self.front.eps, return_all=return_all)
        if return_all:
            outs += adaptive
        else:
            A, S = adaptive
        if self.check_input:
            check_finite_output(self, X, *(outs[-1] if return_all else (A, S)))
        return _squeeze(outs if return_all else (A, S), squeeze)

    def extra_repr(self) -> str:
        return (
            f"nalmu_layers={self.nalmu_layers}, almu_layers={self.almu_layers}, m={self.m}, n={self.n}, "
            f"hidden={self.hidden}, normalize_input={self.normalize_input}"
        )
