"""Explicit SIMD vectors for Numba CPU kernels: a tiny typed vocabulary over LLVM vector IR.

Numba's loops vectorise only through LLVM's auto-vectoriser, which needs the
innermost loop to run over contiguous elements and, without alias
information, re-loads and re-stores every accumulator that lives in an
array. The tiled MU kernel (:mod:`fastmu.kernels.cpu_tiled`) needs the
opposite: sixteen vector accumulators held in registers while a loop runs
over the 65 rows of X. Values of type :class:`Vec` are LLVM vectors
(``<16 x float>`` on AVX-512), which LLVM keeps in registers once inlined.

All loads and stores address a C-contiguous array by its *flat* element
offset and are unaligned (``align`` = item size). Reductions
(:func:`vhsum`) add lanes in a fixed pairwise order, so results do not
depend on the machine beyond the lane count.
"""
from __future__ import annotations

import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

from fastmu.kernels.cpu_target import prefer_512bit_vectors
from fastmu.kernels.cpu_target import status as _cpu_status

prefer_512bit_vectors()  # decides the width below; must come before any kernel compiles

#: bytes per vector register: 64 where the kernels compile for 512-bit
#: vectors (see :mod:`fastmu.kernels.cpu_target`), 32 (AVX2-class) otherwise.
VECTOR_BYTES = 64 if _cpu_status()["active"] else 32


def lanes_for(itemsize: int) -> int:
    """Lanes of one vector register for an element of ``itemsize`` bytes."""
    return VECTOR_BYTES // itemsize


class Vec(types.Type):
    """A SIMD vector of ``lanes`` elements of a float ``dtype`` (a register value, never stored)."""

    def __init__(self, dtype: types.Float, lanes: int) -> None:
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vec({dtype}x{lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # noqa: ANN001 (Numba's model signature)
        elem = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.lanes))


def _vec_of(dtype: types.Type) -> Vec:
    if not isinstance(dtype, types.Float):
        raise TypingError(f"SIMD vectors hold float32/float64, not {dtype}")
    return Vec(dtype, lanes_for(dtype.bitwidth // 8))


def _check_c_array(arr: types.Type) -> None:
    if not (isinstance(arr, types.Array) and arr.layout == "C"):
        raise TypingError(f"SIMD loads and stores need a C-contiguous array, got {arr}")


def _element_ptr(context, builder, aryty, ary, idx, idxty):  # noqa: ANN001, ANN202
    arr = context.make_array(aryty)(context, builder, ary)
    off = context.cast(builder, idx, idxty, types.intp)
    return builder.gep(arr.data, [off])


@intrinsic
def vlanes(typingctx, arr):  # noqa: ANN001, ANN201
    """Number of lanes of a vector of ``arr``'s dtype (a compile-time constant)."""
    _check_c_array(arr)
    n = _vec_of(arr.dtype).lanes

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return context.get_constant(types.intp, n)

    return types.intp(arr), codegen


@intrinsic
def vload(typingctx, arr, idx):  # noqa: ANN001, ANN201
    """Load ``arr.flat[idx : idx + lanes]`` as a vector."""
    _check_c_array(arr)
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        vptr = builder.bitcast(ptr, context.get_value_type(vt).as_pointer())
        return builder.load(vptr, align=vt.dtype.bitwidth // 8)

    return vt(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):  # noqa: ANN001, ANN201
    """Store vector ``v`` to ``arr.flat[idx : idx + lanes]``."""
    _check_c_array(arr)
    if not isinstance(v, Vec) or v != _vec_of(arr.dtype):
        raise TypingError(f"cannot store {v} into {arr}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        vptr = builder.bitcast(ptr, context.get_value_type(sig.args[2]).as_pointer())
        builder.store(args[2], vptr, align=sig.args[2].dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


@intrinsic
def vsplat(typingctx, x):  # noqa: ANN001, ANN201
    """A vector with every lane equal to the float scalar ``x``."""
    vt = _vec_of(x)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        llty = context.get_value_type(vt)
        one = builder.insert_element(ir.Constant(llty, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), [0] * vt.lanes)
        return builder.shuffle_vector(one, one, mask)

    return vt(x), codegen


def _binary(op_name: str):  # noqa: ANN202
    @intrinsic
    def op(typingctx, a, b):  # noqa: ANN001, ANN201
        if not (isinstance(a, Vec) and a == b):
            raise TypingError(f"vector {op_name} needs two equal vector types, got {a}, {b}")

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return getattr(builder, op_name)(args[0], args[1])

        return a(a, b), codegen

    return op


vadd = _binary("fadd")
vmul = _binary("fmul")
#: lane-wise IEEE division (exact, as the scalar kernels' divisions)
vdiv = _binary("fdiv")


@intrinsic
def vfma(typingctx, a, b, c):  # noqa: ANN001, ANN201
    """``a * b + c`` lane-wise; fused into one FMA where the CPU has one (``llvm.fmuladd``)."""
    if not (isinstance(a, Vec) and a == b == c):
        raise TypingError(f"vfma needs three equal vector types, got {a}, {b}, {c}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        llty = context.get_value_type(a)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(llty, [llty] * 3), f"llvm.fmuladd.v{a.lanes}f{a.dtype.bitwidth}"
        )
        return builder.call(fn, list(args))

    return a(a, b, c), codegen


@intrinsic
def vhsum(typingctx, v):  # noqa: ANN001, ANN201
    """Sum of the lanes of ``v``, in a fixed pairwise order (halves added until one lane is left)."""
    if not isinstance(v, Vec):
        raise TypingError(f"vhsum needs a vector, got {v}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        x = args[0]
        width = v.lanes
        while width > 1:
            half = width // 2
            lo = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half))))
            hi = builder.shuffle_vector(
                x, x, ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half, width)))
            )
            x = builder.fadd(lo, hi)
            width = half
        return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))

    return v.dtype(v), codegen


@intrinsic
def vzeros(typingctx, arr):  # noqa: ANN001, ANN201
    """A zero vector of ``arr``'s dtype."""
    _check_c_array(arr)
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return ir.Constant(context.get_value_type(vt), None)

    return vt(arr), codegen


