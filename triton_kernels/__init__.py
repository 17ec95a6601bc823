"""Triton kernels of fastflow, installed as ``fastflow._triton``.

Each module holds one kernel family and its launchers. The launchers take contiguous tensors
that the op layer (fastflow/_ops.py) has already validated; under ``TRITON_INTERPRET=1`` they run
on CPU tensors, which is how the test suite checks them on machines without a GPU.
"""
import contextlib

import torch

# Options of every launch. No FMA contraction: products and sums round separately, in the same
# order as in the CPU and CUDA kernels and in eager PyTorch, so all of them give the same bits.
# Stated rather than left to Triton, whose default turns contraction off from 3.10 on.
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


def on_device(tensor):
    """A context that makes the CUDA device of `tensor` current: Triton launches on the current
    device (and its current stream), and a tensor on another one would fault there. A no-op
    where it already is current, the usual case, and for CPU tensors under the interpreter."""
    if tensor.device.type != "cuda" or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)
