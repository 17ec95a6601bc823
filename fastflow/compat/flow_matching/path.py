"""Drop-in for ``flow_matching.path`` (flow_matching 1.0.10) on fastflow's fused kernels.

    # from flow_matching.path import AffineProbPath, CondOTProbPath
    # from flow_matching.path.scheduler import CondOTScheduler
    from fastflow.compat.flow_matching.path import AffineProbPath, CondOTProbPath
    from fastflow.compat.flow_matching.path.scheduler import CondOTScheduler

    path = AffineProbPath(scheduler=CondOTScheduler())
    sample = path.sample(x_0=noise, x_1=data, t=t)          # sample.x_t, sample.dx_t
    v = path.epsilon_to_velocity(eps_hat, sample.x_t, t[:, None])

Same classes, names, signatures and results as flow_matching's. ``AffineProbPath.sample`` computes
x_t = sigma_t x_0 + alpha_t x_1 and dx_t = d_sigma_t x_0 + d_alpha_t x_1 in one pass of
``fastflow._ops.affine`` (each input read once, both outputs written once) instead of four
multiplications and two additions; each conversion (target_to_velocity, epsilon_to_velocity,
velocity_to_target, velocity_to_epsilon, epsilon_to_target, target_to_epsilon) is one pass over
(x_t, prediction). The per-sample coefficients come from the scheduler's output through the very
formulas and operators flow_matching applies, and the kernel sums the terms in the order of
flow_matching's expression, so CPU results in fp32 and fp64 equal flow_matching's bit for bit;
fp16 / bf16 inputs are computed in fp32 and rounded once (flow_matching rounds every operator).
Like flow_matching, nothing is clamped: a conversion at an end of [0, 1] divides by zero.

The kernels take the cases where t broadcasts over trailing dimensions of the data (t of shape
[B], [B, 1, ..., 1], the data's own shape, or a scalar); other broadcasts (flow_matching lets
t's last dimension meet the data's last one), mixed shapes of the two inputs, integer data,
functorch transforms and gradients through a mixed-dtype result run the eager expression
instead, with flow_matching's semantics. Results are differentiable in the inputs and in t,
and ``torch.compile(fullgraph=True)`` traces them (the fused op is a registered custom op).

GeodesicProbPath, MixtureDiscreteProbPath and DiscretePathSample are flow_matching's own,
imported on first use (``pip install flow_matching``).
"""
import math
import numbers
import sys
from abc import ABC, ABCMeta, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ... import _ops
from ..._checks import FLOAT_DTYPES
from . import delegating_getattr
from . import scheduler
from .scheduler import CondOTScheduler, Scheduler

# (GeodesicProbPath, MixtureDiscreteProbPath and DiscretePathSample, flow_matching's own, are
# attributes too, loaded on first use; not in __all__, so that ``import *`` works without
# flow_matching.)
__all__ = ["ProbPath", "AffineProbPath", "CondOTProbPath", "PathSample"]

# Under a sys.modules redirect of flow_matching.path this module stands in for a package: an
# (empty) __path__ lets flow_matching's own submodules (geodesic, mixture, ...) still be found
# below it (see fastflow.compat.flow_matching).
__path__ = []
# ``fastflow.compat.flow_matching.path.scheduler`` names the scheduler module too, so that
# switching the ``flow_matching.`` prefix of every import line works.
sys.modules.setdefault(__name__ + ".scheduler", scheduler)

# flow_matching's names that are its own code here: name -> the module that defines it.
_DELEGATED = {
    "GeodesicProbPath": "flow_matching.path.geodesic",
    "MixtureDiscreteProbPath": "flow_matching.path.mixture",
    "DiscretePathSample": "flow_matching.path.path_sample",
}


__getattr__ = delegating_getattr(__name__, _DELEGATED)


@dataclass
class PathSample(metaclass=ABCMeta):
    """A sample of a conditional probability path: the source x_0, the target x_1, the times t,
    the point x_t ~ p_t(x | x_0, x_1) and the conditional velocity dx_t there."""

    x_1: Tensor = field(metadata={"help": "target samples X_1 (batch_size, ...)."})
    x_0: Tensor = field(metadata={"help": "source samples X_0 (batch_size, ...)."})
    t: Tensor = field(metadata={"help": "time samples t (batch_size, ...)."})
    x_t: Tensor = field(metadata={"help": "samples x_t ~ p_t(X_t), shape (batch_size, ...)."})
    dx_t: Tensor = field(metadata={"help": "conditional target dX_t, shape: (batch_size, ...)."})


class ProbPath(ABC):
    """Base of the probability paths: ``sample(x_0, x_1, t) -> PathSample``."""

    @abstractmethod
    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """A point of the path between x_0 and x_1 at times t [batch_size], and its target."""

    def assert_sample_shape(self, x_0: Tensor, x_1: Tensor, t: Tensor):
        """AssertionError unless t is [batch_size] and x_0, x_1 share that batch size."""
        if t.ndim != 1:
            raise AssertionError(f"The time vector t must have shape [batch_size]; got shape "
                                 f"{tuple(t.shape)}.")
        if not t.shape[0] == x_0.shape[0] == x_1.shape[0]:
            raise AssertionError(f"The time vector t must have one entry per sample: t has "
                                 f"{t.shape[0]}, x_0 {x_0.shape[0]} and x_1 {x_1.shape[0]}.")


class AffineProbPath(ProbPath):
    """X_t = alpha_t X_1 + sigma_t X_0 with (alpha_t, sigma_t) from `scheduler`, in fused passes.

    Args:
        scheduler: gives alpha_t, sigma_t, d_alpha_t and d_sigma_t at times t (e.g.
            ``CondOTScheduler()``; any ``Scheduler``).
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """x_t = sigma_t x_0 + alpha_t x_1 and dx_t = d_sigma_t x_0 + d_alpha_t x_1, one pass.

        Args:
            x_0: source samples [batch_size, ...].
            x_1: target samples, like x_0.
            t: times in [0, 1], [batch_size].
        """
        self.assert_sample_shape(x_0=x_0, x_1=x_1, t=t)
        out = self.scheduler(t)
        alpha, sigma, d_alpha, d_sigma = (_per_sample(v, x_1, name) for v, name in (
            (out.alpha_t, "alpha_t"), (out.sigma_t, "sigma_t"), (out.d_alpha_t, "d_alpha_t"),
            (out.d_sigma_t, "d_sigma_t")))
        x_t, dx_t = _combine([[sigma, alpha], [d_sigma, d_alpha]], [x_0, x_1])
        return PathSample(x_t=x_t, dx_t=dx_t, x_1=x_1, x_0=x_0, t=t)

    # Each conversion: out = a_t * x_t + b_t * prediction, with t broadcast as in flow_matching
    # (t shaped to broadcast against the data, e.g. [B, 1, ..., 1]).

    def target_to_velocity(self, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity at x_t from a prediction of the target x_1."""
        s = self.scheduler(t)
        a = s.d_sigma_t / s.sigma_t
        b = (s.d_alpha_t * s.sigma_t - s.d_sigma_t * s.alpha_t) / s.sigma_t
        return _combine([[a, b]], [x_t, x_1])[0]

    def epsilon_to_velocity(self, epsilon: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity at x_t from a prediction of the noise (the source sample) epsilon."""
        s = self.scheduler(t)
        a = s.d_alpha_t / s.alpha_t
        b = (s.d_sigma_t * s.alpha_t - s.d_alpha_t * s.sigma_t) / s.alpha_t
        return _combine([[a, b]], [x_t, epsilon])[0]

    def velocity_to_target(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The target x_1 from the velocity at x_t."""
        s = self.scheduler(t)
        det = s.d_alpha_t * s.sigma_t - s.d_sigma_t * s.alpha_t
        return _combine([[-s.d_sigma_t / det, s.sigma_t / det]], [x_t, velocity])[0]

    def epsilon_to_target(self, epsilon: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The target x_1 from the noise epsilon at x_t."""
        s = self.scheduler(t)
        return _combine([[1 / s.alpha_t, -s.sigma_t / s.alpha_t]], [x_t, epsilon])[0]

    def velocity_to_epsilon(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise epsilon from the velocity at x_t."""
        s = self.scheduler(t)
        det = s.d_sigma_t * s.alpha_t - s.d_alpha_t * s.sigma_t
        return _combine([[-s.d_alpha_t / det, s.alpha_t / det]], [x_t, velocity])[0]

    def target_to_epsilon(self, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise epsilon from the target x_1 at x_t."""
        s = self.scheduler(t)
        return _combine([[1 / s.sigma_t, -s.alpha_t / s.sigma_t]], [x_t, x_1])[0]


class CondOTProbPath(AffineProbPath):
    """The conditional optimal-transport path: alpha_t = t, sigma_t = 1 - t."""

    def __init__(self):
        self.scheduler = CondOTScheduler()


# ---------------------------------------------------------------------------- the fused map

def _per_sample(value, x, name):
    """A scheduler output for t [B] as [B, 1, ..., 1] against x (flow_matching expands it to x's
    shape; the values, and so the results, are the same)."""
    if not isinstance(value, Tensor) or value.ndim != 1 or value.shape[0] != x.shape[0]:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise AssertionError(f"The scheduler's {name} must be a [batch_size] vector of "
                             f"{x.shape[0]} entries; got {got}.")
    return value.reshape(-1, *([1] * (x.ndim - 1)))


_PLAIN = (Tensor, torch.nn.Parameter)


def _never(tensor):
    return False


def _promote(a, b):
    """torch.promote_types of two float types (also where Dynamo traces)."""
    if a == b:
        return a
    if torch.float64 in (a, b):
        return torch.float64
    return torch.float32      # fp32 with a 16-bit type, or fp16 with bf16


def _combine(rows, inputs):
    """``[rows[m][0] * inputs[0] + rows[m][1] * inputs[1] + ... for m]``, as the eager expression
    gives it (dtype, shape, values), in one fused pass where the kernel can take the case."""
    outputs = _fused(rows, inputs)
    if outputs is not None:
        return outputs
    results = []
    for row in rows:
        out = row[0] * inputs[0]
        for c, x in zip(row[1:], inputs[1:]):
            out = out + c * x
        results.append(out)
    return results


def _fused(rows, inputs):
    """The fused outputs, or None where the eager expression must run: the inputs must be plain
    float tensors of one shape, dtype and device; each coefficient a real number or a float
    tensor that broadcasts against them over leading dimensions only (constant over the
    trailing ones); every term of the eager expression of one result dtype."""
    x = inputs[0]
    if type(x) not in _PLAIN or x.dtype not in FLOAT_DTYPES or x.ndim == 0 or x.numel() == 0:
        return None
    for v in inputs[1:]:
        if (type(v) not in _PLAIN or v.shape != x.shape or v.dtype != x.dtype
                or v.device != x.device):
            return None
    # vmap / grad / jvp of torch.func: the custom op has no batching or forward-mode rule.
    # (Under torch.compile Dynamo sees plain tensors, and cannot call this check.)
    wrapped = (_never if torch.compiler.is_compiling()
               else torch._C._functorch.is_functorch_wrapped_tensor)
    flat = [c for row in rows for c in row]
    if any(wrapped(v) for v in inputs) or any(isinstance(c, Tensor) and wrapped(c) for c in flat):
        return None
    shape, n = tuple(x.shape), x.ndim
    lead = 0       # coefficients vary over dims < lead only
    dtype = None   # of every term c * x
    seen = {}      # coefficient shape -> its shape padded to x's rank
    for c in flat:
        if isinstance(c, Tensor):
            if (type(c) not in _PLAIN or not c.is_floating_point() or c.ndim > n
                    or (c.device != x.device and not (c.ndim == 0 and c.device.type == "cpu"))):
                return None
            if c.shape not in seen:
                padded = seen[c.shape] = (1,) * (n - c.ndim) + tuple(c.shape)
                if any(a != 1 and a != b for a, b in zip(padded, shape)):
                    return None        # c would broadcast x: the result is not x's shape
                lead = max([lead] + [d + 1 for d, a in enumerate(padded) if a != 1])
            # torch.result_type of c * x (both floating): a 0-d tensor takes x's type
            term = _promote(c.dtype, x.dtype) if c.ndim else x.dtype
        elif isinstance(c, numbers.Real) and not isinstance(c, bool):
            term = x.dtype
        else:
            return None
        if dtype is not None and term != dtype:
            return None                # eager would round some terms in another dtype
        dtype = term
    group = shape[:lead]
    groups = math.prod(group)
    math_dtype = _ops.math_dtype(x.dtype, dtype)
    # Each tensor coefficient with one value per group, or one in all: as it comes (the common
    # [B, 1, ..., 1]), else broadcast over the group's dimensions first.
    entries = [c if not isinstance(c, Tensor) or c.numel() in (1, groups)
               else c.reshape(seen[c.shape][:lead]).expand(group) for c in flat]
    coeffs = _ops.coefficient_matrix(entries, len(rows), len(inputs), groups, math_dtype,
                                     x.device)
    if dtype == x.dtype:
        return list(_ops.affine(inputs, coeffs))
    # The result's dtype is t's (e.g. fp64 coefficients over fp32 data): write it directly.
    if (torch.is_grad_enabled() and (coeffs.requires_grad or any(v.requires_grad for v in inputs))
            or _ops.transforming()):
        return None                    # the out= form is not differentiable
    outputs = [torch.empty(shape, dtype=dtype, device=x.device) for _ in rows]
    return list(_ops.affine_out(inputs, coeffs, outputs))
