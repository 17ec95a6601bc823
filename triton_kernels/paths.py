"""Coefficient matrices of the built-in arithmetic paths, from t in one launch.

    out[g] = rows (x_t, u_t) over columns (x0, x1[, noise]) at time t[g]

The twin of csrc/paths_cpu.cpp (which says why only CondOT, Target-CFM and the constant-noise
path qualify): the formulas of fastflow/paths.py, operation for operation in fp64, so the bits
are PyTorch's. In PyTorch they are half a dozen tiny kernels before the fused one; here, one.
The path's parameters travel as a cached fp64 tensor: a Python float would reach the kernel as
fp32, and a fresh tensor per call would be a copy from the host.
"""
from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS

_BLOCK = 256
# name -> (kernel id, columns)
_PATHS = {"cond_ot": (0, 2), "constant_noise": (1, 3)}


@triton.jit
def _path_coefficients_kernel(t_ptr, params_ptr, out_ptr, groups, t_stride, PATH: tl.constexpr,
                              COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = g < groups
    t = tl.load(t_ptr + g * t_stride, mask=mask)
    p = tl.load(params_ptr)
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


def path_coefficients(t, path, params, dtype):
    """[G, 2, K] coefficients of `path` with `params` at the float64 times t [G], in dtype."""
    kind, columns = _PATHS[path]
    out = torch.empty(t.shape[0], 2, columns, dtype=dtype, device=t.device)
    if t.shape[0]:
        grid = (triton.cdiv(t.shape[0], _BLOCK),)
        _path_coefficients_kernel[grid](t, _device_params(tuple(params), t.device), out,
                                        t.shape[0], t.stride(0), kind, columns, _BLOCK,
                                        **LAUNCH_OPTIONS)
    return out


@lru_cache(maxsize=64)
def _device_params(params, device):
    return torch.tensor(params, dtype=torch.float64).to(device)
