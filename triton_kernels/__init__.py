"""Triton kernels of fastflow, installed as ``fastflow._triton``.

Each module holds one kernel family and its launchers. The launchers take contiguous tensors
that the op layer (fastflow/_ops.py) has already validated; under ``TRITON_INTERPRET=1`` they run
on CPU tensors, which is how the test suite checks them on machines without a GPU.
"""

# Options of every launch. No FMA contraction: products and sums round separately, in the same
# order as in the CPU and CUDA kernels and in eager PyTorch, so all of them give the same bits.
# Stated rather than left to Triton, whose default turns contraction off from 3.10 on.
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
