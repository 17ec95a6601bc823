"""Reference of fastflow.interpolate."""
import torch

from .._checks import batch_time
from ..paths import get_path
from ._affine import affine


def interpolate(x0, x1, t, path=None, noise=None):
    """(x_t, u_t) of `path` at t in eager PyTorch: the path's coefficients applied to
    (x0, x1[, noise]) with the math in fp32 (fp64 for fp64 tensors)."""
    path = get_path(path)
    math = torch.float64 if x1.dtype == torch.float64 else torch.float32
    coeffs = path.coefficients(batch_time(t, x1)).to(math)
    inputs = [x0, x1] + ([noise] if path.uses_noise else [])
    x_t, u_t = affine(inputs, coeffs)
    return x_t, u_t
