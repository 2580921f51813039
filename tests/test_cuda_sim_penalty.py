"""L1/L2 penalties in the Numba CUDA kernels, run in Numba's CUDA simulator.

Run in their own process, with the simulator switched on before Numba is
imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/test_cuda_sim_penalty.py

The main ``pytest`` run skips this module. The penalised kernels (the
``_pen`` variants of ``mu_block``, ``mu_grid_step``, ``mu_flat_step``) against
the NumPy reference :func:`fastmu.reference.mu_numpy` in every launch mode
and staging of X, each weight alone and all four together; a zero penalty
against none, bit for bit (also through the penalised kernels, forced); P and G
carried between calls (unshifted, so a later call may change the penalty); and
the CUDA engine and solver with a penalty. Shapes are tiny: the simulator runs
every thread in Python.
"""
from __future__ import annotations

import pytest

from helpers import TINY_CUDA_BLOCKS, require_cudasim

pytestmark = pytest.mark.cudasim

require_cudasim()

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from fastmu.penalty import Penalty  # noqa: E402
from fastmu.reference import mu_step_numpy, objective_numpy  # noqa: E402

kc = pytest.importorskip("fastmu.kernels.cuda")

# the tolerances of tests/test_cuda_sim.py
TOL = {np.float32: dict(rtol=2e-4, atol=1e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}
EPS = 1e-12

#: all four weights, each large enough to move the result far past TOL (G's diagonal is
#: about t = 40 here, H's about m = 6): see test_penalty_changes_the_result
ALL = Penalty(l1_A=3.0, l2_A=12.0, l1_S=1.5, l2_S=3.0)
ALONE = {name: Penalty(**{name: getattr(ALL, name)}) for name in Penalty._fields}

#: staging knobs (set_config) of every layout the other simulator tests reach: X staged in row
#: chunks (with unrolled loads: 4 rows, then the remainder), the whole tile in shared memory, and
#: "regs" (2 warps of at most 4 rows for m = 6: the second partial), also with 64-pixel tiles
#: and prefetching
STAGINGS = {
    "rows": dict(staging="rows", unroll=4),
    "tile": dict(staging="tile"),
    "regs": dict(staging="regs", rows_per_thread=4),
    "regs-wide-prefetch": dict(staging="regs", rows_per_thread=4, pixels_per_lane=2, prefetch=True),
}


@pytest.fixture(autouse=True)
def _tiny_blocks(monkeypatch):
    """32 threads per block, one nominal multiprocessor and 256 resident threads for every test
    (restored afterwards): flat mode's automatic wave is then 4 "regs" blocks of 64 threads
    (8 of the other stagings), dealing 3 × 2 tiles in ranges that cross problems."""
    saved = kc.get_config()
    kc.set_config(**TINY_CUDA_BLOCKS, unroll=None, occupancy=256)
    monkeypatch.setattr(kc, "_multiprocessors", lambda: 1)
    yield
    kc.set_config(**saved)


def _problem(b, m, n, t, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.random((b, m, n)) @ rng.random((b, n, t)) + 0.05 * rng.random((b, m, t))).astype(dtype)
    A = (0.5 + rng.random((b, m, n))).astype(dtype)
    S = (0.5 + rng.random((b, n, t))).astype(dtype)
    return X, A, S


def _reference(X, A, S, n_iter, penalty, W=None):
    """float64 reference iterations with ``penalty``."""
    A, S = A.astype(np.float64), S.astype(np.float64)
    Xd = X.astype(np.float64)
    Wr = None if W is None else W.astype(np.float64)
    for _ in range(n_iter):
        A, S = mu_step_numpy(Xd, A, S, Wr, EPS, penalty)
    return A, S


def _run(X, A, S, n_iter, mode, penalty=kc.NO_PENALTY, bpp=None, pg=None, W=None, omit_penalty=False):
    """The kernels under the current knobs (and ``mode``) on device copies; host (A, S, P, G).
    With ``omit_penalty`` mu_run is called as before penalties existed (no ``penalty`` argument)."""
    kc.set_mode(mode)
    kc.set_blocks_per_problem(bpp)
    b, m, t = X.shape
    n = A.shape[2]
    Wd = np.ones((1, m, n), X.dtype) if W is None else W
    dX, dA, dS, dW = (cuda.to_device(np.ascontiguousarray(a)) for a in (X, A, S, Wd))
    if pg is None:
        dP = cuda.to_device(np.full((b, m, n), np.nan, X.dtype))  # NaN: an entry never written shows
        dG = cuda.to_device(np.full((b, n, n), np.nan, X.dtype))
    else:
        dP, dG = cuda.to_device(pg[0]), cuda.to_device(pg[1])
    args = (dX, dA, dS, dW, dP, dG, n_iter, EPS, pg is not None, True)
    if omit_penalty:
        kc.mu_run(*args)
    else:
        kc.mu_run(*args, penalty=penalty)
    return dA.copy_to_host(), dS.copy_to_host(), dP.copy_to_host(), dG.copy_to_host()


def _check(X, got, want, dtype):
    """A, S as the reference's; P, G the unshifted ``X Sᵀ``, ``S Sᵀ`` of the returned S."""
    A1, S1, P1, G1 = got
    Ar, Sr = want
    np.testing.assert_allclose(A1, Ar, **TOL[dtype])
    np.testing.assert_allclose(S1, Sr, **TOL[dtype])
    np.testing.assert_allclose(P1, X.astype(np.float64) @ Sr.transpose(0, 2, 1), **TOL[dtype])
    np.testing.assert_allclose(G1, Sr @ Sr.transpose(0, 2, 1), **TOL[dtype])


# (b, t, blocks per problem) per mode: block mode loops one block over 2 tiles (the second
# partial); grid mode gives each its own block; flat mode deals 3 × 2 tiles over one wave of
# blocks (4 "regs" blocks: ranges that cross problems; the 8 of "rows", "tile": one tile each)
SHAPES = {"block": (2, 40, None), "grid": (2, 40, 2), "flat": (3, 40, None)}
#: rows of X: with 4 rows per thread ("regs") two warps, the second partial
M = 6


def _host_pg(X, S):
    """``X Sᵀ``, ``S Sᵀ`` of the starting S (carried in, as from an earlier call: the tests then
    spend the simulator's time on penalised iterations, not on the plain P/G pass)."""
    Xd, Sd = X.astype(np.float64), S.astype(np.float64)
    return (Xd @ Sd.transpose(0, 2, 1)).astype(X.dtype), (Sd @ Sd.transpose(0, 2, 1)).astype(X.dtype)


@pytest.mark.parametrize("staging", ["rows", "tile", "regs"])
@pytest.mark.parametrize("mode", ["block", "grid", "flat"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_weights_match_reference(dtype, mode, staging):
    """One penalised iteration (one launch) per layout (wide "regs" tiles with prefetch: in the
    next test); the iterations that follow, fed by the P, G the kernels accumulate, are checked
    by test_pg_carry_across_calls, test_learned_weights_with_penalty and the engine's test."""
    kc.set_config(**STAGINGS[staging])
    b, t, bpp = SHAPES[mode]
    if (mode, staging) == ("flat", "regs"):  # some block runs the A update of two problems
        kc.set_mode("flat")
        nb, nt = kc._kernels_for(b, M, t, 3, np.dtype(dtype))[2], 2
        ranges = [(g * b * nt // nb, (g + 1) * b * nt // nb) for g in range(nb)]
        assert nb == 4 and any(lo // nt != (hi - 1) // nt for lo, hi in ranges)
    X, A, S = _problem(b, M, 3, t, dtype, seed=b + t)
    _check(X, _run(X, A, S, 1, mode, ALL, bpp, pg=_host_pg(X, S)), _reference(X, A, S, 1, ALL), dtype)


@pytest.mark.parametrize("mode,staging,dtype", [
    ("block", "rows", np.float64), ("grid", "tile", np.float32), ("flat", "regs-wide-prefetch", np.float32)])
@pytest.mark.parametrize("weight", list(ALONE))
def test_each_weight_alone_matches_reference(weight, mode, staging, dtype):
    """Each weight on its own (the others zero) reaches its place in the update: ε of A or S,
    G's or H's diagonal."""
    kc.set_config(**STAGINGS[staging])
    b, t, bpp = SHAPES[mode]
    X, A, S = _problem(b, M, 3, t, dtype, seed=3)
    pen = ALONE[weight]
    _check(X, _run(X, A, S, 1, mode, pen, bpp, pg=_host_pg(X, S)), _reference(X, A, S, 1, pen), dtype)


def test_penalty_changes_the_result():
    """The weights above move A and S far past the tolerances (the tests are not vacuous)."""
    X, A, S = _problem(2, M, 3, 40, np.float64, seed=42)
    A0, S0 = _reference(X, A, S, 2, None)
    for pen in (ALL, *ALONE.values()):
        Ap, Sp = _reference(X, A, S, 2, pen)
        assert max(np.abs(Ap / A0 - 1).max(), np.abs(Sp / S0 - 1).max()) > 100 * TOL[np.float32]["rtol"], pen


def test_zero_penalty_launches_the_plain_kernels(monkeypatch):
    """Every form of "no penalty" (all zeros as a tuple or Penalty, None, or none given) runs
    the plain kernels; any non-zero weight the "_pen" ones."""
    for pen in ((0.0, 0.0, 0.0, 0.0), (0, -0.0, 0, 0), Penalty(), None):
        assert kc.penalty_scalars(np.float32, EPS, pen) is None
    spy = _spy_kernels(monkeypatch)
    X, A, S = _problem(1, 3, 2, 20, np.float32, seed=1)
    for mode in ("block", "grid"):
        for pen, kernel in ((None, f"mu_{mode}"), (Penalty(), f"mu_{mode}"), (ALONE["l1_S"], f"mu_{mode}_pen")):
            spy.clear()
            _run(X, A, S, 1, mode, pen, bpp=1, omit_penalty=pen is None)
            assert spy and set(spy) == {kernel.replace("grid", "grid_step")}, (pen, spy)


def _force_pen_kernels(monkeypatch):
    """Make mu_run launch the "_pen" kernels with all four weights zero."""

    def forced(dtype, eps, penalty):
        return tuple(np.dtype(dtype).type(v) for v in (eps, eps, 0.0, 0.0))

    monkeypatch.setattr(kc, "penalty_scalars", forced)
    return _spy_kernels(monkeypatch)


@pytest.mark.parametrize("mode,staging", [
    ("block", "regs"), ("grid", "regs"), ("flat", "regs"), ("block", "rows"), ("grid", "tile")])
def test_zero_penalty_is_no_penalty_bit_for_bit(monkeypatch, mode, staging):
    """The "_pen" kernels with zero weights give the plain kernels' bits (``ε + 0`` is ε, and
    the diagonals gain exact zeros).

    Bit for bit where the simulator's order of summation is fixed: with "regs" staging (P, G
    summed over lanes in order) everything; "rows" and "tile" add P, G with shared-memory
    atomics, whose order the simulator's Python threads leave to chance (two plain runs differ
    in the last bits), so there A and S (no atomics before them) are compared bit for bit and
    P, G to rounding. One iteration from P, G given by the host."""
    kc.set_config(**STAGINGS[staging])
    b, t, bpp = SHAPES[mode]
    X, A, S = _problem(b, M, 3, t, np.float32, seed=21)
    n_iter, pg = 1, _host_pg(X, S)
    plain = _run(X, A, S, n_iter, mode, bpp=bpp, pg=pg, omit_penalty=True)
    assert all(np.isfinite(v).all() for v in plain)
    spy = _force_pen_kernels(monkeypatch)
    pen = _run(X, A, S, n_iter, mode, (0.0, 0.0, 0.0, 0.0), bpp, pg=pg)
    assert spy and all(name.endswith("_pen") for name in spy), spy
    exact = 4 if staging == "regs" else 2
    for got, want in zip(pen[:exact], plain[:exact]):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(pen[exact:], plain[exact:]):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def _spy_kernels(monkeypatch):
    """Record the names of the MU kernels mu_run launches (plain or ``_pen``)."""
    names = []
    build = kc._build

    def spying_build(*args, **kw):
        k = build(*args, **kw)

        class Spy:
            def __init__(self, name, kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, config):
                names.append(self.name)
                return self.kernel[config]

        fields = {f: getattr(k, f) for f in k.__dataclass_fields__}
        for f in ("mu_block", "mu_grid_step", "mu_flat_step", "mu_block_pen", "mu_grid_step_pen",
                  "mu_flat_step_pen"):
            fields[f] = Spy(f, fields[f])
        return kc._Kernels(**fields)

    monkeypatch.setattr(kc, "_build", spying_build)
    return names


@pytest.mark.parametrize("mode,staging", [("block", "tile"), ("grid", "rows")])
def test_pg_carry_across_calls(mode, staging):
    """1 then 1 penalised iteration with the carried P, G (P/G pass included: not valid at
    first) equal 2 in one call; and P, G are never shifted, so a second call may bring another
    penalty (1 with ALL, then 1 with l2_A alone, against the reference of the same sequence)."""
    kc.set_config(**STAGINGS[staging])
    b, t, bpp = SHAPES[mode]
    X, A, S = _problem(b, M, 2, t, np.float64, seed=3)
    A2, S2, P2, G2 = _run(X, A, S, 2, mode, ALL, bpp)
    A1, S1, P1, G1 = _run(X, A, S, 1, mode, ALL, bpp)
    A11, S11, P11, G11 = _run(X, A1, S1, 1, mode, ALL, bpp, pg=(P1, G1))
    for got, want in ((A11, A2), (S11, S2), (P11, P2), (G11, G2)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    other = ALONE["l2_A"]
    got = _run(X, A1, S1, 1, mode, other, bpp, pg=(P1, G1))
    Ar, Sr = _reference(X, A, S, 1, ALL)
    _check(X, got, _reference(X, Ar, Sr, 1, other), np.float64)


def test_learned_weights_with_penalty():
    """Per-problem W and a penalty together over two iterations (grid mode, rows staging)."""
    b, m, n, t = 2, 7, 4, 40
    X, A, S = _problem(b, m, n, t, np.float64, seed=5)
    W = (0.5 + np.random.default_rng(9).random((b, m, n))).astype(np.float64)
    got = _run(X, A, S, 2, "grid", ALL, 2, W=W)
    _check(X, got, _reference(X, A, S, 2, ALL, W=W), np.float64)


def test_bad_penalty_weights():
    X, A, S = _problem(1, 5, 2, 40, np.float32)
    for bad in ((-1.0, 0.0, 0.0, 0.0), (0.0, float("nan"), 0.0, 0.0), (0.0, 0.0, 0.0, float("inf"))):
        with pytest.raises(ValueError, match="finite number >= 0"):
            _run(X, A, S, 1, "block", bad)
    assert kc.penalty_scalars(np.float32, EPS, (0.0, -0.0, 0, 0)) is None
    sc = kc.penalty_scalars(np.float32, EPS, ALL)
    assert all(type(v) is np.float32 for v in sc)  # float32 kernels keep float32 arithmetic
    f = np.float32
    assert sc == (f(EPS + ALL.l1_A), f(EPS + ALL.l1_S), f(ALL.l2_A), f(ALL.l2_S))


def test_layer_step_stays_unpenalised():
    """The learned layer's forward shares grid_body with a zero penalty: plain MU."""
    kc.set_config(staging="regs", rows_per_thread=4, mode="grid", blocks_per_problem=2)
    b, m, n, t = 2, 9, 3, 40
    X, A, S = _problem(b, m, n, t, np.float64, seed=21)
    P, G = X @ S.transpose(0, 2, 1), S @ S.transpose(0, 2, 1)
    d = cuda.to_device
    Ao, So = cuda.device_array((b, m, n)), cuda.device_array((b, n, t))
    kc.layer_step(d(X), d(A), d(S), d(np.ones((1, m, n))), d(P), d(G), Ao, So,
                  d(np.zeros((b, m, n))), d(np.zeros((b, n, n))), EPS, True)
    Ar, Sr = mu_step_numpy(X, A, S, None, EPS)
    np.testing.assert_allclose(Ao.copy_to_host(), Ar, **TOL[np.float64])
    np.testing.assert_allclose(So.copy_to_host(), Sr, **TOL[np.float64])


# ----------------------------------------------------------------------------- engine / solver


def test_engine_with_penalty():
    """CUDAEngine(..., penalty=...) over two runs (P, G carried, float32, the default "regs"
    layout) matches the reference; its objective is the data term alone; penalty=None is plain
    MU; bad weights are refused when the engine is built."""
    from fastmu.cuda_engine import CUDAEngine

    kc.set_config(staging="auto", pixels_per_lane=None)
    dtype = np.float32
    X, A, S = _problem(2, 5, 2, 40, dtype, seed=12)
    ad = CUDAEngine.adopt
    eng = CUDAEngine(ad(X, None), ad(A, None), ad(S, None), None, EPS, penalty=ALL)
    eng.run(1)
    eng.run(1)
    A2, S2 = (CUDAEngine.release(a, "numpy", X) for a in eng.factors())
    Ar, Sr = _reference(X, A, S, 2, ALL)
    np.testing.assert_allclose(A2, Ar, **TOL[dtype])
    np.testing.assert_allclose(S2, Sr, **TOL[dtype])
    np.testing.assert_allclose(eng.objective(), objective_numpy(X, Ar, Sr), rtol=1e-4)
    plain = CUDAEngine(ad(X, None), ad(A, None), ad(S, None), None, EPS, penalty=None)
    plain.run(1)
    A1 = CUDAEngine.release(plain.A, "numpy", X)
    np.testing.assert_allclose(A1, _reference(X, A, S, 1, None)[0], **TOL[dtype])
    with pytest.raises(ValueError, match="finite number >= 0"):
        CUDAEngine(ad(X, None), ad(A, None), ad(S, None), None, EPS, penalty=(1.0, -2.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="four weights"):
        CUDAEngine(ad(X, None), ad(A, None), ad(S, None), None, EPS, penalty=(1.0, 2.0))


def test_mu_backend_cuda_with_penalty_matches_cpu():
    """fastmu.mu(..., backend="cuda", l1_A=..., l2_S=...) (the solver's engine) gives the CPU
    backend's fit."""
    import fastmu

    rng = np.random.default_rng(11)
    X = rng.random((6, 3)) @ rng.random((3, 70))
    kw = dict(n_iter=4, random_state=0, init="random", l1_A=0.5, l2_A=2.0, l1_S=0.2, l2_S=1.0)
    A_g, S_g = fastmu.mu(X, 3, backend="cuda", **kw)
    A_c, S_c = fastmu.mu(X, 3, backend="cpu", **kw)
    np.testing.assert_allclose(A_g, A_c, **TOL[np.float64])
    np.testing.assert_allclose(S_g, S_c, **TOL[np.float64])
