"""The sampler's counter-based Gaussian noise in Triton (fastflow/_noise.py states the
definition; fastflow/reference/_noise.py writes out its operations, which this kernel repeats
one for one). Integer hashing in uint32 and Box-Muller with fastflow's own polynomial ln and cos:
fp32 adds, multiplies and a correctly rounded square root, not contracted (LAUNCH_OPTIONS), so
the GPU gives the bits of the CPU kernel and the reference.

A program covers a [ROWS, BLOCK] tile of (samples, elements); the seed and step arrive as raw
32-bit halves and are hashed in the kernel, so a step launches one kernel and copies nothing
from the host (capturable in a CUDA graph).
"""
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS, negate, on_tensors_device, row_tile

_MASK = 0xFFFFFFFF


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _sample_key(start, seed_lo, seed_hi, id_lo, id_hi, step):
    """One chain of fastflow._noise.sample_keys from `start` (one of its CHAIN_STARTS)."""
    h = _mix32(tl.full([], start, tl.uint32) ^ seed_lo.to(tl.uint32))
    h = _mix32(h ^ seed_hi.to(tl.uint32))
    h = _mix32(_mix32(id_lo ^ h) ^ id_hi)
    return _mix32(h ^ step.to(tl.uint32))


@triton.jit
def _uniform(bits):
    """The top 24 bits as a float32 in (0, 1]."""
    return ((bits >> 8).to(tl.int32).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _log(u):
    """ln u for normal positive u (Cephes' logf, branch free)."""
    bits = u.to(tl.uint32, bitcast=True)
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.707106781186547524
    e = ((bits >> 23).to(tl.int32) - 126 - small.to(tl.int32)).to(tl.float32)
    x = tl.where(small, m + m, m) - 1.0
    z = x * x
    y = 7.0376836292e-2 * x + -1.1514610310e-1
    y = y * x + 1.1676998740e-1
    y = y * x + -1.2420140846e-1
    y = y * x + 1.4249322787e-1
    y = y * x + -1.6668057665e-1
    y = y * x + 2.0000714765e-1
    y = y * x + -2.4999993993e-1
    y = y * x + 3.3333331174e-1
    y = (y * x) * z
    y = y + -2.12194440e-4 * e
    y = y + -0.5 * z
    return (x + y) + 0.693359375 * e


@triton.jit
def _cos_two_pi(u):
    """cos(2 pi u) for u in [0, 1]: the nearest quarter turn off (exactly), Cephes' polynomials
    on the rest, then the quadrant."""
    k = (4.0 * u + 12582912.0) - 12582912.0
    q = k.to(tl.int32)
    x = (u - k * 0.25) * 6.283185307179586
    z = x * x
    sin_x = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * x + x
    cos_x = (((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z
             - 0.5 * z + 1.0)
    base = tl.where((q & 1) == 1, sin_x, cos_x)
    return tl.where(((q + 1) & 2) == 2, negate(base), base)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step"])
def _gaussian_kernel(ids_ptr, out_ptr, batch, n, seed_lo, seed_hi, step, col_tiles,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // col_tiles).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = (pid % col_tiles) * BLOCK + tl.arange(0, BLOCK)   # int32: n < 2^31
    row_ok, col_ok = rows < batch, cols < n
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    id_lo, id_hi = (ids & 0xFFFFFFFF).to(tl.uint32), ((ids >> 32) & 0xFFFFFFFF).to(tl.uint32)
    # The chains' starts: fastflow._noise.CHAIN_STARTS.
    k0 = _sample_key(0x6A09E667, seed_lo, seed_hi, id_lo, id_hi, step)[:, None]
    k1 = _sample_key(0xBB67AE85, seed_lo, seed_hi, id_lo, id_hi, step)[:, None]
    i = cols.to(tl.uint32)[None, :]
    u1 = _uniform(_mix32(k0 ^ _mix32((2 * i) ^ k1)))
    u2 = _uniform(_mix32(k0 ^ _mix32((2 * i + 1) ^ k1)))
    z = tl.sqrt_rn(-2.0 * _log(u1)) * _cos_two_pi(u2)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], z.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@on_tensors_device
def gaussian(ids, seed, step, out):
    """Fill contiguous out [B, ...] with the noise of samples ids [B] (int64) at `step`; seed
    and step are Python ints (seed as its 64-bit two's complement)."""
    batch = ids.shape[0]
    if out.numel() == 0:
        return
    n = out.numel() // batch
    rows, block = row_tile(n)
    col_tiles = triton.cdiv(n, block)
    grid = (triton.cdiv(batch, rows) * col_tiles,)
    _gaussian_kernel[grid](ids, out, batch, n, seed & _MASK, (seed >> 32) & _MASK, step & _MASK,
                           col_tiles, ROWS=rows, BLOCK=block, **LAUNCH_OPTIONS)
