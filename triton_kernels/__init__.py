"""Triton kernels of fastflow, installed as ``fastflow._triton``.

Each module holds one kernel family and its launchers. The launchers take contiguous tensors
that the op layer (fastflow/_ops.py) has already validated; under ``TRITON_INTERPRET=1`` they run
on CPU tensors, which is how the test suite checks them on machines without a GPU.
"""
