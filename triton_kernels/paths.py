"""Coefficient matrices of the built-in paths, from t in one launch.

    out[g] = rows (x_t, u_t) over columns (x0, x1[, noise]) at time t[g]
    (or the velocity loss's residual row (1, -u_t) over (pred, x0, x1[, noise]))

The twin of csrc/paths_cpu.cpp: the formulas of fastflow/paths.py, operation for operation in
fp64, so the arithmetic paths get PyTorch's bits and the others agree with it to an ulp or so
per sqrt, sin, exp or pow (libdevice's on the GPU, numpy's under the interpreter). In PyTorch
they are 4 to 20 tiny kernels before the fused one; here, one. The path's parameters are fp64
arguments (annotated: an unannotated Python float reaches the kernel as fp32), so no tensor is
copied from the host and a CUDA graph captures the launch as it is.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import INTERPRETING, LAUNCH_OPTIONS, LIBM, negate, on_tensors_device

_BLOCK = 256
# name -> (kernel id, columns). The interpreter has no pow: Polynomial stays in PyTorch there.
_PATHS = {"cond_ot": (0, 2), "polynomial": (1, 2), "cosine": (2, 2), "linear_vp": (3, 2),
          "vp": (4, 2), "constant_noise": (5, 3), "schrodinger_bridge": (6, 3)}
if INTERPRETING:
    del _PATHS["polynomial"]


@triton.jit
def _torch_pow(t, n):
    """t ** n as torch.pow takes it (see csrc/paths_cpu.cpp): a square root for n = 1/2 and its
    reciprocal for n = -1/2, which give NaN at t = -inf where pow gives inf and 0."""
    root = LIBM.sqrt(t)
    return tl.where(n == 0.5, root, tl.where(n == -0.5, 1.0 / root, libdevice.pow(t, n)))


@triton.jit
def _path_coefficients_kernel(t_ptr, p0: tl.float64, p1: tl.float64, out_ptr, groups, t_stride,
                              PATH: tl.constexpr, COLUMNS: tl.constexpr, RESIDUAL: tl.constexpr,
                              BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = g < groups
    t = tl.load(t_ptr + g * t_stride, mask=mask).to(tl.float64)  # any float type, exactly
    # Typed scalars, and inexact constants as fp64: the interpreter passes Python floats, and a
    # float literal would be rounded to fp32 first.
    p0 = tl.full([], p0, tl.float64)
    p1 = tl.full([], p1, tl.float64)
    one = tl.full([BLOCK], 1.0, tl.float64)
    # (sigma, alpha, d_sigma, d_alpha), and for the noise paths the noise column's entries.
    if PATH == 0:  # CondOT, p0 = sigma_min
        slope = 1.0 - p0
        c0, c1, c2, c3 = one - slope * t, t, negate(slope) * one, one
    elif PATH == 1:  # Polynomial, p0 = n
        alpha = _torch_pow(t, p0)
        d_alpha = p0 * _torch_pow(t, p0 - 1.0)
        c0, c1, c2, c3 = one - alpha, alpha, negate(d_alpha), d_alpha
    elif PATH == 2:  # Cosine
        half_pi = tl.full([], 1.5707963267948966, tl.float64)  # math.pi / 2
        angle = half_pi * t
        sin, cos = LIBM.sin(angle), LIBM.cos(angle)
        c0, c1, c2, c3 = cos, sin, negate(half_pi) * sin, half_pi * cos
    elif PATH == 3:  # LinearVP
        sigma = LIBM.sqrt(one - t * t)
        c0, c1, c2, c3 = sigma, t, negate(t) / sigma, one
    elif PATH == 4:  # VP, p0 = beta_min, p1 = beta_max
        spread = p1 - p0
        s = one - t
        big_t = 0.5 * (s * s) * spread + s * p0
        d_big_t = negate(s) * spread - p0
        alpha, decay = LIBM.exp(-0.5 * big_t), LIBM.exp(negate(big_t))
        sigma = LIBM.sqrt(one - decay)
        c0, c1, c2, c3 = sigma, alpha, 0.5 * d_big_t * decay / sigma, -0.5 * d_big_t * alpha
    elif PATH == 5:  # constant noise, p0 = sigma
        c0, c1, c2, c3, c4, c5 = one - t, t, p0 * one, negate(one), one, 0.0 * one
    else:  # Schrodinger bridge, p0 = sigma
        s_t = p0 * LIBM.sqrt(t * (one - t))
        ratio = (one - 2.0 * t) / (2.0 * t * (one - t) + tl.full([], 1e-8, tl.float64))
        c0, c1, c2, c3, c4, c5 = one - t, t, s_t, negate(one), one, ratio * s_t
    ty = out_ptr.dtype.element_ty
    if RESIDUAL:  # (1, -u_t), u_t rounded then negated
        row = out_ptr + g * (1 + COLUMNS)
        tl.store(row, one.to(ty), mask=mask)
        if COLUMNS == 2:
            tl.store(row + 1, negate(c2.to(ty)), mask=mask)
            tl.store(row + 2, negate(c3.to(ty)), mask=mask)
        else:
            tl.store(row + 1, negate(c3.to(ty)), mask=mask)
            tl.store(row + 2, negate(c4.to(ty)), mask=mask)
            tl.store(row + 3, negate(c5.to(ty)), mask=mask)
    else:
        row = out_ptr + g * (2 * COLUMNS)
        tl.store(row, c0.to(ty), mask=mask)
        tl.store(row + 1, c1.to(ty), mask=mask)
        tl.store(row + 2, c2.to(ty), mask=mask)
        tl.store(row + 3, c3.to(ty), mask=mask)
        if COLUMNS == 3:
            tl.store(row + 4, c4.to(ty), mask=mask)
            tl.store(row + 5, c5.to(ty), mask=mask)


@on_tensors_device
def path_coefficients(t, path, params, dtype, residual):
    """[G, 2, K] coefficients of `path` with `params` at the times t [G] (any float type), in
    dtype, or with `residual` the velocity loss's [G, 1, 1 + K] rows (1, -u_t); None for a path
    this backend does not build."""
    if path not in _PATHS:
        return None
    if dtype not in (torch.float32, torch.float64):   # as csrc/paths_cpu.cpp
        raise ValueError(f"fastflow path_coefficients: dtype must be float32 or float64, got "
                         f"{dtype}")
    kind, columns = _PATHS[path]
    p0, p1 = (*params, 0.0, 0.0)[:2]
    shape = (1, 1 + columns) if residual else (2, columns)
    out = torch.empty(t.shape[0], *shape, dtype=dtype, device=t.device)
    if t.shape[0]:
        grid = (triton.cdiv(t.shape[0], _BLOCK),)
        _path_coefficients_kernel[grid](t, float(p0), float(p1), out, t.shape[0], t.stride(0),
                                        kind, columns, residual, _BLOCK, **LAUNCH_OPTIONS)
    return out
