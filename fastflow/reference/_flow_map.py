"""Reference of fastflow.flow_map_loss, term by term in eager PyTorch."""
from math import prod

import torch

from .._checks import batch_time
from ..paths import get_path


def flow_map_loss(model, x0, x1, t, s=None, u=None, path=None, match_weight=1.0,
                  consistency_weight=1.0, identity_weight=1.0, reduction="mean", **model_kwargs):
    """fastflow.flow_map_loss's terms, each the eager mean square it names: the match term
    |phi(x0, 0, t) - x_t|^2, the consistency term |phi(phi(x_s, s, u), u, t) - phi(x_s, s, t)|^2
    and the identity term |phi(x_t, t, t) - x_t|^2, x_s and x_t on `path`, weighted, summed per
    sample and reduced. Differentiable in everything."""
    path = get_path(path)
    batch = x1.shape[0]
    math = torch.float64 if x1.dtype == torch.float64 else torch.float32
    t = batch_time(t, x1).expand(batch)
    s = batch_time(s, x1).expand(batch) if s is not None else torch.zeros_like(t)
    u = batch_time(u, x1).expand(batch) if u is not None else (s + t) / 2
    call_t, call_s, call_u = (v.to(math) for v in (t, s, u))

    def on_path(at):
        alpha, sigma, _, _ = path(at.view(-1, *([1] * (x1.dim() - 1))))
        return (alpha.to(math) * x1.to(math) + sigma.to(math) * x0.to(math)).to(x1.dtype)

    def mean_square(a, b):
        squares = (a.to(math) - b.to(math)) ** 2
        return squares.reshape(batch, prod(squares.shape[1:])).mean(dim=1)   # B = 0 too

    total = torch.zeros(batch, dtype=math, device=x1.device)
    if _runs(match_weight):
        jump = model(x0, torch.zeros_like(call_t), call_t, **model_kwargs)
        total = total + match_weight * mean_square(jump, on_path(t))
    if _runs(consistency_weight):
        x_s = on_path(s)
        two = model(model(x_s, call_s, call_u, **model_kwargs), call_u, call_t, **model_kwargs)
        total = total + consistency_weight * mean_square(two, model(x_s, call_s, call_t, **model_kwargs))
    if _runs(identity_weight):
        x_t = on_path(t)
        total = total + identity_weight * mean_square(model(x_t, call_t, call_t, **model_kwargs), x_t)
    if reduction == "none":
        return total
    return total.mean() if reduction == "mean" else total.sum()


def _runs(weight):
    """Whether a term is computed: for a tensor weight (per sample), always; else unless 0."""
    return isinstance(weight, torch.Tensor) or weight != 0
