"""Flush-to-zero for the CPU kernels' threads (x86-64 MXCSR FTZ and DAZ bits).

Multiplicative updates drive entries that should be zero towards zero
geometrically, so long float32 runs fill S with subnormal numbers (below
1.2e-38), and x86 cores process those through a micro-code assist that is
tens of times slower. Measured here: a column block's S update went from
22 µs to over 40 µs once subnormals appeared. Each parallel task therefore
sets FTZ/DAZ on entry and restores the caller's MXCSR on exit, so nothing
leaks into other code on Numba's worker threads. The only numerical effect is
that values below the smallest normal number (1.2e-38 in float32, 2.2e-308
in float64) are read and written as zero.

On other architectures these are no-ops.
"""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
_FTZ_DAZ = 0x8040  # MXCSR bit 15 (flush to zero) | bit 6 (denormals are zero)


def _mxcsr_fns(builder):
    fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
    mod = builder.module
    st = cgutils.get_or_insert_function(mod, fnty, "llvm.x86.sse.stmxcsr")
    ld = cgutils.get_or_insert_function(mod, fnty, "llvm.x86.sse.ldmxcsr")
    return st, ld


@intrinsic
def enter_ftz(typingctx):
    """Set FTZ|DAZ on this thread; return the previous MXCSR (0 where not x86)."""
    sig = types.uint32()

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        if not _X86:
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        p8 = builder.bitcast(slot, ir.IntType(8).as_pointer())
        st, ld = _mxcsr_fns(builder)
        builder.call(st, [p8])
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(i32, _FTZ_DAZ)), slot)
        builder.call(ld, [p8])
        return old

    return sig, codegen


@intrinsic
def leave_ftz(typingctx, saved):
    """Restore the MXCSR value that :func:`enter_ftz` returned."""
    sig = types.void(types.uint32)

    def codegen(context, builder, signature, args):
        if not _X86:
            return context.get_dummy_value()
        i32 = ir.IntType(32)
        slot = cgutils.alloca_once(builder, i32)
        builder.store(args[0], slot)
        p8 = builder.bitcast(slot, ir.IntType(8).as_pointer())
        _, ld = _mxcsr_fns(builder)
        builder.call(ld, [p8])
        return context.get_dummy_value()

    return sig, codegen
