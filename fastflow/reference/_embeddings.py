"""Reference of the sinusoidal time embeddings (DESIGN.md section 5), as their sources write them."""
import math

import torch


def sinusoid(t, freqs, scale, cos_first, dim):
    """``[sin a, cos a]`` (``[cos a, sin a]`` with cos_first) of ``a = (t[:, None] * freqs) * scale``,
    in the dtype of t, with a zero last column when dim is odd. t [B], freqs [H], dim 2H or 2H + 1."""
    a = (t[:, None] * freqs[None, :]) * scale
    halves = [torch.cos(a), torch.sin(a)] if cos_first else [torch.sin(a), torch.cos(a)]
    out = torch.cat(halves, dim=-1)
    if dim > out.shape[1]:
        out = torch.nn.functional.pad(out, (0, 1))
    return out


def sinusoid_backward(grad, t, freqs, scale, cos_first, t_grad, freqs_grad):
    """Gradients of ``sum(grad * sinusoid(t, freqs, scale, cos_first, dim))`` to t and freqs, in
    the math type of t; a gradient not asked for comes back empty."""
    half = freqs.shape[0]
    a = (t[:, None] * freqs[None, :]) * scale
    g_first, g_second = grad[:, :half].to(t.dtype), grad[:, half:2 * half].to(t.dtype)
    g_sin, g_cos = (g_second, g_first) if cos_first else (g_first, g_second)
    d_arg = g_sin * torch.cos(a) - g_cos * torch.sin(a)
    grad_t = (d_arg * freqs[None, :]).sum(dim=1) * scale if t_grad else t.new_empty(0)
    grad_freqs = (d_arg * t[:, None]).sum(dim=0) * scale if freqs_grad else freqs.new_empty(0)
    return grad_t, grad_freqs


def timestep_embedding(t, dim, max_period=10000, flip_sin_to_cos=False, downscale_freq_shift=1.0,
                       scale=1.0):
    """diffusers' ``get_timestep_embedding``, formula for formula (fp32 [B, dim])."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - downscale_freq_shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        # diffusers pads (0, 1, 0, 0): the same zero column, which PyTorch before 2.10 refuses to
        # append to 0 rows ("negative output size").
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def adm_timestep_embedding(t, dim, max_period=10000):
    """The ADM / DiT ``timestep_embedding``: ``[cos, sin]`` with freq_j = max_period^(-j / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def fourier_embedding(t, W, log=False, flip_sin_to_cos=False):
    """Gaussian Fourier features ``[sin(2 pi t W), cos(2 pi t W)]`` (of log t with log=True), as
    diffusers' GaussianFourierProjection computes them."""
    if log:
        t = torch.log(t)
    proj = t[:, None] * W[None, :] * 2 * math.pi
    halves = [torch.cos(proj), torch.sin(proj)] if flip_sin_to_cos else [torch.sin(proj), torch.cos(proj)]
    return torch.cat(halves, dim=-1)
