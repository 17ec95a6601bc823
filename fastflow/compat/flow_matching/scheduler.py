"""Drop-in for ``flow_matching.path.scheduler`` (flow_matching 1.0.10).

    # from flow_matching.path.scheduler import CondOTScheduler, CosineScheduler
    from fastflow.compat.flow_matching.scheduler import CondOTScheduler, CosineScheduler

A scheduler maps times t (any shape) to a SchedulerOutput (alpha_t, sigma_t and their time
derivatives) of the path X_t = alpha_t X_1 + sigma_t X_0, plus the inverse of its signal-to-noise
ratio alpha_t / sigma_t (and, for a convex scheduler, of kappa_t = alpha_t). Same classes, names,
signatures and defaults as flow_matching's; the values are computed with the operators and in
the order flow_matching uses, so they are its values bit for bit, and they are plain PyTorch
(differentiable, usable under torch.func transforms). They are small [B] tensors: the streamed
work happens in ``fastflow.compat.flow_matching.path``, which reads them.

| scheduler                       | alpha_t             | sigma_t               |
|---------------------------------|---------------------|-----------------------|
| CondOTScheduler                 | t                   | 1 - t                 |
| PolynomialConvexScheduler(n)    | t^n                 | 1 - t^n               |
| VPScheduler(beta_min, beta_max) | exp(-T/2)           | sqrt(1 - exp(-T))     |
| LinearVPScheduler               | t                   | sqrt(1 - t^2)         |
| CosineScheduler                 | sin(pi t / 2)       | cos(pi t / 2)         |

with T = (1 - t)^2 (beta_max - beta_min) / 2 + (1 - t) beta_min for VP.

ScheduleTransformedModel turns a velocity model trained with one scheduler into the velocity
of the same coupling under another (the scale-time change of Lipman et al., "Flow Matching
Guide and Code", section 4.8); its output combination is one fused pass.
"""
import math
from abc import ABC, ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

__all__ = ["CondOTScheduler", "CosineScheduler", "ConvexScheduler", "PolynomialConvexScheduler",
           "ScheduleTransformedModel", "Scheduler", "VPScheduler", "LinearVPScheduler",
           "SchedulerOutput"]

# Under a sys.modules redirect of flow_matching.path.scheduler this module stands in for a
# package: an (empty) __path__ lets flow_matching's own submodules still be found below it
# (see fastflow.compat.flow_matching).
__path__ = []


@dataclass
class SchedulerOutput(metaclass=ABCMeta):   # an ABC only to register flow_matching's with it
    """alpha_t, sigma_t and their derivatives d_alpha_t, d_sigma_t at some times t."""

    alpha_t: Tensor = field(metadata={"help": "alpha_t"})
    sigma_t: Tensor = field(metadata={"help": "sigma_t"})
    d_alpha_t: Tensor = field(metadata={"help": "Derivative of alpha_t."})
    d_sigma_t: Tensor = field(metadata={"help": "Derivative of sigma_t."})


class Scheduler(ABC):
    """Base of the schedulers: ``scheduler(t) -> SchedulerOutput`` and ``snr_inverse``."""

    @abstractmethod
    def __call__(self, t: Tensor) -> SchedulerOutput:
        """alpha_t, sigma_t, d_alpha_t, d_sigma_t at times t in [0, 1] (any shape)."""

    @abstractmethod
    def snr_inverse(self, snr: Tensor) -> Tensor:
        """The t whose signal-to-noise ratio alpha_t / sigma_t is `snr`."""


class ConvexScheduler(Scheduler):
    """A scheduler with sigma_t = 1 - alpha_t (alpha_t is then called kappa_t)."""

    @abstractmethod
    def __call__(self, t: Tensor) -> SchedulerOutput:
        """alpha_t = kappa_t, sigma_t = 1 - kappa_t and their derivatives."""

    @abstractmethod
    def kappa_inverse(self, kappa: Tensor) -> Tensor:
        """The t with kappa_t = `kappa`."""

    def snr_inverse(self, snr: Tensor) -> Tensor:
        # snr = kappa / (1 - kappa)  <=>  kappa = snr / (1 + snr)
        return self.kappa_inverse(kappa=snr / (1.0 + snr))


class CondOTScheduler(ConvexScheduler):
    """Conditional optimal transport: alpha_t = t, sigma_t = 1 - t."""

    def __call__(self, t: Tensor) -> SchedulerOutput:
        return SchedulerOutput(alpha_t=t, sigma_t=1 - t, d_alpha_t=torch.ones_like(t),
                               d_sigma_t=-torch.ones_like(t))

    def kappa_inverse(self, kappa: Tensor) -> Tensor:
        return kappa


class PolynomialConvexScheduler(ConvexScheduler):
    """alpha_t = t^n, sigma_t = 1 - t^n (n > 0)."""

    def __init__(self, n: Union[float, int]) -> None:
        if not isinstance(n, (float, int)):
            raise AssertionError(f"PolynomialConvexScheduler: n must be a float or int, got "
                                 f"{type(n).__name__}")
        if not n > 0:
            raise AssertionError(f"PolynomialConvexScheduler: n must be positive, got {n}")
        self.n = n

    def __call__(self, t: Tensor) -> SchedulerOutput:
        power = t ** self.n
        slope = t ** (self.n - 1)
        return SchedulerOutput(alpha_t=power, sigma_t=1 - power, d_alpha_t=self.n * slope,
                               d_sigma_t=-self.n * slope)

    def kappa_inverse(self, kappa: Tensor) -> Tensor:
        return torch.pow(kappa, 1.0 / self.n)


class VPScheduler(Scheduler):
    """Variance preserving (score SDE's linear beta schedule from beta_min to beta_max)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min = beta_min
        self.beta_max = beta_max
        super().__init__()

    def __call__(self, t: Tensor) -> SchedulerOutput:
        low, spread = self.beta_min, self.beta_max - self.beta_min
        s = 1 - t
        big_t = 0.5 * s ** 2 * spread + s * low           # integral of beta from t to 1
        d_big_t = -s * spread - low
        alpha = torch.exp(-0.5 * big_t)
        decay = torch.exp(-big_t)
        sigma = torch.sqrt(1 - decay)
        return SchedulerOutput(alpha_t=alpha, sigma_t=sigma, d_alpha_t=-0.5 * d_big_t * alpha,
                               d_sigma_t=0.5 * d_big_t * decay / sigma)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        # alpha^2 = exp(-T) = snr^2 / (snr^2 + 1); solve the quadratic in s = 1 - t.
        big_t = -torch.log(snr ** 2 / (snr ** 2 + 1))
        low, spread = self.beta_min, self.beta_max - self.beta_min
        return 1 - ((-low + torch.sqrt(low ** 2 + 2 * spread * big_t)) / spread)


class LinearVPScheduler(Scheduler):
    """alpha_t = t, sigma_t = sqrt(1 - t^2)."""

    def __call__(self, t: Tensor) -> SchedulerOutput:
        sigma = (1 - t ** 2) ** 0.5
        return SchedulerOutput(alpha_t=t, sigma_t=sigma, d_alpha_t=torch.ones_like(t),
                               d_sigma_t=-t / sigma)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return torch.sqrt(snr ** 2 / (1 + snr ** 2))


class CosineScheduler(Scheduler):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def __call__(self, t: Tensor) -> SchedulerOutput:
        half_pi = math.pi / 2
        angle = half_pi * t
        sin, cos = torch.sin(angle), torch.cos(angle)
        return SchedulerOutput(alpha_t=sin, sigma_t=cos, d_alpha_t=half_pi * cos,
                               d_sigma_t=-half_pi * sin)

    def snr_inverse(self, snr: Tensor) -> Tensor:
        return 2.0 * torch.atan(snr) / math.pi


class ScheduleTransformedModel(torch.nn.Module):
    """A velocity model trained on `original_scheduler`'s path, as the velocity of the same
    coupling on `new_scheduler`'s path (no retraining).

    Time r of the new path corresponds to the time t_r of the original path with the same
    signal-to-noise ratio, t_r = snr_inverse(alpha_r / sigma_r), and to the scale
    s_r = sigma_r / sigma_{t_r}; the new velocity is
    u_r(x) = (ds_r / s_r) x + s_r (dt_r / dr) u_{t_r}(x / s_r).

    Args:
        velocity_model: called as ``velocity_model(x=x, t=t, **extras)``.
        original_scheduler: the model's scheduler; needs ``snr_inverse``.
        new_scheduler: the scheduler to sample with.
    """

    def __init__(self, velocity_model, original_scheduler: Scheduler, new_scheduler: Scheduler):
        super().__init__()
        self.model = velocity_model
        self.original_scheduler = original_scheduler
        self.new_scheduler = new_scheduler
        if not callable(getattr(original_scheduler, "snr_inverse", None)):
            raise AssertionError("ScheduleTransformedModel: the original scheduler must have a "
                                 "callable 'snr_inverse' method")

    def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
        from .path import _combine  # the fused a * x + b * y (path imports this module)

        new = self.new_scheduler(t=t)
        alpha_r, sigma_r, d_alpha_r, d_sigma_r = (new.alpha_t, new.sigma_t, new.d_alpha_t,
                                                  new.d_sigma_t)
        t_orig = self.original_scheduler.snr_inverse(alpha_r / sigma_r)
        old = self.original_scheduler(t=t_orig)
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = (old.alpha_t, old.sigma_t, old.d_alpha_t,
                                                  old.d_sigma_t)
        s_r = sigma_r / sigma_t
        # d t_r / dr from d(snr_t)/dt * dt_r/dr = d(snr_r)/dr.
        dt_r = (sigma_t * sigma_t * (sigma_r * d_alpha_r - alpha_r * d_sigma_r)
                / (sigma_r * sigma_r * (sigma_t * d_alpha_t - alpha_t * d_sigma_t)))
        ds_r = (sigma_t * d_sigma_r - sigma_r * d_sigma_t * dt_r) / (sigma_t * sigma_t)
        u_t = self.model(x=x / s_r, t=t_orig, **extras)
        return _combine([[ds_r / s_r, dt_r * s_r]], [x, u_t])[0]
