"""Triton kernels of fastflow, installed as ``fastflow._triton``.

Each module holds one kernel family and its launchers. The launchers take contiguous tensors
that the op layer (fastflow/_ops.py) has already validated; under ``TRITON_INTERPRET=1`` they run
on CPU tensors, which is how the test suite checks them on machines without a GPU.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Options of every launch. No FMA contraction: products and sums round separately, in the same
# order as in the CPU and CUDA kernels and in eager PyTorch, so all of them give the same bits.
# Stated rather than left to Triton, whose default turns contraction off from 3.10 on.
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors, one Python call per program: the
# launchers then take big blocks, which keep the tests fast.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Elements per program of the kernels that tile (rows, columns): a [rows, block] tile.
TILE = 4096 if INTERPRETING else 1024


def row_tile(n):
    """(rows, block) of a TILE-element tile over rows of n elements: block the next power of two
    of n (at most TILE), so short rows share a program."""
    block = min(TILE, triton.next_power_of_2(max(n, 1)))
    return TILE // block, block


# Accurate sqrt, sin, cos and exp: libdevice's on the GPU (the hardware approximations lose
# digits). The interpreter has no libdevice; tl's functions run numpy's there.
LIBM = tl if INTERPRETING else libdevice


@triton.jit
def narrow(x, ty: tl.constexpr):
    """x stored as ty, rounded as PyTorch's casts and the CPU kernels round it: fp64 through fp32
    into a 16-bit type (rounding fp64 to fp16 or bf16 at once differs by an ulp now and then)."""
    if x.dtype == tl.float64 and ty.primitive_bitwidth == 16:
        return x.to(tl.float32).to(ty)
    return x.to(ty)


@triton.jit
def negate(x):
    """-x as torch.neg gives it, the sign bit flipped (-0 for 0, NaNs too): Triton up to 3.6
    compiles a float's -x as 0 - x (+0 for +0), which changed the bits of coefficients that are
    zero (LinearVP's d_sigma at t = 0, say) on the GPU machines' Triton."""
    if x.dtype == tl.float64:
        y = (x.to(tl.int64, bitcast=True) ^ -9223372036854775808).to(tl.float64, bitcast=True)
    else:   # (one return: the compiler does not stop at an early one)
        tl.static_assert(x.dtype == tl.float32, "negate: float32 or float64")
        y = (x.to(tl.int32, bitcast=True) ^ -2147483648).to(tl.float32, bitcast=True)
    return y


def on_tensors_device(launcher):
    """Run `launcher` with the CUDA device of its first argument (a tensor or a list of them)
    current: Triton launches on the current device and its current stream, and a tensor on
    another device would fault there. No switch where that device already is current, the
    usual case, or for CPU tensors under the interpreter."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        device = (first[0] if isinstance(first, (list, tuple)) else first).device
        if device.type != "cuda" or device.index == torch.cuda.current_device():
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(device):
            return launcher(first, *args, **kwargs)

    return launch
