"""Sinusoidal time embeddings in one fused pass (DESIGN.md section 5).

Every common time embedding is ``[sin a, cos a]`` (or ``[cos a, sin a]``) of the arguments
``a[b, j] = (t[b] * freq[j]) * scale``, with a zero column when the width is odd; they differ in
the frequencies:

    diffusers   freq_j = exp(-ln(max_period) j / (half - downscale_freq_shift)), [sin, cos]
                (``flip_sin_to_cos=True`` gives [cos, sin])
    ADM / DiT   the same with downscale_freq_shift = 0 and [cos, sin]
    Fourier     freq_j = W_j, scale = 2 pi (Gaussian Fourier features, W fixed or learned)

Eager PyTorch makes five to seven passes over the [B, dim] result (products, sin, cos, cat,
flip, pad); the fused kernel computes each argument once, its sin and cos together, and writes
the result once, in the dtype the network wants. The frequencies are computed with the same
PyTorch operations as the source formulas, and the arguments with the same roundings, so results
match diffusers' and ADM's to within an ulp or two of sin and cos.

Gradients reach t (``d sin(a)/dt = freq * scale * cos(a)``) and the frequencies (learned Fourier
W) through a fused backward. Double backward is not supported: differentiating those gradients
again (create_graph=True, then a second backward through them) raises NotImplementedError.
"""
import math
import numbers

import torch

from . import _ops
from ._checks import FLOAT_DTYPES, describe, is_integer, real_number

# Named conventions: the arguments of timestep_embedding that each source uses.
CONVENTIONS = {
    "diffusers": {"flip_sin_to_cos": False, "downscale_freq_shift": 1.0},
    "adm": {"flip_sin_to_cos": True, "downscale_freq_shift": 0.0},
    "dit": {"flip_sin_to_cos": True, "downscale_freq_shift": 0.0},
}


def convention(name):
    """The timestep_embedding keyword arguments of a named convention ("diffusers", "adm", "dit")::

        >>> fastflow.timestep_embedding(t, 256, **fastflow.embeddings.convention("dit"))
    """
    if not isinstance(name, str) or name not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {', '.join(map(repr, CONVENTIONS))}, "
                         f"got {name!r}")
    return dict(CONVENTIONS[name])


def timestep_embedding(t, dim, *, max_period=10000, flip_sin_to_cos=False, downscale_freq_shift=1.0,
                       scale=1.0, dtype=None):
    """Sinusoidal embedding of timesteps, equal to diffusers' ``get_timestep_embedding``.

    Args:
        t: [B] timesteps, integer or floating (diffusers passes 0..999, flow models t in [0, 1]).
        dim: width of the embedding; an odd dim ends with a zero column.
        max_period: the longest period, 10000 by default.
        flip_sin_to_cos: False gives [sin, cos], True gives [cos, sin].
        downscale_freq_shift: freq_j = exp(-ln(max_period) j / (dim // 2 - downscale_freq_shift)).
        scale: multiplies the arguments.
        dtype: dtype of the result; float32 by default (float64 when t is float64, which is then
            computed in float64; diffusers computes in float32 always).

    ADM and DiT use ``flip_sin_to_cos=True, downscale_freq_shift=0``, i.e.
    ``**fastflow.embeddings.convention("dit")``.

    Returns:
        [B, dim] tensor, differentiable in a floating t.

    Example::

        >>> t = torch.randint(0, 1000, (16,))
        >>> emb = fastflow.timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    """
    t = _times(t)
    _check_dim(dim)
    if (isinstance(max_period, bool) or not isinstance(max_period, numbers.Real)
            or not 0 < max_period < math.inf):
        raise ValueError(f"max_period: expected a finite positive number, got {max_period!r}")
    downscale_freq_shift = real_number(downscale_freq_shift, "downscale_freq_shift")
    scale = real_number(scale, "scale")
    half = dim // 2
    if half and half == downscale_freq_shift:
        raise ValueError(f"downscale_freq_shift: equal to dim // 2 = {half}, which divides by zero "
                         f"(diffusers returns NaN here); use a larger dim or a smaller shift")
    key = (half, float(max_period), float(downscale_freq_shift), t.dtype, t.device)
    freqs = _frequencies.get(key, t.device, lambda: _sinusoidal_frequencies(*key))
    return _ops.sinusoid(t, freqs, scale, flip_sin_to_cos, dim, _out_dtype(dtype, t))


def _sinusoidal_frequencies(half, max_period, downscale_freq_shift, dtype, device):
    """diffusers' frequencies, operation for operation (so the same bits)."""
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=dtype, device=device)
    return torch.exp(exponent / (half - downscale_freq_shift))


_frequencies = _ops.DeviceCache()


def fourier_embedding(t, W, *, log=False, flip_sin_to_cos=False, dtype=None):
    """Gaussian Fourier features ``[sin(2 pi t W), cos(2 pi t W)]``, as diffusers'
    GaussianFourierProjection computes them.

    Args:
        t: [B] times (noise levels with ``log=True``).
        W: [H] frequencies, usually ``torch.randn(H) * scale``; a learned W gets its gradient.
        log: embed log(t) instead of t.
        flip_sin_to_cos: [cos, sin] instead of [sin, cos].
        dtype: dtype of the result; by default float32, float64 when t or W is float64.

    Returns:
        [B, 2H] tensor, differentiable in t and W.

    Example::

        >>> W = torch.randn(128) * 16
        >>> emb = fastflow.fourier_embedding(sigmas, W, log=True)      # [B, 256]
    """
    t = _times(t)
    if not isinstance(W, torch.Tensor) or W.dtype not in FLOAT_DTYPES:   # as t's check
        raise TypeError(f"W: expected a 1-D floating tensor of frequencies, got {describe(W)}")
    if W.dim() != 1:
        raise ValueError(f"W: expected a 1-D floating tensor of frequencies, got {describe(W)}")
    if W.device != t.device:
        raise ValueError(f"W: expected a tensor on {t.device} (the device of t), got {W.device}")
    math_dtype = torch.promote_types(t.dtype, _ops.math_dtype(W.dtype))
    t, freqs = t.to(math_dtype), W.to(math_dtype)
    if log:
        t = torch.log(t)
    return _ops.sinusoid(t, freqs, 2 * math.pi, flip_sin_to_cos, 2 * freqs.shape[0],
                         _out_dtype(dtype, t))


def _times(t):
    """t as a 1-D tensor in the math type: float32, or float64 for float64 t."""
    if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t: expected a 1-D tensor of times, got {describe(t)}")
    if t.dim() != 1:
        raise ValueError(f"t: expected a 1-D tensor [B] of times, got shape {tuple(t.shape)}")
    return t.to(_ops.math_dtype(t.dtype))


def _check_dim(dim):
    if not is_integer(dim) or dim < 1:
        raise ValueError(f"dim: expected a positive integer, got {dim!r}")


def _out_dtype(dtype, t):
    if dtype is None:
        return t.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    return dtype
