"""The two products of a column block, ``X Sᵀ`` and ``AᵀX``, in explicit SIMD register tiles.

The blocked MU and CD kernels (:mod:`fastmu.kernels.cpu`,
:mod:`fastmu.kernels.cpu_cd`) spend most of an iteration in two products
per column block of ``L`` pixels::

    P[:, :] += X[:, j0:j0+L] @ Sb[:, :L]ᵀ      (a reduction over pixels)
    R[:, :L] = A[:, :]ᵀ @ X[:, j0:j0+L]        (a reduction over rows)

Their auto-vectorised versions in :mod:`fastmu.kernels.cpu` were written
for AVX-512's 32 vector registers. With 16 (AVX2), LLVM spilled six of the
P tile's sixteen accumulators to the stack on every pixel vector, and the R
tile's 32 broadcast coefficients did not fit either: one core of the 2-core
AMD EPYC dev machine ran them at 39–48 (P) and 17–49 (R) GFLOP/s (float32,
65 or 200 rows, 1024 pixels). The tiles here fit 16 registers:

- ``X Sᵀ``: 2 rows of X × 4 rows of S, 8 vector accumulators (a 4 × 3 tile
  ran up to 15 % faster at rank 12 but splits rank 4 badly; a 3 × 4 tile
  spilled again);
- ``AᵀX``: 4 components × 3 pixel vectors, 12 accumulators held over *all*
  rows of the block, so R is written once instead of loaded and stored once
  per 8 rows.

Measured one core, float32, 960 pixels, X in cache: ``X Sᵀ`` 64–79 against
41–46 GFLOP/s; ``AᵀX`` 64–86 against 35–52 where X's rows lie an odd
number of cache lines apart, and no gain where they lie a multiple of 4 kB
apart (all rows then fall into the same L1 sets), so the engines give their
copy of X such a row stride (:func:`row_stride`,
:func:`fastmu.dispatch.blocked_kernel_x`). Reading down the rows, the
``AᵀX`` tile defeats the hardware prefetchers: on blocks fresh from memory
it was 1.5–2.5x *slower*, so the kernels use it only where X stays in cache
between iterations (:func:`fastmu.kernels.cpu._hot`). ``X Sᵀ`` always
follows ``AᵀX`` on the same block, which is then in cache.

Which products the kernels compile is decided once per process by the
vector width (:data:`EXPLICIT`): the explicit tiles with 256-bit vectors,
the auto-vectorised ones where 512-bit vectors are active (measured there).
Both are exact products; they differ only in the order of the sums.
"""
from __future__ import annotations

import numba as nb

from fastmu.kernels.simd import VECTOR_BYTES, vfma, vhsum, vlanes, vload, vsplat, vstore, vzeros

# Reassociation lets LLVM vectorise the remainders' reductions over pixels; no
# 'arcp' or 'nnan' (exact divisions, NaN kept). The flags of every CPU kernel.
FASTMATH = {"reassoc", "contract", "nsz"}

#: whether the blocked kernels use these tiles (256-bit vectors: 16 registers)
#: rather than the auto-vectorised ones of :mod:`fastmu.kernels.cpu`
EXPLICIT = VECTOR_BYTES == 32

#: bytes per cache line
_LINE = 64


def row_stride(t: int, itemsize: int) -> int:
    """Elements per row for a copy of X whose rows of ``t`` pixels do not share L1 sets.

    Rows of 4 kB or more are padded to an odd number of cache lines, so that
    consecutive rows map to different sets of a 4 kB-way L1 and the ``AᵀX``
    tile, which walks down the rows, keeps them all. Shorter rows are kept.
    """
    per_line = _LINE // itemsize
    if t * itemsize < 4096 or _LINE % itemsize:
        return t
    lines = -(-t // per_line)
    return (lines + 1 - lines % 2) * per_line


@nb.njit(cache=True, error_model="numpy", fastmath=FASTMATH, inline="always")
def _p_2x4(X, Sb, Pc, i, k, j0, nv, so):
    """``Pc[i:i+2, k:k+4] += X[i:i+2, j0:j0+nv·w] @ Sb[k:k+4, so:so+nv·w]ᵀ`` (8 accumulators)."""
    w = vlanes(X)
    t = X.shape[1]
    tb = Sb.shape[1]
    z = vzeros(X)
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    x0o = i * t + j0
    x1o = x0o + t
    s0o = k * tb + so
    for v in range(nv):
        o = v * w
        x0 = vload(X, x0o + o)
        x1 = vload(X, x1o + o)
        s = vload(Sb, s0o + o)
        a00 = vfma(x0, s, a00)
        a10 = vfma(x1, s, a10)
        s = vload(Sb, s0o + tb + o)
        a01 = vfma(x0, s, a01)
        a11 = vfma(x1, s, a11)
        s = vload(Sb, s0o + 2 * tb + o)
        a02 = vfma(x0, s, a02)
        a12 = vfma(x1, s, a12)
        s = vload(Sb, s0o + 3 * tb + o)
        a03 = vfma(x0, s, a03)
        a13 = vfma(x1, s, a13)
    Pc[i, k] += vhsum(a00)
    Pc[i, k + 1] += vhsum(a01)
    Pc[i, k + 2] += vhsum(a02)
    Pc[i, k + 3] += vhsum(a03)
    Pc[i + 1, k] += vhsum(a10)
    Pc[i + 1, k + 1] += vhsum(a11)
    Pc[i + 1, k + 2] += vhsum(a12)
    Pc[i + 1, k + 3] += vhsum(a13)


@nb.njit(cache=True, error_model="numpy", fastmath=FASTMATH, inline="always")
def _p_1x4(X, Sb, Pc, i, k, j0, nv, so):
    """``Pc[i, k:k+4] += X[i, j0:j0+nv·w] @ Sb[k:k+4, so:so+nv·w]ᵀ`` (the odd last row)."""
    w = vlanes(X)
    tb = Sb.shape[1]
    z = vzeros(X)
    a0 = a1 = a2 = a3 = z
    xo = i * X.shape[1] + j0
    s0o = k * tb + so
    for v in range(nv):
        o = v * w
        x = vload(X, xo + o)
        a0 = vfma(x, vload(Sb, s0o + o), a0)
        a1 = vfma(x, vload(Sb, s0o + tb + o), a1)
        a2 = vfma(x, vload(Sb, s0o + 2 * tb + o), a2)
        a3 = vfma(x, vload(Sb, s0o + 3 * tb + o), a3)
    Pc[i, k] += vhsum(a0)
    Pc[i, k + 1] += vhsum(a1)
    Pc[i, k + 2] += vhsum(a2)
    Pc[i, k + 3] += vhsum(a3)


@nb.njit(cache=True, error_model="numpy", fastmath=FASTMATH)
def p_block(Xp, Sb, m, n, j0, L, Pc, so=0):
    """``Pc += X[:m, j0:j0+L] @ Sb[:n, so:so+L]ᵀ``: 2 × 4 tiles on whole vectors, then the remainders.

    ``Xp`` and ``Sb`` C-contiguous; their row lengths are their strides.
    """
    w = vlanes(Xp)
    nv = L // w
    Lv = nv * w
    n4 = n - n % 4
    m2 = m - m % 2
    for k in range(0, n4, 4):
        for i in range(0, m2, 2):
            _p_2x4(Xp, Sb, Pc, i, k, j0, nv, so)
        if m2 < m:
            _p_1x4(Xp, Sb, Pc, m2, k, j0, nv, so)
    if Lv < L:  # the last pixels, fewer than a vector
        for i in range(m):
            for k in range(n4):
                acc = Pc.dtype.type(0)
                for jj in range(Lv, L):
                    acc += Xp[i, j0 + jj] * Sb[k, so + jj]
                Pc[i, k] += acc
    for k in range(n4, n):  # components past a multiple of 4
        s = Sb[k, so : so + L]
        for i in range(m):
            x = Xp[i, j0 : j0 + L]
            acc = Pc.dtype.type(0)
            for jj in range(L):
                acc += x[jj] * s[jj]
            Pc[i, k] += acc


@nb.njit(cache=True, error_model="numpy", fastmath=FASTMATH, inline="always")
def _r_4x3(Xp, Ap, R, m, k, j0, jj):
    """``R[k:k+4, jj:jj+3w] = A[:m, k:k+4]ᵀ X[:m, j0+jj : j0+jj+3w]`` (12 accumulators over all rows)."""
    w = vlanes(Xp)
    t = Xp.shape[1]
    tb = R.shape[1]
    z = vzeros(Xp)
    c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = z
    o = j0 + jj
    for i in range(m):
        x0 = vload(Xp, o)
        x1 = vload(Xp, o + w)
        x2 = vload(Xp, o + 2 * w)
        a = vsplat(Ap[i, k])
        c00 = vfma(a, x0, c00)
        c01 = vfma(a, x1, c01)
        c02 = vfma(a, x2, c02)
        a = vsplat(Ap[i, k + 1])
        c10 = vfma(a, x0, c10)
        c11 = vfma(a, x1, c11)
        c12 = vfma(a, x2, c12)
        a = vsplat(Ap[i, k + 2])
        c20 = vfma(a, x0, c20)
        c21 = vfma(a, x1, c21)
        c22 = vfma(a, x2, c22)
        a = vsplat(Ap[i, k + 3])
        c30 = vfma(a, x0, c30)
        c31 = vfma(a, x1, c31)
        c32 = vfma(a, x2, c32)
        o += t
    r = k * tb + jj
    vstore(R, r, c00)
    vstore(R, r + w, c01)
    vstore(R, r + 2 * w, c02)
    r += tb
    vstore(R, r, c10)
    vstore(R, r + w, c11)
    vstore(R, r + 2 * w, c12)
    r += tb
    vstore(R, r, c20)
    vstore(R, r + w, c21)
    vstore(R, r + 2 * w, c22)
    r += tb
    vstore(R, r, c30)
    vstore(R, r + w, c31)
    vstore(R, r + 2 * w, c32)


@nb.njit(cache=True, error_model="numpy", fastmath=FASTMATH, inline="always")
def _r_4x1(Xp, Ap, R, m, k, j0, jj):
    """``R[k:k+4, jj:jj+w] = A[:m, k:k+4]ᵀ X[:m, j0+jj : j0+jj+w]`` (one pixel vector)."""
    t = Xp.shape[1]
    tb = R.shape[1]
    z = vzeros(Xp)
    c0 = c1 = c2 = c3 = z
    o = j0 + jj
    for i in range(m):
        x = vload(Xp, o)
        c0 = vfma(vsplat(Ap[i, k]), x, c0)
        c1 = vfma(vsplat(Ap[i, k + 1]), x, c1)
        c2 = vfma(vsplat(Ap[i, k + 2]), x, c2)
        c3 = vfma(vsplat(Ap[i, k + 3]), x, c3)
        o += t
    r = k * tb + jj
    vstore(R, r, c0)
    vstore(R, r + tb, c1)
    vstore(R, r + 2 * tb, c2)
    vstore(R, r + 3 * tb, c3)


@nb.njit(cache=True, error_model="numpy", fastmath=FASTMATH)
def r_block(Xp, Ap, m, n, j0, L, R):
    """``R[:n, :L] = A[:m, :n]ᵀ X[:m, j0:j0+L]``: 4 × 3-vector tiles, then the remainders.

    ``Xp`` and ``R`` C-contiguous; their row lengths are their strides.
    """
    w = vlanes(Xp)
    L3 = L - L % (3 * w)
    Lv = L - L % w
    n4 = n - n % 4
    # Components innermost: a tile's rows of X (m × 3 vectors) stay in L1 for all of them.
    for jj in range(0, L3, 3 * w):
        for k in range(0, n4, 4):
            _r_4x3(Xp, Ap, R, m, k, j0, jj)
    for jj in range(L3, Lv, w):
        for k in range(0, n4, 4):
            _r_4x1(Xp, Ap, R, m, k, j0, jj)
    for k in range(0, n4, 4):
        for jj in range(Lv, L):  # the last pixels, fewer than a vector
            c0 = c1 = c2 = c3 = R.dtype.type(0)
            for i in range(m):
                x = Xp[i, j0 + jj]
                c0 += Ap[i, k] * x
                c1 += Ap[i, k + 1] * x
                c2 += Ap[i, k + 2] * x
                c3 += Ap[i, k + 3] * x
            R[k, jj] = c0
            R[k + 1, jj] = c1
            R[k + 2, jj] = c2
            R[k + 3, jj] = c3
    for k in range(n4, n):  # components past a multiple of 4
        r = R[k, :L]
        for jj in range(L):
            r[jj] = 0
        for i in range(m):
            c = Ap[i, k]
            x = Xp[i, j0 : j0 + L]
            for jj in range(L):
                r[jj] += c * x[jj]
