"""The per-sample affine family in Triton (DESIGN.md section 1).

    out[m][g, i] = sum_k coeffs[g, m, k] * in[k][g, i]        inputs and outputs viewed as [G, n]

One kernel, specialised at compile time on the arity (K inputs, M outputs), on the float type
of each stream (they may differ) and on how a block finds its coefficients: when a sample spans at least a block, every block lies inside one sample
and loads its K*M coefficients once as scalars; for tiny samples (2-D toy data, say) a block
covers many samples and gathers coefficients per element. Offsets are int64 throughout.
"""
import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, TILE, narrow, on_tensors_device, row_tile


@triton.jit
def _affine_kernel(ins, outs, coeffs_ptr, numel, n, K: tl.constexpr, M: tl.constexpr,
                   BLOCK: tl.constexpr, TILE_IN_GROUP: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    if TILE_IN_GROUP:
        tiles_per_group = tl.cdiv(n, BLOCK)
        g = pid // tiles_per_group
        start = g * n + (pid % tiles_per_group) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < (g + 1) * n
        coeff_base = coeffs_ptr + g * (M * K)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        # Clamp so masked-off lanes still point at a real sample: coefficient loads need no mask.
        coeff_base = coeffs_ptr + (tl.minimum(offs, numel - 1) // n) * (M * K)
    # Output m is stored before the inputs are read for output m + 1 (the cache serves the
    # re-reads): only the last output may lie on top of an input.
    for m in tl.static_range(M):
        c = tl.load(coeff_base + m * K)
        acc = c * tl.load(ins[0] + offs, mask=mask).to(c.dtype)
        for k in tl.static_range(1, K):
            c = tl.load(coeff_base + m * K + k)
            acc = acc + c * tl.load(ins[k] + offs, mask=mask).to(c.dtype)
        tl.store(outs[m] + offs, narrow(acc, outs[m].dtype.element_ty), mask=mask)


@triton.jit
def _reduction_tile(groups, n, tiles_per_group, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's [ROWS, BLOCK] tile of the reductions: ROWS groups side by side when samples
    are small, else one group split into tiles_per_group blocks. Returns the groups (rows), the
    element offsets and mask, and the index of each row's partial sum in [groups, tiles]."""
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // tiles_per_group) * ROWS + tl.arange(0, ROWS)
    cols = (pid % tiles_per_group) * BLOCK + tl.arange(0, BLOCK)
    offs = rows[:, None] * n + cols[None, :]
    mask = (rows[:, None] < groups) & (cols[None, :] < n)
    return rows, offs, mask, rows * tiles_per_group + pid % tiles_per_group


@triton.jit
def _dot_kernel(a, b, partial_ptr, groups, n, tiles_per_group, M: tl.constexpr, K: tl.constexpr,
                ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # In fp64 whatever the streams' type, as the CPU kernels sum: the products of fp32 or 16-bit
    # values are exact there, and sums that overflow fp32 (to inf, then inf - inf = NaN) do not.
    rows, offs, mask, slot = _reduction_tile(groups, n, tiles_per_group, ROWS, BLOCK)
    out = partial_ptr + slot * (M * K)
    for m in tl.static_range(M):
        am = tl.load(a[m] + offs, mask=mask, other=0).to(tl.float64)
        for k in tl.static_range(K):
            bk = tl.load(b[k] + offs, mask=mask, other=0).to(tl.float64)
            tl.store(out + m * K + k, tl.sum(am * bk, axis=1), mask=rows < groups)


@triton.jit
def _sqnorm_kernel(ins, coeffs_ptr, partial_ptr, groups, n, tiles_per_group, K: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # The residual is affine's single output, squared and summed per row.
    rows, offs, mask, slot = _reduction_tile(groups, n, tiles_per_group, ROWS, BLOCK)
    coeff = coeffs_ptr + tl.minimum(rows, groups - 1)[:, None] * K
    c = tl.load(coeff)
    r = c * tl.load(ins[0] + offs, mask=mask, other=0).to(c.dtype)
    for k in tl.static_range(1, K):
        c = tl.load(coeff + k)
        r = r + c * tl.load(ins[k] + offs, mask=mask, other=0).to(c.dtype)
    # Padding lanes out: their zeros times an infinite coefficient are NaN, not the loss's inf.
    # Squared and summed in fp64, as the CPU kernels do: r * r overflows fp32 from |r| = 2^64.
    r = tl.where(mask, r, 0.0).to(tl.float64)
    tl.store(partial_ptr + slot, tl.sum(r * r, axis=1), mask=rows < groups)


def _reduction_grid(n):
    """(rows, block, tiles_per_group) of the [ROWS, BLOCK] tiles over groups of n elements
    that the reductions use."""
    rows, block = row_tile(n)
    return rows, block, triton.cdiv(n, block)


@on_tensors_device
def affine(inputs, coeffs, outputs):
    """Write ``outputs[m] = sum_k coeffs[:, m, k] * inputs[k]`` (contiguous tensors, one shape)."""
    numel = inputs[0].numel()
    if numel == 0:
        return
    groups = coeffs.shape[0]
    n = numel // groups
    tile_in_group = n >= TILE // 2
    grid = (groups * triton.cdiv(n, TILE),) if tile_in_group else (triton.cdiv(numel, TILE),)
    _affine_kernel[grid](tuple(inputs), tuple(outputs), coeffs, numel, n, K=len(inputs),
                         M=len(outputs), BLOCK=TILE, TILE_IN_GROUP=tile_in_group,
                         **LAUNCH_OPTIONS)


@on_tensors_device
def affine_dot(a, b, groups):
    """Per-group dot products ``[groups, len(a), len(b)]`` in the math type of the inputs."""
    math = torch.float64 if a[0].dtype == torch.float64 else torch.float32
    numel = a[0].numel()
    if numel == 0 or groups == 0:
        return torch.zeros(groups, len(a), len(b), dtype=math, device=a[0].device)
    n = numel // groups
    rows, block, tiles_per_group = _reduction_grid(n)
    partial = torch.empty(groups, tiles_per_group, len(a), len(b), dtype=torch.float64,
                          device=a[0].device)
    grid = (triton.cdiv(groups, rows) * tiles_per_group,)
    _dot_kernel[grid](tuple(a), tuple(b), partial, groups, n, tiles_per_group, M=len(a), K=len(b),
                      ROWS=rows, BLOCK=block, **LAUNCH_OPTIONS)
    # Fold the per-tile sums in a fixed order, in fp64: deterministic run to run.
    return partial.sum(dim=1).to(math)


@on_tensors_device
def affine_sqnorm(inputs, coeffs):
    """Per-group ``sum_i (sum_k coeffs[g, 0, k] * inputs[k][g, i])**2`` in the math type."""
    groups, numel = coeffs.shape[0], inputs[0].numel()
    if numel == 0 or groups == 0:
        return torch.zeros(groups, dtype=coeffs.dtype, device=coeffs.device)
    n = numel // groups
    rows, block, tiles_per_group = _reduction_grid(n)
    partial = torch.empty(groups, tiles_per_group, dtype=torch.float64, device=coeffs.device)
    grid = (triton.cdiv(groups, rows) * tiles_per_group,)
    _sqnorm_kernel[grid](tuple(inputs), coeffs, partial, groups, n, tiles_per_group,
                         K=len(inputs), ROWS=rows, BLOCK=block, **LAUNCH_OPTIONS)
    return partial.sum(dim=1).to(coeffs.dtype)
