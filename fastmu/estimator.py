"""``fastmu.NMF``: a scikit-learn-style estimator over :func:`fastmu.mu` and
:func:`fastmu.baselines.cd`.

A drop-in for ``sklearn.decomposition.NMF(solver="mu")`` and
``NMF(solver="cd")`` with the Frobenius loss: ``X ≈ W H`` for ``X`` of shape
(n_samples, n_features), ``W`` (the transform) of shape (n_samples,
n_components) and ``H`` (``components_``) of shape (n_components,
n_features). Multiplicative updates run on fastmu's fused kernels,
coordinate descent on its fused CPU kernels for host arrays (on torch for GPU
arrays); NumPy, torch (CPU or CUDA) and CuPy arrays go in
and the same kind comes out (``components_`` too), without copies on the GPU.

With scikit-learn installed the class is a real scikit-learn estimator
(``BaseEstimator``, ``TransformerMixin``): ``clone``, pipelines, grid search,
feature names and ``check_estimator`` work. Without it the same API runs on a
small stand-in for ``get_params``/``set_params``.
"""
from __future__ import annotations

import inspect
import math
import numbers
import re
import warnings
from typing import Any

import numpy as np

from fastmu import EPS, fork_safety
from fastmu.interop import ArrayKind, array_kind, is_device_array
from fastmu.penalty import Penalty, from_sklearn
from fastmu.solver import SVD_INITS
from fastmu.validation import (
    _module,
    as_numpy_input,
    caller_stacklevel,
    check_dtype,
    check_eps,
    raise_if_not_finite,
)

try:  # a real scikit-learn estimator where scikit-learn is installed
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
    from sklearn.exceptions import ConvergenceWarning, NotFittedError
    from sklearn.utils.validation import check_is_fitted, validate_data

    _SKLEARN = True
except ImportError as _sk_error:  # pragma: no cover - exercised in a scikit-learn-free environment
    _SKLEARN = False
    try:  # installed, but too old for the API used above (validate_data: 1.6), or broken
        import sklearn as _sk
    except ImportError:
        pass
    else:
        _v = tuple(int(p) for p in re.findall(r"\d+", _sk.__version__)[:2])
        warnings.warn(
            (f"scikit-learn {_sk.__version__} is older than the 1.6 that fastmu.NMF needs to be a "
             "scikit-learn estimator" if _v < (1, 6) else
             f"scikit-learn {_sk.__version__} is installed but fastmu.NMF could not import from it "
             f"({_sk_error})") + "; fastmu.NMF works without it but is not a BaseEstimator",
            RuntimeWarning, stacklevel=2)

    class ConvergenceWarning(UserWarning):  # type: ignore[no-redef]
        """The solver stopped at ``max_iter`` before meeting ``tol``."""

    class NotFittedError(ValueError, AttributeError):  # type: ignore[no-redef]
        """The estimator is used before ``fit``."""

    class BaseEstimator:  # type: ignore[no-redef]
        """``get_params``/``set_params`` from the ``__init__`` signature, as scikit-learn's."""

        @classmethod
        def _get_param_names(cls) -> list[str]:
            sig = inspect.signature(cls.__init__)
            return sorted(p.name for p in sig.parameters.values() if p.name != "self")

        def get_params(self, deep: bool = True) -> dict[str, Any]:
            return {name: getattr(self, name) for name in self._get_param_names()}

        def set_params(self, **params: Any) -> "BaseEstimator":
            valid = self._get_param_names()
            for name, value in params.items():
                if name not in valid:
                    raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; valid: {valid}")
                setattr(self, name, value)
            return self

        def __repr__(self) -> str:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
            return f"{type(self).__name__}({args})"

    class TransformerMixin:  # type: ignore[no-redef]
        pass

    class ClassNamePrefixFeaturesOutMixin:  # type: ignore[no-redef]
        def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
            check_is_fitted(self)
            prefix = type(self).__name__.lower()
            return np.asarray([f"{prefix}{i}" for i in range(self._n_features_out)], dtype=object)

    def check_is_fitted(estimator: Any, attributes: Any = None) -> None:  # type: ignore[no-redef]
        if not hasattr(estimator, "components_"):
            raise NotFittedError(f"This {type(estimator).__name__} instance is not fitted yet; call 'fit' first.")


_INITS = (None, "random", "nndsvd", "nndsvda", "nndsvdar", "constant", "custom")
_SOLVERS = ("mu", "cd")


class NMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Non-negative matrix factorisation, scikit-learn style (Frobenius loss).

    ``X ≈ W H``: ``fit_transform`` returns ``W``, ``components_`` holds ``H``.
    One iteration updates W, then H with the new W (scikit-learn's order).
    ``solver="mu"``: multiplicative updates on fastmu's fused kernels
    (:func:`fastmu.mu` with ``A = W``, ``S = H``). ``solver="cd"``:
    scikit-learn's coordinate descent (:func:`fastmu.baselines.cd`: a fused
    Numba kernel for CPU arrays, torch operations on X's device otherwise),
    with scikit-learn's stopping rule and iterates.

    Parameters
    ----------
    n_components : int, "auto" or None, default None
        Rank. None: ``n_features``. "auto": taken from ``W``/``H`` with
        ``init="custom"``, else ``n_features``.
    init : {None, "random", "nndsvd", "nndsvda", "nndsvdar", "constant", "custom"}, default None
        Start. None: ``"nndsvda"`` when ``n_components <= min(n_samples,
        n_features)``, else ``"random"`` (scikit-learn's rule). ``"random"``
        draws scikit-learn's start (the same numbers for the same integer
        seed); ``"custom"`` takes ``W`` and ``H`` passed to ``fit``. The
        NNDSVD starts are scikit-learn's from an exact SVD (scikit-learn's
        is randomized, so they agree to its accuracy), and need
        ``n_components <= min(n_samples, n_features)``. ``"nndsvd"`` keeps
        NNDSVD's zeros, which ``solver="mu"`` never updates (a
        ``UserWarning``, as scikit-learn's); ``"nndsvdar"`` fills them with
        small random values, the same as scikit-learn's for an integer
        seed (a ``RandomState`` instance gives other, equally valid,
        values: scikit-learn's randomized SVD draws from it first).
        ``"constant"`` (fastmu's) fills W and H with
        ``sqrt(mean(X) / n_components)``.
    solver : {"mu", "cd"}, default "mu"
        ``"mu"``: multiplicative updates. ``"cd"``: cyclic coordinate descent
        (scikit-learn's update); each iteration sweeps the components of W,
        then those of H.
    beta_loss : {"frobenius", 2}, default "frobenius"
        Accepted for drop-in use; only the Frobenius loss is implemented.
    tol : float, default 1e-4
        ``solver="mu"``: stop when ``(previous − current) / initial``
        residual norm, checked every 10 iterations, falls below ``tol`` (0:
        run ``max_iter``). ``solver="cd"``: stop after the first iteration
        whose summed |projected gradient| over the coordinates it updated,
        divided by the first iteration's, is ``<= tol`` (or once the first
        iteration's is 0); with ``tol=0`` it runs ``max_iter`` unless that
        sum reaches exactly 0 (scikit-learn's rule, both).
    max_iter : int, default 200
    random_state : int, RandomState or None
        Seed of the random start, and with ``shuffle=True`` of the order of
        the components (scikit-learn's use of it, both).
    alpha_W, alpha_H, l1_ratio : default 0.0, "same", 0.0
        scikit-learn's regularisation, with both solvers: the objective gains
        ``alpha_W·n_features·(l1_ratio‖W‖₁ + ½(1 − l1_ratio)‖W‖²_F)`` and the
        same for H with ``alpha_H`` (``"same"``: ``alpha_W``) and
        ``n_samples``. The fused kernels take these penalties at no cost per
        pixel (:func:`fastmu.mu`'s ``l1_A`` … ``l2_S``). ``tol`` measures the
        data term alone, and ``reconstruction_err_`` is ``‖X − W H‖``, as in
        scikit-learn.
    verbose : int, default 0
        Above 0: a progress bar over the iterations.
    shuffle : bool, default False
        ``solver="cd"`` only: visit the components in a random order, a new
        permutation for every sweep, drawn as scikit-learn draws them (from
        ``random_state``: the same orders for the same integer seed). With a
        ``RandomState`` instance and an NNDSVD start this is refused:
        scikit-learn's randomized SVD draws from the instance before the
        permutations, fastmu's exact SVD does not, so the orders would differ.
    backend : {"auto", "cpu", "cuda", "torch"}, default "auto"
        Where multiplicative updates run (see :func:`fastmu.mu`): host arrays
        on the CPU kernels, GPU arrays on the CUDA kernels. ``solver="cd"``
        runs where X is: its fit and ``transform`` on the fused CPU kernels
        for host arrays, in torch on X's device otherwise; it takes
        ``"auto"``, or the backend naming where X is
        (``"cpu"``, ``"cuda"``), and refuses others rather than ignore them.
    eps : float, default :data:`fastmu.EPS`
        Added to every denominator of the multiplicative updates (unused by
        ``solver="cd"``, which has none).

    Attributes
    ----------
    components_ : array (n_components, n_features)
        H, in the kind of array ``fit`` was given.
    n_components_ : int
    reconstruction_err_ : float
        ``‖X − W H‖`` (Frobenius) at the end of ``fit``.
    n_iter_ : int
        Iterations run by ``fit``.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` had string column names (a DataFrame).

    Examples
    --------
    >>> import numpy as np
    >>> from fastmu import NMF
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((500, 3)) @ rng.random((3, 40))
    >>> model = NMF(n_components=3, init="random", random_state=0, max_iter=500)
    >>> W = model.fit_transform(X)
    >>> W.shape, model.components_.shape
    ((500, 3), (3, 40))
    >>> bool(model.reconstruction_err_ / np.linalg.norm(X) < 0.05)
    True
    >>> cd = NMF(n_components=3, solver="cd", init="random", random_state=0).fit(X)
    >>> bool(cd.reconstruction_err_ / np.linalg.norm(X) < 0.05)
    True
    """

    def __init__(
        self,
        n_components: int | str | None = None,
        *,
        init: str | None = None,
        solver: str = "mu",
        beta_loss: str | int = "frobenius",
        tol: float = 1e-4,
        max_iter: int = 200,
        random_state: Any = None,
        alpha_W: float = 0.0,
        alpha_H: float | str = "same",
        l1_ratio: float = 0.0,
        verbose: int = 0,
        shuffle: bool = False,
        backend: str = "auto",
        eps: float = EPS,
    ) -> None:
        self.n_components = n_components
        self.init = init
        self.solver = solver
        self.beta_loss = beta_loss
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.verbose = verbose
        self.shuffle = shuffle
        self.backend = backend
        self.eps = eps

    # -- scikit-learn protocol -------------------------------------------------
    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    @property
    def _n_features_out(self) -> int:
        return int(self.components_.shape[0])

    # -- fitting ---------------------------------------------------------------
    def fit(self, X: Any, y: Any = None, **params: Any) -> "NMF":
        """Learn ``components_`` from X (n_samples, n_features); returns self.

        ``W`` and ``H`` may be passed with ``init="custom"``.
        """
        self.fit_transform(X, **params)
        return self

    def fit_transform(self, X: Any, y: Any = None, W: Any = None, H: Any = None) -> Any:
        """Learn the factorisation of X and return W (n_samples, n_components).

        Parameters
        ----------
        X : array (n_samples, n_features)
            Non-negative; NumPy (or anything NumPy converts, e.g. a DataFrame),
            torch or CuPy.
        y : ignored
        W, H : arrays, optional
            The start, with ``init="custom"`` (both required then).
        """
        from fastmu.solver import solve

        self._check_params()
        X = self._validate_X(X, reset=True)
        n_samples, n_features = X.shape
        pen = self._penalty(n_samples, n_features)
        n = self._rank(n_features, W, H)
        init = self.init
        if init is None:
            init = "nndsvda" if n <= min(n_samples, n_features) else "random"
        elif init in SVD_INITS and n > min(n_samples, n_features):  # scikit-learn refuses it too
            raise ValueError(f"init={init!r} can only be used when n_components <= min(n_samples, "
                             f"n_features) = {min(n_samples, n_features)}, got n_components={n}")
        if init == "nndsvd" and self.solver == "mu":
            warnings.warn("The multiplicative update ('mu') solver cannot update zeros present in the "
                          "initialization, and so leads to poorer results when used jointly with init='nndsvd'. "
                          "You may try init='nndsvda' or init='nndsvdar' instead.", UserWarning,
                          stacklevel=caller_stacklevel())
        if init == "custom":
            if W is None or H is None:
                raise ValueError("init='custom' needs both W and H passed to fit / fit_transform")
            (A0, S0), init = _check_start(W, H, X, n), "random"
        else:
            if W is not None or H is not None:
                raise ValueError(f"W and H are used only with init='custom', not init={self.init!r}")
            A0 = S0 = None
        tol = float(self.tol)
        max_iter = int(self.max_iter)
        run = dict(tol=tol if tol > 0 else None, eps=self.eps, backend=self.backend,
                   progress=bool(self.verbose), tol_on_norm=True)
        stop: dict[str, bool] = {}
        if self.solver == "cd":  # on X as given, either orientation: no transposed run needed
            _check_cd_backend(self.backend, X)
            A, S, n_iter = self._fit_cd(X, n, A0, S0, init, max_iter, tol, pen)
        elif n_samples <= n_features or _backend_of(self.backend, X) == "cpu":
            # the CPU engine itself runs a tall X on Xᵀ, with scikit-learn's checks (fastmu.transposed)
            A, S, n_iter = solve(X, None if A0 is not None else n, A0=A0, S0=S0, n_iter=max_iter, init=init,
                                 random_state=self._start_state(), penalty=pen, **run)
        else:
            # a tol stop at the transposed run's last check is a stop, not max_iter reached
            # (scikit-learn's iteration count for it is one less: _fit_tall)
            A, S, n_iter = self._fit_tall(X, n, A0, S0, init, max_iter, dict(run, stop_info=stop), pen)
        if tol > 0 and n_iter == self.max_iter and not stop.get("tol"):
            warnings.warn(f"Maximum number of iterations {self.max_iter} reached. Increase it to improve "
                          "convergence.", ConvergenceWarning, stacklevel=caller_stacklevel())
        self.components_ = S
        self.n_components_ = int(S.shape[0])
        self.n_iter_ = int(n_iter)
        self.reconstruction_err_ = _frobenius(X, A, S)
        return A

    def _fit_cd(self, X: Any, n: int, W0: Any, H0: Any, init: str, max_iter: int,
                tol: float, pen: Penalty) -> tuple[Any, Any, int]:
        """fit for ``solver="cd"``: scikit-learn's ``_fit_coordinate_descent`` from fastmu's start.

        ``tol`` goes to the solver even when 0, as scikit-learn applies its
        rule then too (a sweep with no violation at all stops the run).
        """
        from fastmu.baselines.coordinate_descent import _solve

        order = None
        if self.shuffle:
            if isinstance(self.random_state, np.random.RandomState) and init in SVD_INITS and W0 is None:
                raise ValueError("shuffle=True with a RandomState instance and an NNDSVD start cannot follow "
                                 "scikit-learn: its randomized SVD draws from the instance before the component "
                                 "orders (fastmu's exact SVD does not); pass an integer random_state or another "
                                 "init")
            # _solve draws the start before the first order: scikit-learn's order of draws
            # from a shared RandomState
            order = _check_random_state(self.random_state)
        return _solve(X, None if W0 is not None else n, A0=W0, S0=H0, n_iter=max_iter, tol=tol,
                      init=init, random_state=self._start_state(), progress=bool(self.verbose), order=order,
                      penalty=pen)

    def _fit_tall(self, X: Any, n: int, W0: Any, H0: Any, init: str, max_iter: int,
                  run: dict[str, Any], pen: Penalty) -> tuple[Any, Any, int]:
        """fit for ``n_samples > n_features`` off the CPU engine, on ``Xᵀ`` (features × samples).

        fastmu's kernels stream over the second axis of X (pixels): a tall X
        in scikit-learn's orientation (pixels as samples) has few columns to
        stream over. (The CPU engine does the same itself, with the checks
        where scikit-learn has them: :mod:`fastmu.transposed`; this path
        serves the GPU and torch engines.) On ``Xᵀ ≈ Hᵀ Wᵀ`` fastmu updates Hᵀ first, so the
        scikit-learn sequence ``W₁, H₁, W₂, …, W_k, H_k`` is kept by updating
        W once before (from scikit-learn's start) and H once after: the
        iterates are scikit-learn's. Only the ``tol`` checks fall half an
        iteration later (at ``(W_{i+1}, H_i)`` rather than ``(W_i, H_i)``).
        The penalty on W becomes the penalty on ``Sᵀ`` there, and H's on ``Aᵀ``.
        """
        from fastmu.interop import numpy_to_kind
        from fastmu.solver import _host, _per_problem_means, initial_factors, solve

        eps = check_eps(self.eps, _np_dtype(X))
        drawn = init if W0 is None else None  # named in an overflow error
        if W0 is None:  # scikit-learn's start for X itself, as the direct path draws it
            kind = array_kind(X)
            # only the NNDSVD starts need X on the host (its SVD); the others need its mean
            A_h, S_h = initial_factors(_per_problem_means(X[None], kind), X.shape[0], X.shape[1], n, init,
                                       self._start_state(), X=_host(X[None], kind) if init in SVD_INITS else None)
            W0 = numpy_to_kind(np.ascontiguousarray(A_h[0], dtype=_np_dtype(X)), array_kind(X), X)
            H0 = numpy_to_kind(np.ascontiguousarray(S_h[0], dtype=_np_dtype(X)), array_kind(X), X)
        else:
            W0, H0 = _cast_like(W0, X), _cast_like(H0, X)
        # an X too large for its dtype overflows these steps as it does the solver's: the same
        # FloatingPointError, not NumPy's warnings and then a NaN start for the solver to refuse
        with np.errstate(over="ignore", invalid="ignore"):
            if run["tol"] is not None:  # scikit-learn's scale: the residual at its start
                run = dict(run, tol_initial=_frobenius(X, W0, H0))
            den = _penalised(W0 @ (H0 @ H0.T) + eps, W0, pen.l1_A, pen.l2_A)
            W = W0 * ((X @ H0.T) / den)  # W₁
        # an overflowed denominator leaves W finite (zeros, from x / inf): checked itself
        _raise_if_overflowed(X, den, H0, drawn)
        _raise_if_overflowed(X, W, H0, drawn)
        Ht, Wt, done = solve(_transposed(X), A0=_transposed(H0), S0=_transposed(W), n_iter=max_iter - 1,
                             penalty=pen.transposed(), **run)
        W, H = _transposed(Wt), _transposed(Ht)
        with np.errstate(over="ignore", invalid="ignore"):
            H = H * ((W.T @ X) / _penalised((W.T @ W) @ H + eps, H, pen.l1_S, pen.l2_S))  # H_k
        _raise_if_overflowed(X, W, H)
        return W, H, done + 1

    def _start_state(self) -> Any:
        """What the starts draw from: ``random_state``, with None as scikit-learn reads it (NumPy's
        global RandomState, so that ``np.random.seed`` makes a fit reproducible)."""
        return np.random.mtrand._rand if self.random_state is None else self.random_state

    def transform(self, X: Any) -> Any:
        """W for new data with ``components_`` fixed, with the same ``tol`` and ``max_iter``:
        as scikit-learn, ``solver="mu"`` runs multiplicative updates of W alone from a
        constant start; ``solver="cd"`` runs coordinate descent on W alone from zeros, with
        its stopping rule on W's sweeps only (and its ConvergenceWarning at ``max_iter``)."""
        check_is_fitted(self)
        self._check_params()  # set_params may have changed them since fit
        X = self._validate_X(X, reset=False)
        H = self.components_
        if array_kind(X) != array_kind(H):
            raise TypeError(f"X is a {array_kind(X)} array but the model was fitted on {array_kind(H)} "
                            "arrays; pass the same kind")
        X = _cast_like(X, H)
        pen = self._penalty(*X.shape)  # scikit-learn's: from the new X's shape (W's weights need n_features)
        if self.solver == "cd":
            return self._transform_cd(X, H, pen)
        W, n_iter = _solve_w(X, H, int(self.max_iter), float(self.tol), float(self.eps), pen)
        if self.tol > 0 and n_iter == self.max_iter:  # as scikit-learn's transform
            warnings.warn(f"Maximum number of iterations {self.max_iter} reached. Increase it to improve "
                          "convergence.", ConvergenceWarning, stacklevel=caller_stacklevel())
        return W

    def _transform_cd(self, X: Any, H: Any, pen: Penalty) -> Any:
        import torch

        from fastmu.baselines.coordinate_descent import _iterate
        from fastmu.dispatch import TorchEngine

        self._check_shuffle()
        kind = array_kind(X)
        max_iter, tol = int(self.max_iter), float(self.tol)
        with torch.no_grad():
            Xt = TorchEngine.adopt(X, None)[None]
            Ht = TorchEngine.adopt(H, Xt)[None]
            Wt = torch.zeros((1, Ht.shape[1], Xt.shape[1]), dtype=Xt.dtype, device=Xt.device)
            order = _check_random_state(self.random_state) if self.shuffle else None
            n_iter = _iterate(Xt, Wt, Ht, max_iter, tol, update_S=False, order=order, penalty=pen)
            W = TorchEngine.release(Wt[0].mT.contiguous(), kind, X)
        if tol > 0 and n_iter == max_iter:
            warnings.warn(f"Maximum number of iterations {max_iter} reached. Increase it to improve "
                          "convergence.", ConvergenceWarning, stacklevel=caller_stacklevel())
        return W

    def inverse_transform(self, X: Any) -> Any:
        """``X @ components_``: data from a transform (n_samples, n_components), of the kind of
        array the model was fitted on."""
        check_is_fitted(self)
        kind, fitted = array_kind(X), array_kind(self.components_)
        if kind != fitted:
            raise TypeError(f"X is a {kind} array but the model was fitted on {fitted} arrays; pass the same kind")
        if kind == "numpy":
            W = as_numpy_input(X, "X")
        else:
            check_dtype(X, "X", kind)
            W = X
        if W.ndim != 2 or W.shape[1] != self.n_components_:
            raise ValueError(f"expected an array of shape (n_samples, {self.n_components_}), got {tuple(W.shape)}")
        return _cast_like(W, self.components_) @ self.components_

    # -- checks ----------------------------------------------------------------
    def _penalty(self, n_samples: int, n_features: int) -> Penalty:
        """scikit-learn's alpha_W, alpha_H, l1_ratio, checked, as the :class:`~fastmu.penalty.Penalty`
        on ``A = W``, ``S = H`` of an X of this shape (scikit-learn's ``_compute_regularization``)."""
        def real(value: Any, name: str, high: float = math.inf, also: str = "") -> float:
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= high
                    or not math.isfinite(value)):
                bound = "a finite number >= 0" if high == math.inf else f"a number in [0, {high:g}]"
                raise ValueError(f"{name} must be {bound}{also}, got {value!r}")
            return float(value)

        alpha_W = real(self.alpha_W, "alpha_W")
        same = isinstance(self.alpha_H, str) and self.alpha_H == "same"
        alpha_H = alpha_W if same else real(self.alpha_H, "alpha_H", also=" or 'same'")
        l1_ratio = real(self.l1_ratio, "l1_ratio", 1.0)
        return from_sklearn(alpha_W, alpha_H, l1_ratio, n_samples, n_features)

    def _check_params(self) -> None:
        if not isinstance(self.solver, str) or self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got solver={self.solver!r}")
        self._check_shuffle()
        if self.beta_loss not in ("frobenius", 2):
            raise ValueError(f"fastmu implements beta_loss='frobenius' only, got {self.beta_loss!r}")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}")
        self._penalty(1, 1)
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if (isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not math.isfinite(self.tol)
                or self.tol < 0):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        check_eps(self.eps)
        from fastmu.dispatch import BACKENDS

        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got backend={self.backend!r}")
        _check_random_state(self.random_state)
        nc = self.n_components
        if not (nc is None or nc == "auto" or (isinstance(nc, numbers.Integral) and not isinstance(nc, bool)
                                                and nc >= 1)):
            raise ValueError(f"n_components must be None, 'auto' or an integer >= 1, got {nc!r}")

    def _check_shuffle(self) -> None:
        if not isinstance(self.shuffle, (bool, np.bool_)):
            raise ValueError(f"shuffle must be a bool, got {self.shuffle!r}")

    def _rank(self, n_features: int, W: Any, H: Any) -> int:
        nc = self.n_components
        if nc == "auto" and self.init == "custom" and H is not None:
            return int(H.shape[0])
        if nc is None or nc == "auto":
            return n_features
        return int(nc)

    def _validate_X(self, X: Any, reset: bool) -> Any:
        """X as a 2-D array of its own kind; feature counts (and names) recorded or checked."""
        kind = array_kind(X)
        if not is_device_array(X):  # the solvers' torch CPU operations would hang in a forked child
            fork_safety.check_cpu_kernels_usable()
        if kind == "numpy":
            if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
                raise TypeError("fastmu.NMF does not support sparse input; pass a dense array (X.toarray())")
            if _sparse_columns(X):
                raise TypeError("fastmu.NMF does not support sparse input; pass a dense DataFrame "
                                "(X.sparse.to_dense())")
            if _SKLEARN:
                X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32], ensure_min_samples=1,
                                  ensure_min_features=1)
            else:
                X = np.asarray(X)
                if X.dtype.kind != "f":
                    X = X.astype(np.float64)
            _check_2d(X)
        else:
            _check_2d(X)
        if min(X.shape) == 0:
            raise ValueError(f"X has shape {tuple(X.shape)}: needs at least one sample and one feature")
        if kind != "numpy":
            X = _float_finite(X, kind)
        if float(X.min()) < 0:  # scikit-learn's message, for code that matches on it
            raise ValueError(f"Negative values in data passed to {type(self).__name__} (input X): "
                             f"its minimum is {float(X.min()):.6g}")
        n_features = int(X.shape[1])
        if reset:
            self.n_features_in_ = n_features
        elif n_features != self.n_features_in_:
            raise ValueError(f"X has {n_features} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")
        return X


def _sparse_columns(X: Any) -> bool:
    """Whether X is a pandas DataFrame with sparse columns (without importing pandas)."""
    dtypes = getattr(X, "dtypes", None)
    if dtypes is None or isinstance(dtypes, np.dtype) or not hasattr(dtypes, "__iter__"):
        return False
    return any(type(dt).__name__ == "SparseDtype" for dt in dtypes)


def _check_2d(X: Any) -> None:
    if X.ndim != 2:
        raise ValueError(f"fastmu.NMF takes a 2-D X (n_samples, n_features), got shape {tuple(X.shape)}; "
                         "fastmu.mu factorises batches of problems")


def _float_finite(X: Any, kind: ArrayKind) -> Any:
    """A torch or CuPy X as scikit-learn's checks leave a NumPy one: float32 or float64 (integers
    and booleans become float64), finite; detached, so that no result carries X's graph."""
    from fastmu.solver import _cast

    dtype = check_dtype(X, "X", kind)
    if kind == "torch":
        X = X.detach()
    X = _cast(X, kind, dtype)
    mod = _module(kind)
    if not bool(mod.isfinite(X).all()):  # scikit-learn's messages for NumPy input
        raise ValueError("Input X contains NaN." if bool(mod.isnan(X).any()) else "Input X contains infinity.")
    return X


def _check_start(W: Any, H: Any, X: Any, n: int) -> tuple[Any, Any]:
    """W and H for ``init="custom"``, checked: X's kind, float32/float64 (integers become
    float64), shapes ``(n_samples, n)`` and ``(n, n_features)``, finite and non-negative;
    ValueError/TypeError naming the problem."""
    n_samples, n_features = X.shape
    checked = []
    for name, F, want in (("W", W, (n_samples, n)), ("H", H, (n, n_features))):
        F = _as_kind(F, X, name)
        if tuple(F.shape) != want:
            raise ValueError(f"{name} has shape {tuple(F.shape)}, expected {want} for X of shape "
                             f"{tuple(X.shape)} and n_components={n}")
        lo = float(F.min()) if F.size else 0.0
        if not math.isfinite(float(F.sum())) or lo < 0:
            raise ValueError(f"{name} must be finite and non-negative (its minimum is {lo:.6g})")
        checked.append(F)
    return checked[0], checked[1]


def _np_dtype(X: Any) -> np.dtype:
    return np.dtype(str(X.dtype).replace("torch.", ""))


def _as_kind(F: Any, X: Any, name: str) -> Any:
    """``F`` (the start ``name`` the caller passed) as a float array of X's kind (detached from
    autograd); other kinds, and dtypes fastmu does not compute in, are an error."""
    from fastmu.solver import _cast

    kind = array_kind(X)
    if array_kind(F) != kind:
        raise TypeError(f"W and H must be the same kind of array as X ({kind}), got {array_kind(F)}")
    if kind == "numpy":
        F = as_numpy_input(F, name)
    elif kind == "torch":
        F = F.detach()
    return _cast(F, kind, check_dtype(F, name, kind))


def _backend_of(backend: str, X: Any) -> str:
    """The engine :func:`fastmu.solver.solve` picks for ``X`` and ``backend``."""
    from fastmu.solver import _resolve_backend

    return _resolve_backend(backend, X, array_kind(X))


def _transposed(X: Any) -> Any:
    """A C-contiguous copy of ``X.T``, in X's kind."""
    if array_kind(X) == "torch":
        return X.T.contiguous()
    if array_kind(X) == "cupy":
        import cupy

        return cupy.ascontiguousarray(X.T)
    return np.ascontiguousarray(X.T)


def _cast_like(X: Any, ref: Any) -> Any:
    """X in ``ref``'s dtype (a new array only when it differs)."""
    if array_kind(X) == "torch":
        return X.to(ref.dtype)
    return X.astype(ref.dtype, copy=False)


def _raise_if_overflowed(X: Any, W: Any, H: Any, init: str | None = None) -> None:
    """The solver's FloatingPointError where W or H is no longer finite (``init``: the drawn start's)."""
    raise_if_not_finite(X[None], W[None], H[None], array_kind(X), str(_np_dtype(X)), "MU", init=init)


def _frobenius(X: Any, W: Any, H: Any) -> float:
    """``‖X − W H‖`` (Frobenius), computed on X's device."""
    with np.errstate(over="ignore"):
        R = X - W @ H
        f = float((R * R).sum())
        if math.isinf(f):  # float32 X from about 1e17 on: the sum of squares overflows, the norm need not
            s = float(abs(R).max())
            if math.isfinite(s) and s > 0:
                R = R / s
                return s * math.sqrt(float((R * R).sum()))
    return float(math.sqrt(f))


def _check_cd_backend(backend: str, X: Any) -> None:
    """``solver="cd"`` picks its implementation from where X is (the fused CPU kernel for host
    arrays, torch on X's device for GPU arrays and ``shuffle=True``): a ``backend`` naming anything
    else is refused, not ignored."""
    where = "cuda" if is_device_array(X) else "cpu"
    if backend in ("auto", where):
        return
    remedy = {"cuda": "pass X as a GPU array (CuPy or a CUDA tensor) or leave backend='auto'",
              "cpu": "pass X on the host or leave backend='auto'",
              "torch": "leave backend='auto'"}[backend]
    raise ValueError(f"solver='cd' runs where X is (the fused CPU kernel for host arrays, torch on the GPU for "
                     f"GPU arrays), so backend={backend!r} cannot be honoured for this X; {remedy}")


def _check_random_state(seed: Any) -> np.random.RandomState:
    """scikit-learn's ``check_random_state``: None → NumPy's global RandomState, an integer →
    a new RandomState of that seed, a RandomState → itself."""
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"random_state must be a seed between 0 and 2**32 - 1, got {seed!r}")
        return np.random.RandomState(int(seed))
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError("random_state must be None, an integer or a numpy RandomState (the estimator draws "
                     f"scikit-learn's numbers, from a RandomState as scikit-learn does), got {seed!r}")


def _penalised(den: Any, F: Any, l1: float, l2: float) -> Any:
    """A denominator of the multiplicative update of factor F with its L1/L2 weights added
    (scikit-learn's order: the L1 weight, then the L2 term)."""
    if l1:
        den = den + l1
    if l2:
        den = den + l2 * F
    return den


def _solve_w(X: Any, H: Any, max_iter: int, tol: float, eps: float, pen: Penalty) -> tuple[Any, int]:
    """W ≥ 0 minimising ``‖X − W H‖`` (plus W's penalties) with H fixed, by multiplicative
    updates of W alone; returns W and the iterations run.

    ``X Hᵀ`` and ``H Hᵀ`` are formed once, so an iteration costs
    O(n_samples · n_components²) and never reads X again; the residual norm for
    ``tol`` (the data term alone, as scikit-learn's) comes from the same products,
    formed once more in float64 for float32 X: ``‖X‖² − 2⟨W, XHᵀ⟩ + ⟨WᵀW, HHᵀ⟩``
    cancels, and from float32 products its error (~1e-7·‖X‖²) passed the
    decreases ``tol`` looks for, stopping transforms early. Host arrays run this
    loop in kernels (:func:`_solve_w_on_the_cpu`), other arrays in their own
    array operations (:func:`_solve_w_generic`).
    """
    kind = array_kind(X)
    if kind == "numpy" or (kind == "torch" and X.device.type == "cpu"):
        return _solve_w_on_the_cpu(X, H, kind, max_iter, tol, eps, pen)
    return _solve_w_generic(X, H, max_iter, tol, eps, pen)


def _solve_w_generic(X: Any, H: Any, max_iter: int, tol: float, eps: float, pen: Penalty) -> tuple[Any, int]:
    """:func:`_solve_w` in the operations of X's array type (CuPy, torch on any device, or
    NumPy: the tests' oracle for the kernels)."""
    from fastmu.solver import _cast

    kind = array_kind(X)
    n = H.shape[0]
    mean = float(X.mean())
    XHt = X @ H.T
    HHt = H @ H.T
    W = XHt * 0 + math.sqrt(mean / n)  # scikit-learn's start for transform, in X's kind and dtype
    if tol > 0:
        X64, H64 = (_cast(v, kind, "float64") for v in (X, H))
        XHt64, HHt64 = (XHt, HHt) if X64 is X else (X64 @ H64.T, H64 @ H64.T)
        x2 = float((X64 * X64).sum())
        del X64

    def norm(W: Any) -> float:
        W64 = _cast(W, array_kind(W), "float64")
        f = x2 - 2.0 * float((W64 * XHt64).sum()) + float(((W64.T @ W64) * HHt64).sum())
        return math.sqrt(max(f, 0.0))

    e_init = e_prev = norm(W) if tol > 0 else 0.0
    it = 0
    for it in range(1, max_iter + 1):
        W = W * (XHt / _penalised(W @ HHt + eps, W, pen.l1_A, pen.l2_A))
        if tol > 0 and it % 10 == 0:
            e = norm(W)
            if (e_prev - e) / (e_init if e_init > 0 else 1.0) < tol:
                break
            e_prev = e
    return W, it


def _solve_w_on_the_cpu(X: Any, H: Any, kind: str, max_iter: int, tol: float, eps: float,
                        pen: Penalty) -> tuple[Any, int]:
    """:func:`_solve_w` for host arrays (NumPy, or torch on the CPU), on the kernels of
    :mod:`fastmu.kernels.cpu_transform`: the products in one pass over X, then the updates
    on ``Wᵀ`` in calls of 10, each ending at a ``tol`` check whose two terms the kernel
    sums as it goes, or, without ``tol``, in slices of about
    :data:`fastmu.cpu_threads.SLICE_S` (Ctrl-C). The same updates and checks as the
    generic loop, in X's dtype, with the residual's terms in float64."""
    from fastmu import cpu_threads
    from fastmu.kernels import cpu_transform

    torch_in = kind == "torch"
    Xn = np.ascontiguousarray(X.detach().numpy() if torch_in else X)
    Hn = np.ascontiguousarray(H.detach().numpy() if torch_in else H)
    m, n = Xn.shape[0], Hn.shape[0]
    dt = Xn.dtype
    measure = tol > 0
    Wt = np.full((n, m), math.sqrt(float(Xn.mean()) / n), dt)  # scikit-learn's start, transposed
    Pt, HHt = np.empty((n, m), dt), np.empty((n, n), dt)
    Pt64, HHt64 = (np.empty((n, m)), np.empty((n, n))) if measure else (np.empty((0, 0)), np.empty((0, 0)))
    weights = (float(eps), float(pen.l1_A), float(pen.l2_A))
    done = 0
    with fork_safety.cpu_kernels():
        x2 = cpu_transform.mu_w_products(Xn, Hn, Pt, HHt, Pt64, HHt64, measure)
        if not measure:
            def updates(k: int) -> None:
                nonlocal done
                cpu_transform.mu_w_run(Wt, Pt, HHt, *weights, k, Pt64, HHt64, False)
                done += k

            cpu_threads.run_in_slices(updates, max_iter)
        else:
            def residual(k: int) -> float:  # k updates, then the residual norm of the result
                wx, ww = cpu_transform.mu_w_run(Wt, Pt, HHt, *weights, k, Pt64, HHt64, True)
                return math.sqrt(max(x2 - 2.0 * wx + ww, 0.0))

            e_init = e_prev = residual(0)
            while done < max_iter:
                k = min(10, max_iter - done)
                if k < 10:  # no check after a last, partial run of updates, as the generic loop
                    cpu_transform.mu_w_run(Wt, Pt, HHt, *weights, k, Pt64, HHt64, False)
                    done += k
                    break
                e = residual(k)
                done += k
                if (e_prev - e) / (e_init if e_init > 0 else 1.0) < tol:
                    break
                e_prev = e
    W = np.ascontiguousarray(Wt.T)
    if torch_in:
        import torch

        W = torch.from_numpy(W)
    return W, done


__all__ = ["NMF"]
