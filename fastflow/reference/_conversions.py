"""Reference of fastflow.convert: the formulas of DESIGN.md section 4, step by step."""
import torch

from .._checks import batch_time
from ..paths import get_path


def _safe(x, eps):
    return torch.where(x < 0, x.clamp(max=-eps), x.clamp(min=eps))


def convert(pred, x_t, t, path=None, src="epsilon", dst="velocity", eps=1e-6):
    """Go from (x_t, pred) to the data and noise estimates, then to the kind `dst`; math in fp32
    (fp64 for fp64), divisors kept at least `eps` away from zero. The schedules are evaluated in
    fp64, like fastflow's coefficients: near an end of [0, 1] an fp32 cos(pi t / 2) can come out
    with the wrong sign, and which side of zero a divisor lies on decides the result there."""
    math = torch.float64 if pred.dtype == torch.float64 else torch.float32
    t = batch_time(t, pred).view(-1, *([1] * (pred.dim() - 1)))
    alpha, sigma, d_alpha, d_sigma = (s.to(math) for s in get_path(path)(t))
    x, p = x_t.to(math), pred.to(math)
    if src == "data":
        data = p
        noise = (x - alpha * data) / _safe(sigma, eps)
    elif src == "epsilon":
        noise = p
        data = (x - sigma * noise) / _safe(alpha, eps)
    elif src == "score":
        noise = -sigma * p
        data = (x - sigma * noise) / _safe(alpha, eps)
    else:
        det = _safe(alpha * d_sigma - sigma * d_alpha, eps)
        data = (d_sigma * x - sigma * p) / det
        noise = (alpha * p - d_alpha * x) / det
    out = {"data": data, "epsilon": noise, "score": -noise / _safe(sigma, eps),
           "velocity": d_alpha * data + d_sigma * noise}[dst]
    return out.to(pred.dtype)
