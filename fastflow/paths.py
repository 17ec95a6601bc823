"""Probability paths from noise x0 (t = 0) to data x1 (t = 1), DESIGN.md section 3.

An affine Gaussian path is given by two schedules:

    x_t = alpha_t * x1 + sigma_t * x0          u_t = d_alpha_t * x1 + d_sigma_t * x0

and each path object is callable on a t tensor, returning ``(alpha_t, sigma_t, d_alpha_t,
d_sigma_t)``. Paths with an extra noise term (torchcfm's I-CFM and Schrodinger bridge) also read
a third tensor ``noise``. Every path turns t into the per-sample coefficient matrix that the
fused kernels consume::

    >>> path = fastflow.paths.Cosine()
    >>> alpha, sigma, d_alpha, d_sigma = path(torch.tensor([0.0, 0.5, 1.0]))
    >>> path.coefficients(torch.tensor([0.5])).shape      # [B, outputs (x_t, u_t), inputs]
    torch.Size([1, 2, 2])

Paths are plain PyTorch and differentiable in t. When t needs no gradient, the fused ops get the
built-in paths' coefficients from one call of the backend instead (``coefficients``); a path of
your own (a subclass of ``AffinePath`` defining ``__call__``) always runs its formulas. Some
derivatives are infinite at an end of [0, 1] (LinearVP and VP at t = 1, Polynomial with n < 1
at t = 0): that is the math of the path, and the target there is inf or nan exactly as the
eager formula gives it.
"""
import math

import torch

from ._checks import formula_time, real_number
from ._ops import coefficient_builder, coefficient_matrix

__all__ = ["Path", "AffinePath", "CondOT", "Polynomial", "Cosine", "LinearVP", "VP", "TargetCFM",
           "ConstantNoise", "SchrodingerBridge", "get_path"]


class Path:
    """Base of all paths: maps t [G] to coefficients [G, 2, K] over the inputs (x0, x1[, noise])."""

    #: Whether the path reads a third input ``noise`` beside x0 and x1.
    uses_noise = False

    def coefficients(self, t):
        """Rows (x_t, u_t), columns (x0, x1[, noise]) for each entry of the 1-D tensor t."""
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class AffinePath(Path):
    """x_t = alpha_t x1 + sigma_t x0; subclasses define ``__call__(t) -> (alpha, sigma, d_alpha,
    d_sigma)``."""

    def __call__(self, t):
        raise NotImplementedError

    def coefficients(self, t):
        alpha, sigma, d_alpha, d_sigma = self(t)
        return coefficient_matrix([sigma, alpha, d_sigma, d_alpha], 2, 2)


def _floating(t):
    """t itself if floating, else in the default float type, as PyTorch's float ops promote it
    (a matrix built in an integer t's type would truncate sigma)."""
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _parameter(path, name, value):
    """A path's parameter as a float: a finite real number (a Python or NumPy number, or a
    one-element tensor). Each path then checks its own range."""
    return real_number(value, f"{path}: {name}",
                       "a path's parameters are constants (learning them is not supported)")


class CondOT(AffinePath):
    """Conditional optimal transport: alpha_t = t, sigma_t = 1 - (1 - sigma_min) t.

    With sigma_min = 0 this is the rectified-flow line x_t = t x1 + (1 - t) x0, target x1 - x0,
    computed bit-identically to those eager expressions on CPU in fp32.
    """

    def __init__(self, sigma_min=0.0):
        sigma_min = _parameter("CondOT", "sigma_min", sigma_min)
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"CondOT: sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = sigma_min

    def __call__(self, t):
        one = torch.ones_like(t)
        slope = 1.0 - self.sigma_min
        return t, 1 - slope * t, one, -slope * one


class TargetCFM(CondOT):
    """torchcfm's TargetConditionalFlowMatcher (Lipman et al.): mu_t = t x1, sigma_t =
    1 - (1 - sigma) t, target (x1 - (1 - sigma) x_t) / sigma_t.

    Here x0 is the Gaussian sample that torchcfm calls epsilon; the target then simplifies to
    x1 - (1 - sigma) x0, which makes this CondOT with sigma_min = sigma. As in torchcfm, sigma
    may be 1 (sigma_t = 1, target x1).
    """

    def __init__(self, sigma=0.0):
        sigma = _parameter("TargetCFM", "sigma", sigma)
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"TargetCFM: sigma must be in [0, 1], got {sigma}")
        self.sigma_min = sigma

    def __repr__(self):   # its own argument's name, which the stored sigma_min is not
        return f"TargetCFM(sigma={self.sigma_min!r})"


class Polynomial(AffinePath):
    """alpha_t = t^n, sigma_t = 1 - t^n (flow_matching's PolynomialConvexScheduler)."""

    def __init__(self, n=2.0):
        n = _parameter("Polynomial", "n", n)
        if not n > 0:
            raise ValueError(f"Polynomial: n must be positive, got {n}")
        self.n = n

    def __call__(self, t):
        alpha = t ** self.n
        d_alpha = self.n * t ** (self.n - 1.0)
        return alpha, 1 - alpha, d_alpha, -d_alpha


class Cosine(AffinePath):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def __call__(self, t):
        angle = (math.pi / 2) * t
        sin, cos = torch.sin(angle), torch.cos(angle)
        return sin, cos, (math.pi / 2) * cos, -(math.pi / 2) * sin


class LinearVP(AffinePath):
    """alpha_t = t, sigma_t = sqrt(1 - t^2): variance preserving with a linear mean."""

    def __call__(self, t):
        sigma = torch.sqrt(1 - t ** 2)
        return t, sigma, torch.ones_like(t), -t / sigma


class VP(AffinePath):
    """The variance-preserving path of score SDEs with a linear beta schedule:
    alpha_t = exp(-T/2), T = (1-t)^2 (beta_max - beta_min)/2 + (1-t) beta_min,
    sigma_t = sqrt(1 - alpha_t^2)."""

    def __init__(self, beta_min=0.1, beta_max=20.0):
        beta_min, beta_max = _parameter("VP", "beta_min", beta_min), _parameter("VP", "beta_max",
                                                                                beta_max)
        if not 0.0 <= beta_min <= beta_max or beta_max == 0.0:
            # beta_max = 0 would add no noise: sigma_t = 0 for every t, and u_t 0 / 0.
            raise ValueError(f"VP: need 0 <= beta_min <= beta_max and beta_max > 0, got "
                             f"beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def __call__(self, t):
        s = 1 - t
        spread = self.beta_max - self.beta_min
        big_t = 0.5 * s ** 2 * spread + s * self.beta_min
        d_big_t = -s * spread - self.beta_min
        alpha = torch.exp(-0.5 * big_t)
        sigma = torch.sqrt(1 - torch.exp(-big_t))
        d_alpha = -0.5 * d_big_t * alpha
        d_sigma = 0.5 * d_big_t * torch.exp(-big_t) / sigma
        return alpha, sigma, d_alpha, d_sigma


class ConstantNoise(Path):
    """torchcfm's ConditionalFlowMatcher (I-CFM): x_t = t x1 + (1 - t) x0 + sigma * noise,
    target x1 - x0."""

    uses_noise = True

    def __init__(self, sigma=0.0):
        sigma = _parameter("ConstantNoise", "sigma", sigma)
        if not sigma >= 0:
            raise ValueError(f"ConstantNoise: sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def coefficients(self, t):
        t = _floating(t)
        return coefficient_matrix([1 - t, t, self.sigma, -1, 1, 0], 2, 3, len(t), t.dtype,
                                  t.device)


class SchrodingerBridge(Path):
    """torchcfm's SchrodingerBridgeConditionalFlowMatcher: x_t = t x1 + (1 - t) x0 + s_t noise
    with s_t = sigma sqrt(t (1 - t)); target x1 - x0 + (1 - 2t) / (2 t (1 - t) + 1e-8) * s_t noise.
    """

    uses_noise = True

    def __init__(self, sigma=1.0):
        sigma = _parameter("SchrodingerBridge", "sigma", sigma)
        if not sigma > 0:
            raise ValueError(f"SchrodingerBridge: sigma must be positive, got {sigma}")
        self.sigma = sigma

    def coefficients(self, t):
        t = _floating(t)
        s_t = self.sigma * torch.sqrt(t * (1 - t))
        ratio = (1 - 2 * t) / (2 * t * (1 - t) + 1e-8)
        return coefficient_matrix([1 - t, t, s_t, -1, 1, ratio * s_t], 2, 3, len(t), t.dtype,
                                  t.device)


_BY_NAME = {
    "cond_ot": CondOT,
    "polynomial": Polynomial,
    "cosine": Cosine,
    "linear_vp": LinearVP,
    "vp": VP,
    "target_cfm": TargetCFM,
    "constant_noise": ConstantNoise,
    "schrodinger_bridge": SchrodingerBridge,
}


def get_path(path=None):
    """A Path from a Path, a name (with the default parameters of its class), or None (CondOT)."""
    if path is None:
        return CondOT()
    if isinstance(path, Path):
        return path
    if isinstance(path, str):
        try:
            return _BY_NAME[path]()
        except KeyError:
            raise ValueError(f"path: unknown name {path!r}; expected one of "
                             f"{', '.join(map(repr, _BY_NAME))} or a fastflow.paths.Path") from None
    raise TypeError(f"path: expected a fastflow.paths.Path, a name or None, got "
                    f"{type(path).__name__}")


# The built-in paths, as (name, parameters) of the builders that repeat their formulas
# (csrc/paths_cpu.cpp, triton_kernels/paths.py). Exact types: a subclass may change the formulas.
_NATIVE = {
    CondOT: lambda p: ("cond_ot", [p.sigma_min]),
    TargetCFM: lambda p: ("cond_ot", [p.sigma_min]),
    Polynomial: lambda p: ("polynomial", [p.n]),
    Cosine: lambda p: ("cosine", []),
    LinearVP: lambda p: ("linear_vp", []),
    VP: lambda p: ("vp", [p.beta_min, p.beta_max]),
    ConstantNoise: lambda p: ("constant_noise", [p.sigma]),
    SchrodingerBridge: lambda p: ("schrodinger_bridge", [p.sigma]),
}


def value_key(path):
    """A hashable value that names the path's formulas, for caches of what they compute; None
    for a path of the user's own, whose formulas may change under the same parameters. From
    _NATIVE's parameters (all a built-in path holds), not vars(path): torch.compile before
    PyTorch 2.13 cannot trace ``vars(path).items()`` (a graph break fullgraph refuses)."""
    native = _NATIVE.get(type(path))
    return None if native is None else (type(path), *native(path)[1])


def coefficients(path, t, dtype, backend=None):
    """``path.coefficients(t).to(dtype)`` for times t [G] of any float type (computed in
    fp64: ``_checks.formula_time``); `backend` as in ``_ops.coefficient_builder``.

    For the paths of _NATIVE, when t needs no gradient and nothing traces the call, the C++
    (CPU) or Triton (GPU) backend computes the same formulas in the same order in one call,
    without the 4 to 20 tiny tensor ops (kernel launches on a GPU) that cost more than the fused
    kernel itself on a small batch. The results are PyTorch's bits for the arithmetic paths
    (CondOT, Target-CFM, constant noise; on CPU also Polynomial with n = 1, 2 or 3, whose powers
    torch.pow multiplies out); where sqrt, sin, exp or pow come in, the functions (on CPU
    csrc/vector_math.h's) may round differently by an ulp or two of float64, which a cancelling
    difference (1 - t^n near t = 1) can magnify to a few hundred float64 ulps
    (csrc/paths_cpu.cpp says more)."""
    coeffs = _native(path, t, dtype, backend, residual=False)
    return coeffs if coeffs is not None else path.coefficients(formula_time(t)).to(dtype)


def velocity_residual(path, t, dtype, backend=None):
    """The velocity loss's [G, 1, 1 + K] rows (1, -u_t) over (pred, x0, x1[, noise]) in dtype,
    the bits of ``coefficients(path, t, dtype, backend)[:, 1]`` negated behind a column of ones,
    written by the backend's builder in one pass (no [G, 2, K] matrix, no copy); None where
    ``coefficients`` would take PyTorch's formulas (or the builder does not build the path)."""
    return _native(path, t, dtype, backend, residual=True)


def _native(path, t, dtype, backend, residual):
    native = _NATIVE.get(type(path))
    build = coefficient_builder(t, "path_coefficients", backend) if native is not None else None
    return build(t, *native(path), dtype, residual) if build is not None else None
