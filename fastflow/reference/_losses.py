"""Reference of fastflow.flow_matching_loss: build the target, then the eager MSE."""
from math import prod

import torch

from .._checks import batch_time
from ..paths import ConstantNoise, get_path
from ._interpolation import interpolate


def flow_matching_loss(pred, x0, x1, t, path=None, prediction="velocity", noise=None, weight=None,
                       reduction="mean"):
    """Per-sample mean of (pred - target)^2 in fp32 (fp64 when pred or x1 is fp64), weighted,
    then reduced."""
    path = get_path(path)
    math = torch.float64 if torch.float64 in (pred.dtype, x1.dtype) else torch.float32
    if prediction == "velocity" and type(path) is ConstantNoise:
        target = x1 - x0    # torchcfm's formula, which reads no noise
    elif prediction == "velocity":
        target = interpolate(x0, x1, t, path, noise)[1]
    elif prediction == "epsilon":
        target = x0
    elif prediction == "data":
        target = x1
    else:
        sigma = path(batch_time(t, x1))[1].view(-1, *([1] * (x1.dim() - 1)))
        target = -x0.to(math) / sigma.to(math).clamp(min=1e-6)
    err = (pred.to(math) - target.to(math)) ** 2
    per_sample = err.reshape(len(err), prod(err.shape[1:])).mean(dim=1)   # B = 0 too
    if weight is not None:
        per_sample = per_sample * weight.to(math)
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
