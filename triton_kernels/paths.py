"""Coefficient matrices of the built-in arithmetic paths, from t in one launch.

    out[g] = rows (x_t, u_t) over columns (x0, x1[, noise]) at time t[g]

The twin of csrc/paths_cpu.cpp (which says why only CondOT, Target-CFM and the constant-noise
path qualify): the formulas of fastflow/paths.py, operation for operation in fp64, so the bits
are PyTorch's. In PyTorch they are half a dozen tiny kernels before the fused one; here, one.
The path's parameter is an fp64 argument (annotated: an unannotated Python float reaches the
kernel as fp32), so no tensor is copied from the host and a CUDA graph captures the launch as
it is.
"""
import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, on_tensors_device

_BLOCK = 256
# name -> (kernel id, columns)
_PATHS = {"cond_ot": (0, 2), "constant_noise": (1, 3)}


@triton.jit
def _path_coefficients_kernel(t_ptr, p: tl.float64, out_ptr, groups, t_stride,
                              PATH: tl.constexpr, COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = g < groups
    t = tl.load(t_ptr + g * t_stride, mask=mask)
    p = tl.full([], p, tl.float64)  # a typed scalar: the interpreter passes a Python float
    row = out_ptr + g * (2 * COLUMNS)
    ty = out_ptr.dtype.element_ty
    one = tl.full([BLOCK], 1.0, tl.float64)
    if PATH == 0:  # CondOT, p = sigma_min
        slope = 1.0 - p
        tl.store(row, (one - slope * t).to(ty), mask=mask)
        tl.store(row + 1, t.to(ty), mask=mask)
        tl.store(row + 2, (-slope * one).to(ty), mask=mask)
        tl.store(row + 3, one.to(ty), mask=mask)
    else:  # constant noise, p = sigma
        tl.store(row, (one - t).to(ty), mask=mask)
        tl.store(row + 1, t.to(ty), mask=mask)
        tl.store(row + 2, (p * one).to(ty), mask=mask)
        tl.store(row + 3, (-one).to(ty), mask=mask)
        tl.store(row + 4, one.to(ty), mask=mask)
        tl.store(row + 5, (0.0 * one).to(ty), mask=mask)


@on_tensors_device
def path_coefficients(t, path, params, dtype):
    """[G, 2, K] coefficients of `path` with `params` (its one parameter) at the float64 times
    t [G], in dtype."""
    kind, columns = _PATHS[path]
    (param,) = params
    out = torch.empty(t.shape[0], 2, columns, dtype=dtype, device=t.device)
    if t.shape[0]:
        grid = (triton.cdiv(t.shape[0], _BLOCK),)
        _path_coefficients_kernel[grid](t, float(param), out, t.shape[0], t.stride(0), kind,
                                        columns, _BLOCK, **LAUNCH_OPTIONS)
    return out
