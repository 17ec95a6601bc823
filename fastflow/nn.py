"""Drop-in time-embedding layers built on the fused kernels.

    SinusoidalEmbedding   t [B] -> [B, dim], diffusers / ADM / DiT conventions
    FourierEmbedding      t [B] -> [B, dim], Gaussian Fourier features, W fixed or learned
    TimestepEmbedder      DiT's TimestepEmbedder: sinusoidal embedding, then Linear-SiLU-Linear

Each returns its embedding in the dtype of the layer that consumes it where that is known, so a
bf16 network gets a bf16 embedding straight from the kernel.
"""
import torch
from torch import nn

from . import embeddings
from ._checks import is_integer, real_number


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal timestep embedding (``fastflow.timestep_embedding``) as a module.

    Args:
        dim: embedding width.
        convention: "diffusers" ([sin, cos], downscale_freq_shift=1), "adm" or "dit" ([cos, sin],
            shift 0); ``flip_sin_to_cos`` and ``downscale_freq_shift`` override it.
        max_period, scale: as in ``fastflow.timestep_embedding``.

    Example (what diffusers' ``Timesteps(320, flip_sin_to_cos=True, downscale_freq_shift=0)``
    computes)::

        >>> embed = fastflow.nn.SinusoidalEmbedding(320, convention="adm")
        >>> embed(torch.tensor([999, 500]))                 # [2, 320]
    """

    def __init__(self, dim, *, convention="diffusers", max_period=10000, flip_sin_to_cos=None,
                 downscale_freq_shift=None, scale=1.0):
        super().__init__()
        options = embeddings.convention(convention)
        if flip_sin_to_cos is not None:
            options["flip_sin_to_cos"] = flip_sin_to_cos
        if downscale_freq_shift is not None:
            options["downscale_freq_shift"] = downscale_freq_shift
        self.dim = dim
        self.options = dict(options, max_period=max_period, scale=scale)
        # Fail early on bad arguments; on the meta device no backend is chosen or run.
        embeddings.timestep_embedding(torch.zeros(1, device="meta"), dim, **self.options)

    def forward(self, t, dtype=None):
        return embeddings.timestep_embedding(t, self.dim, dtype=dtype, **self.options)

    def extra_repr(self):
        return f"{self.dim}, " + ", ".join(f"{k}={v}" for k, v in self.options.items())


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features ``[sin(2 pi t W), cos(2 pi t W)]`` with W ~ N(0, scale^2).

    Args:
        dim: embedding width (even); W has dim // 2 entries.
        scale: standard deviation of W (16 in score-SDE models).
        learnable: train W (a Parameter with gradients) or keep it fixed (a Parameter without
            gradients, so it is saved with the model, as diffusers does).
        log: embed log(t), for noise levels sigma.
        flip_sin_to_cos: [cos, sin] instead of [sin, cos].

    Example::

        >>> embed = fastflow.nn.FourierEmbedding(256, scale=16.0, log=True)
        >>> embed(sigmas)                                   # [B, 256]
    """

    def __init__(self, dim, *, scale=1.0, learnable=False, log=False, flip_sin_to_cos=False):
        super().__init__()
        if not is_integer(dim) or dim < 2 or dim % 2:
            raise ValueError(f"dim: expected a positive even integer, got {dim!r}")
        scale = real_number(scale, "scale")
        self.weight = nn.Parameter(torch.randn(int(dim) // 2) * scale, requires_grad=learnable)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, t, dtype=None):
        """[B, dim] features of t [B], computed in fp32 (fp64 for fp64 t or W), in `dtype`; by
        default, when the module was cast to 16 bits (``.half()``), in the type diffusers'
        GaussianFourierProjection then gives: t's and W's promoted (fp16 for fp16 t, fp32 for
        fp32 t)."""
        if (dtype is None and self.weight.dtype in (torch.float16, torch.bfloat16)
                and isinstance(t, torch.Tensor)):
            dtype = torch.promote_types(t.dtype, self.weight.dtype)
        return embeddings.fourier_embedding(t, self.weight, log=self.log,
                                            flip_sin_to_cos=self.flip_sin_to_cos, dtype=dtype)

    def extra_repr(self):
        return (f"{2 * self.weight.shape[0]}, learnable={self.weight.requires_grad}, "
                f"log={self.log}, flip_sin_to_cos={self.flip_sin_to_cos}")


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: a sinusoidal embedding, then Linear-SiLU-Linear.

    Parameter names match DiT's (``mlp.0.weight``, ``mlp.2.bias``, ...), so DiT checkpoints load.

    Args:
        hidden_size: output width.
        frequency_embedding_size: width of the sinusoidal embedding (256 in DiT).
        convention, max_period: of the sinusoidal embedding (DiT: "dit", 10000).

    Example::

        >>> embedder = fastflow.nn.TimestepEmbedder(1152)
        >>> c = embedder(t)                                 # [B, 1152]
    """

    def __init__(self, hidden_size, frequency_embedding_size=256, *, convention="dit",
                 max_period=10000):
        super().__init__()
        self.embedding = SinusoidalEmbedding(frequency_embedding_size, convention=convention,
                                             max_period=max_period)
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True),
                                 nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t: expected a 1-D tensor of times, got {type(t).__name__}")
        # The embedding comes out in the dtype of the first Linear (autocast decides otherwise;
        # asked only where it exists: meta tensors have none). CPU and CUDA have it without
        # asking torch.amp.is_autocast_available, which torch.compile before PyTorch 2.13
        # cannot trace (a graph break fullgraph refuses).
        device = t.device.type
        autocast = ((device in ("cpu", "cuda") or torch.amp.is_autocast_available(device))
                    and torch.is_autocast_enabled(device))
        dtype = None if autocast else self.mlp[0].weight.dtype
        return self.mlp(self.embedding(t, dtype=dtype))
