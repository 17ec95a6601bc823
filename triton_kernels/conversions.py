"""The rows of fastflow.convert, from a path's coefficient matrix in one launch.

    out[g] = coefficients over (x_t, pred) of the prediction of kind dst, given one of kind src

The twin of csrc/conversions_cpu.cpp: the formulas of fastflow/conversions.py, operation for
operation in fp64, so the bits are PyTorch's. In PyTorch they are twenty-odd tiny kernels before
the fused one; here, one. eps is an fp64 argument, like the paths' parameters.
"""
import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, negate, on_tensors_device

_BLOCK = 256
_KINDS = {"velocity": 0, "epsilon": 1, "data": 2, "score": 3}


@triton.jit
def _safe(x, eps):
    # torch.where(x < 0, x.clamp(max=-eps), x.clamp(min=eps)) as selects: nan stays nan.
    return tl.where(x < 0, tl.where(x > -eps, -eps, x), tl.where(x < eps, eps, x))


@triton.jit
def _conversion_kernel(pc_ptr, eps: tl.float64, out_ptr, groups, stride_g, stride_r, stride_c,
                       SRC: tl.constexpr, DST: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = g < groups
    # Rows (x_t, u_t) over columns (x0, x1): [[sigma, alpha], [d_sigma, d_alpha]].
    at = pc_ptr + g * stride_g
    sigma = tl.load(at, mask=mask)
    alpha = tl.load(at + stride_c, mask=mask)
    d_sigma = tl.load(at + stride_r, mask=mask)
    d_alpha = tl.load(at + stride_r + stride_c, mask=mask)
    eps = tl.full([], eps, tl.float64)  # a typed scalar: the interpreter passes a Python float
    zero = tl.zeros([BLOCK], tl.float64)
    one = tl.full([BLOCK], 1.0, tl.float64)
    # (data, noise) estimates as rows over (x_t, pred).
    if SRC == 2:  # data
        data0, data1 = zero, one
        safe_sigma = _safe(sigma, eps)
        noise0, noise1 = one / safe_sigma, negate(alpha) / safe_sigma
    elif SRC == 1:  # epsilon
        noise0, noise1 = zero, one
        safe_alpha = _safe(alpha, eps)
        data0, data1 = one / safe_alpha, negate(sigma) / safe_alpha
    elif SRC == 3:  # score
        noise0, noise1 = zero, negate(sigma)
        safe_alpha = _safe(alpha, eps)
        data0, data1 = one / safe_alpha, sigma * sigma / safe_alpha
    else:  # velocity
        det = _safe(alpha * d_sigma - sigma * d_alpha, eps)
        data0, data1 = d_sigma / det, negate(sigma) / det
        noise0, noise1 = negate(d_alpha) / det, alpha / det
    if DST == 2:
        row0, row1 = data0, data1
    elif DST == 1:
        row0, row1 = noise0, noise1
    elif DST == 3:
        safe_sigma = _safe(sigma, eps)
        row0, row1 = negate(noise0) / safe_sigma, negate(noise1) / safe_sigma
    else:
        row0, row1 = d_alpha * data0 + d_sigma * noise0, d_alpha * data1 + d_sigma * noise1
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * g, row0.to(ty), mask=mask)
    tl.store(out_ptr + 2 * g + 1, row1.to(ty), mask=mask)


@on_tensors_device
def conversion_coefficients(path_coeffs, src, dst, eps, dtype):
    """[G, 1, 2] rows of fastflow.convert from the float64 path coefficients [G, 2, 2]."""
    if dtype not in (torch.float32, torch.float64):   # as csrc/conversions_cpu.cpp
        raise ValueError(f"fastflow conversion_coefficients: dtype must be float32 or float64, "
                         f"got {dtype}")
    groups = path_coeffs.shape[0]
    out = torch.empty(groups, 1, 2, dtype=dtype, device=path_coeffs.device)
    if groups:
        grid = (triton.cdiv(groups, _BLOCK),)
        _conversion_kernel[grid](path_coeffs, float(eps), out, groups, *path_coeffs.stride(),
                                 _KINDS[src], _KINDS[dst], _BLOCK, **LAUNCH_OPTIONS)
    return out
