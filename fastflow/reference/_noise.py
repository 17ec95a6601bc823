"""Reference of the sampler's counter-based Gaussian noise (fastflow/_noise.py states the
definition), in PyTorch operators: integer hashing in 32-bit lanes of int64 tensors, then
Box-Muller with fastflow's own log and cos, operation for operation as the kernels compute them
(csrc/noise_cpu.cpp, triton_kernels/noise.py). fp32 adds, multiplies, square roots and bit
operations round the same everywhere, so all of them give the same bits."""
import torch

from .._noise import mix32, sample_keys

# Cephes' logf: ln(m 2^e) = e ln 2 + ln(m), ln 2 in two parts, and its polynomial for ln(1 + x).
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
             1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
             3.3333331174e-1)
_SQRT_HALF = 0.707106781186547524
# Cephes' sinf and cosf polynomials on |x| <= pi/4 (those of csrc/sincos_poly.h).
_SIN_POLY = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_POLY = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)
_TWO_PI = 6.283185307179586
_ROUND_MAGIC = 12582912.0   # 1.5 * 2^23: adding and subtracting it rounds to an integer


def gaussian(seed, ids, step, shape, dtype=torch.float32):
    """Standard normal noise of `shape` ([B, ...]) on ids' device, sample b a function of
    (seed, ids[b], step) only. seed and step: Python ints; ids: [B] integers."""
    n = 1
    for size in shape[1:]:
        n *= size
    k0, k1 = (k[:, None] for k in sample_keys(seed, ids.to(torch.int64), step))   # [B, 1]
    index = torch.arange(n, dtype=torch.int64, device=ids.device)
    u1 = _uniform(mix32(k0 ^ mix32((2 * index) ^ k1)))
    u2 = _uniform(mix32(k0 ^ mix32((2 * index + 1) ^ k1)))
    z = _sqrt(-2.0 * _log(u1)) * _cos_two_pi(u2)
    return z.reshape(shape).to(dtype)


def _sqrt(x):
    """The correctly rounded float32 square root: through float64, whose rounding to float32
    is innocuous for sqrt (53 >= 2 * 24 + 2 bits). torch.sqrt on CPU float32 tensors is not
    correctly rounded (it differed in about 1 value in 6 here)."""
    return torch.sqrt(x.double()).float()


def _uniform(bits):
    """The top 24 bits as a float32 in (0, 1]."""
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _log(u):
    """ln u for normal positive float32 u (Cephes' logf, branch free)."""
    bits = u.view(torch.int32)
    e = (bits >> 23) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)          # u = m 2^e, m in [1/2, 1)
    small = m < _SQRT_HALF
    x = torch.where(small, m + m, m) - 1.0
    e = (e - small.to(torch.int32)).to(torch.float32)
    z = x * x
    y = torch.full_like(x, _LOG_POLY[0])
    for c in _LOG_POLY[1:]:
        y = y * x + c
    y = (y * x) * z
    y = y + _LN2_LO * e
    y = y + -0.5 * z
    return (x + y) + _LN2_HI * e


def _cos_two_pi(u):
    """cos(2 pi u) for float32 u in [0, 1]: u less its nearest quarter turn q / 4 (exact), the
    Cephes polynomials on the remainder, then the quadrant."""
    k = (4.0 * u + _ROUND_MAGIC) - _ROUND_MAGIC
    q = k.to(torch.int32)
    x = (u - k * 0.25) * _TWO_PI
    z = x * x
    sin_x = ((_SIN_POLY[0] * z + _SIN_POLY[1]) * z + _SIN_POLY[2]) * z * x + x
    cos_x = ((_COS_POLY[0] * z + _COS_POLY[1]) * z + _COS_POLY[2]) * z * z - 0.5 * z + 1.0
    # cos(x + q pi/2) = (cos x, -sin x, -cos x, sin x)[q mod 4]
    base = torch.where((q & 1) == 1, sin_x, cos_x)
    return torch.where(((q + 1) & 2) == 2, -base, base)
