"""The column block's two products (explicit SIMD tiles and auto-vectorised ones) and the
padded row stride of the blocked kernels' X, against NumPy."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmu import EPS
from fastmu.dispatch import blocked_kernel_x
from fastmu.kernels import cpu, cpu_cd, cpu_products
from fastmu.kernels.cpu_tiled import aligned_empty

NT = numba.config.NUMBA_NUM_THREADS

#: both implementations of each product, whichever this CPU compiles into the kernels
P_IMPLS = {"explicit": cpu_products.p_block, "autovec": cpu._p_block_autovec}
R_IMPLS = {"explicit": cpu_products.r_block, "autovec": cpu._r_block_autovec}


def tol(dtype, length):
    """Relative error bound of a float sum of ``length`` non-negative products."""
    return 4 * np.finfo(dtype).eps * np.sqrt(length) + 8 * np.finfo(dtype).eps


SHAPES = [
    # m, n, row length, first pixel j0, pixels L
    (65, 4, 16400, 1024, 1024),  # the paper's rows, a padded stride
    (7, 4, 300, 13, 250),  # odd m (the 1 × 4 tile), a pixel tail, an unaligned j0
    (2, 8, 100, 0, 37),  # L not a multiple of 3 vectors nor of one
    (9, 5, 80, 3, 70),  # a component past a multiple of 4
    (3, 3, 40, 1, 5),  # fewer pixels than a vector, fewer components than a tile
    (1, 1, 8, 0, 8),
]


@pytest.mark.parametrize("impl", sorted(P_IMPLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,n,t,j0,L", SHAPES)
def test_p_block_adds_x_s_transpose(rng, impl, dtype, m, n, t, j0, L):
    X = rng.random((m, t)).astype(dtype)
    Sb = rng.random((n, L + 5)).astype(dtype)  # scratch rows longer than the block, as in the kernels
    P = rng.random((m, n)).astype(dtype)
    ref = P.astype(np.float64) + X[:, j0 : j0 + L].astype(np.float64) @ Sb[:, :L].T.astype(np.float64)
    P_IMPLS[impl](X, Sb, m, n, j0, L, P)
    np.testing.assert_allclose(P, ref, rtol=tol(dtype, L))


@pytest.mark.parametrize("impl", sorted(R_IMPLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,n,t,j0,L", SHAPES)
def test_r_block_writes_a_transpose_x(rng, impl, dtype, m, n, t, j0, L):
    X = rng.random((m, t)).astype(dtype)
    A = rng.random((m, n)).astype(dtype)
    R = np.full((n, L + 5), 7.0, dtype)
    R_IMPLS[impl](X, A, m, n, j0, L, R)
    ref = A.T.astype(np.float64) @ X[:, j0 : j0 + L].astype(np.float64)
    np.testing.assert_allclose(R[:, :L], ref, rtol=tol(dtype, m))
    assert (R[:, L:] == 7.0).all()  # nothing written past the block


@pytest.mark.parametrize("n", [1, 4, 5, 8, 13])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_block_adds_an_exactly_symmetric_gram(rng, n, dtype):
    L = 203
    Sb = rng.random((n, L + 3)).astype(dtype)
    G0 = rng.random((n, n)).astype(dtype)
    G0 = G0 + G0.T
    G = G0.copy()
    cpu._gram_block(Sb, n, L, G)
    ref = G0.astype(np.float64) + Sb[:, :L].astype(np.float64) @ Sb[:, :L].T.astype(np.float64)
    np.testing.assert_allclose(G, ref, rtol=tol(dtype, L))
    assert (G == G.T).all()


@settings(max_examples=200, deadline=None)
@given(t=st.integers(1, 40000), itemsize=st.sampled_from([4, 8]))
def test_row_stride_puts_long_rows_an_odd_number_of_lines_apart(t, itemsize):
    s = cpu_products.row_stride(t, itemsize)
    if t * itemsize < 4096:
        assert s == t
        return
    assert t <= s < t + 2 * 64 // itemsize  # at most two lines of padding
    assert (s * itemsize) % 64 == 0 and (s * itemsize // 64) % 2 == 1


def test_blocked_kernel_x_pads_and_aligns_only_where_needed(rng):
    X = rng.random((2, 5, 1024)).astype(np.float32)  # 4 kB rows: a padded copy
    Xk = blocked_kernel_x(X, NT)
    assert Xk.shape == (2, 5, cpu_products.row_stride(1024, 4)) and Xk.ctypes.data % 64 == 0
    np.testing.assert_array_equal(Xk[:, :, :1024], X)
    assert (Xk[:, :, 1024:] == 0).all()
    # Short rows, aligned: X itself; misaligned: an aligned copy of the same shape.
    aligned = aligned_empty((2, 5, 100), np.float32)
    aligned[...] = rng.random(aligned.shape)
    assert blocked_kernel_x(aligned, NT) is aligned
    buf = np.empty(2 * 5 * 100 + 1, np.float32)
    off = 1 if buf.ctypes.data % 64 == 0 else 0
    misaligned = buf[off : off + 1000].reshape(2, 5, 100)
    copy = blocked_kernel_x(misaligned, NT)
    assert copy is not misaligned and copy.shape == misaligned.shape and copy.ctypes.data % 64 == 0
    np.testing.assert_array_equal(copy, misaligned)


def padded(X, fill=np.nan):
    """X in rows of :func:`cpu_products.row_stride` pixels, the padding ``fill`` (never read)."""
    b, m, t = X.shape
    s = cpu_products.row_stride(t, X.itemsize)
    assert s > t
    Xp = np.full((b, m, s), fill, X.dtype)
    Xp[:, :, :t] = X
    return Xp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b,n", [(1, 4), (3, 6)])
def test_mu_run_on_a_padded_stride_is_bitwise_the_same(rng, dtype, b, n):
    m, t = 9, 1100  # rows of ≥ 4 kB in both dtypes
    X = rng.random((b, m, t)).astype(dtype)
    A0 = (rng.random((b, m, n)) + 0.1).astype(dtype)
    S0 = (rng.random((b, n, t)) + 0.1).astype(dtype)
    W = np.ones((1, m, n), dtype)
    out = []
    for Xk in (X, padded(X)):
        A, S = A0.copy(), S0.copy()
        P, G = np.empty((b, m, n), dtype), np.empty((b, n, n), dtype)
        cpu.mu_run(Xk, A, S, W, P, G, 5, EPS, False, True, NT)
        out.append((A, S, P, G))
    for got, want in zip(out[1], out[0]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cd_run_on_a_padded_stride_is_bitwise_the_same(rng, dtype):
    b, m, n, t = 2, 9, 4, 1100
    X = rng.random((b, m, t)).astype(dtype)
    A0 = (rng.random((b, m, n)) + 0.1).astype(dtype)
    S0 = (rng.random((b, n, t)) + 0.1).astype(dtype)
    out = []
    for Xk in (X, padded(X)):
        A, S = A0.copy(), S0.copy()
        P, G = np.empty((b, m, n), dtype), np.empty((b, n, n), dtype)
        viol = np.zeros((4, b, 2))
        cpu_cd.cd_run(Xk, A, S, P, G, 4, False, viol, NT)
        out.append((A, S, P, G, viol))
    for got, want in zip(out[1], out[0]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_p_block_reads_s_from_an_offset(rng, dtype):
    m, n, t, j0, L, so = 5, 6, 500, 40, 203, 77
    X = rng.random((m, t)).astype(dtype)
    S = rng.random((n, t)).astype(dtype)
    P = np.zeros((m, n), dtype)
    cpu_products.p_block(X, S, m, n, j0, L, P, so)
    ref = X[:, j0 : j0 + L].astype(np.float64) @ S[:, so : so + L].T.astype(np.float64)
    np.testing.assert_allclose(P, ref, rtol=tol(dtype, L))


@settings(max_examples=300, deadline=None)
@given(t=st.integers(1, 50000), b=st.integers(1, 7), nthreads=st.integers(1, 16))
def test_pixel_chunks_cover_the_pixels_evenly(t, b, nthreads):
    cpp, pc = cpu.pixel_chunking(t, b, nthreads)
    assert cpp >= 1 and pc % 16 == 0
    assert (cpp - 1) * pc < t <= cpp * pc  # every pixel in exactly one chunk, none empty
    assert cpp <= max(1, (2 * nthreads + b - 1) // b)  # about two chunks per thread in all
    assert cpp == 1 or pc >= cpu.CHUNK_MIN  # no chunk too short to be worth a thread
    # Equal work: no chunk is longer than the shortest by more than the 16-pixel rounding
    # times the number of chunks.
    last = t - (cpp - 1) * pc
    assert pc - last < 16 * cpp


def test_pixel_chunks_share_nine_blocks_evenly_over_two_threads():
    # 9025 pixels are 9 blocks of 1024: whole blocks would split 5 to 4 at best.
    cpp, pc = cpu.pixel_chunking(9025, 1, 2)
    assert cpp == 4 and 4 * pc - 9025 < 64


@pytest.mark.parametrize(
    "b,m,t,itemsize,n_iter,problem_major,hot",
    [
        (1, 65, 16384, 4, 10, False, True),  # one problem, 4.2 MB: stays in L3
        (40, 65, 16384, 4, 10, True, False),  # 4.2 MB per problem: more than one core's L2
        (150, 65, 1024, 4, 10, True, True),  # 266 kB per problem: stays in L2
        (25, 65, 4096, 4, 1, True, False),  # one iteration per call (a learned layer's forward)
        (8, 65, 16384, 4, 10, False, False),  # 34 MB shared: more than half the L3
        (1, 65, 16384, 4, 1, False, True),  # one iteration per call (a callback), 4.2 MB: still in L3
    ],
)
def test_hot_only_where_x_stays_in_cache(b, m, t, itemsize, n_iter, problem_major, hot):
    assert cpu._hot(b, m, t, itemsize, n_iter, problem_major) is hot
