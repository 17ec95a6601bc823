"""Sinusoidal time embeddings in Triton (see csrc/embedding.h for the math).

A program covers a [ROWS, BLOCK] tile of (samples, frequencies): it loads ROWS times and BLOCK
frequencies, and writes both halves of the tile, so every argument is computed once for its sin
and its cos. sin and cos are libdevice's accurate ones on the GPU: the hardware approximations lose
digits for the large arguments that timesteps up to 1000 give (the interpreter has no libdevice
and uses numpy's through tl). The backward's sums over frequencies
(grad t) and over samples (grad freqs) are written per tile and folded on the host side of the
launcher in a fixed order, so they are deterministic.
"""
import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, LIBM, narrow, on_tensors_device, row_tile


@triton.jit
def _tile(t_ptr, f_ptr, batch, half, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_ok, col_ok = rows < batch, cols < half
    t = tl.load(t_ptr + rows, mask=row_ok, other=0)
    f = tl.load(f_ptr + cols, mask=col_ok, other=0)
    return rows, cols, row_ok, col_ok, t, f


@triton.jit
def _sinusoid_kernel(t_ptr, f_ptr, scale_ptr, out_ptr, batch, half, dim, COS_FIRST: tl.constexpr,
                     ZERO_COLUMN: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, cols, row_ok, col_ok, t, f = _tile(t_ptr, f_ptr, batch, half, ROWS, BLOCK)
    a = (t[:, None] * f[None, :]) * tl.load(scale_ptr)
    sin, cos = LIBM.sin(a), LIBM.cos(a)
    if COS_FIRST:
        first, second = cos, sin
    else:
        first, second = sin, cos
    ty = out_ptr.dtype.element_ty
    where = out_ptr + rows[:, None] * dim + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(where, narrow(first, ty), mask=mask)
    tl.store(where + half, narrow(second, ty), mask=mask)
    if ZERO_COLUMN:
        if tl.program_id(1) == 0:
            tl.store(out_ptr + rows * dim + 2 * half, tl.zeros([ROWS], ty), mask=row_ok)


@triton.jit
def _sinusoid_backward_kernel(grad_ptr, t_ptr, f_ptr, scale_ptr, t_partial_ptr, f_partial_ptr,
                              batch, half, dim, COS_FIRST: tl.constexpr, T_GRAD: tl.constexpr,
                              FREQS_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, cols, row_ok, col_ok, t, f = _tile(t_ptr, f_ptr, batch, half, ROWS, BLOCK)
    a = (t[:, None] * f[None, :]) * tl.load(scale_ptr)
    where = grad_ptr + rows[:, None] * dim + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    g_first = tl.load(where, mask=mask, other=0).to(a.dtype)
    g_second = tl.load(where + half, mask=mask, other=0).to(a.dtype)
    if COS_FIRST:
        g_sin, g_cos = g_second, g_first
    else:
        g_sin, g_cos = g_first, g_second
    d_arg = g_sin * LIBM.cos(a) - g_cos * LIBM.sin(a)
    if T_GRAD:  # partial sums [column tiles, B]
        tl.store(t_partial_ptr + tl.program_id(1).to(tl.int64) * batch + rows,
                 tl.sum(d_arg * f[None, :], axis=1), mask=row_ok)
    if FREQS_GRAD:  # partial sums [row tiles, H]
        tl.store(f_partial_ptr + tl.program_id(0).to(tl.int64) * half + cols,
                 tl.sum(d_arg * t[:, None], axis=0), mask=col_ok)


def _grid(batch, half):
    rows, block = row_tile(half)
    return rows, block, (triton.cdiv(batch, rows), triton.cdiv(half, block))


def _scale(scale, like):
    return torch.full((1,), scale, dtype=like.dtype, device=like.device)


@on_tensors_device
def sinusoid(t, freqs, scale, cos_first, out):
    """Write ``[sin a, cos a]`` (or ``[cos a, sin a]``) of ``a = (t * freqs) * scale`` into out."""
    batch, half, dim = t.shape[0], freqs.shape[0], out.shape[1]
    if out.numel() == 0:
        return
    rows, block, grid = _grid(batch, half)
    grid = (grid[0], max(grid[1], 1))  # a program per row tile even with no frequencies
    _sinusoid_kernel[grid](t, freqs, _scale(scale, t), out, batch, half, dim,
                           COS_FIRST=cos_first, ZERO_COLUMN=dim > 2 * half, ROWS=rows, BLOCK=block,
                           **LAUNCH_OPTIONS)


@on_tensors_device
def sinusoid_backward(grad, t, freqs, scale, cos_first, t_grad, freqs_grad):
    """(grad_t [B], grad_freqs [H]) of sinusoid, empty where not asked for."""
    batch, half, dim = t.shape[0], freqs.shape[0], grad.shape[1]
    rows, block, grid = _grid(batch, half)
    t_partial = t.new_zeros((grid[1] if t_grad else 0, batch))
    f_partial = t.new_zeros((grid[0] if freqs_grad else 0, half))
    if batch and half and (t_grad or freqs_grad):
        _sinusoid_backward_kernel[grid](grad, t, freqs, _scale(scale, t), t_partial, f_partial,
                                        batch, half, dim, COS_FIRST=cos_first, T_GRAD=t_grad,
                                        FREQS_GRAD=freqs_grad, ROWS=rows, BLOCK=block,
                                        **LAUNCH_OPTIONS)
    return _fold(t_partial, t_grad, t, scale), _fold(f_partial, freqs_grad, freqs, scale)


def _fold(partial, wanted, like, scale):
    """Sum the per-tile partials in a fixed order, in fp64, then scale as the CPU kernel does."""
    if not wanted:
        return like.new_empty(0)
    return partial.double().sum(dim=0).to(like.dtype) * scale
