"""Drop-in for ``torchcfm.conditional_flow_matching`` (torchcfm 1.0.7) on fastflow's fused kernels.

    # from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from fastflow.compat.torchcfm import ConditionalFlowMatcher

Same classes, hierarchy, method names, signatures and defaults; the same random draws in the same
order (t from ``torch.rand(B).type_as(x0)`` when not given, then epsilon from
``sample_noise_like``; the OT classes first couple the batch with torchcfm's own OTPlanSampler);
the same results. The streamed tensor work (mu_t, x_t = mu_t + sigma_t * epsilon, the target
u_t) runs as passes of ``fastflow._ops.affine``, reading each tensor once per pass instead of
once per eager operator. The per-sample coefficients are computed here from t with the very
operators torchcfm applies to t (in t's dtype; plain I-CFM's come from fastflow's ConstantNoise
path, whose builder gives the same bits), and the kernel sums its terms in the order of
torchcfm's expression, rounding each product and sum, so CPU results in fp32 (and fp64) are bit
for bit those of torchcfm when t and the data share their dtype. Differences, all deliberate:
fp16 / bf16 data are computed in fp32 and rounded once (more accurate than torchcfm, not
bit-equal); x0, x1 and epsilon must have one shape (torchcfm would broadcast them); wrong
inputs raise errors that name the argument.

A subclass that overrides compute_mu_t, compute_sigma_t, sample_xt or compute_conditional_flow
gets torchcfm's composition of those methods, so its overrides are honoured; the fused shortcut
that skips them applies only where they are this module's.

torchcfm itself (and POT) is needed only for the OT plans of
ExactOptimalTransportConditionalFlowMatcher and SchrodingerBridgeConditionalFlowMatcher, and for
``OTPlanSampler``, which this module re-exports as torchcfm's does; all are imported on first use,
so ``from fastflow.compat.torchcfm import *`` (which works without them) leaves OTPlanSampler out:
import it by name.
"""
import functools
import importlib
import math
import numbers
import warnings
from typing import Union

import torch

from .. import _ops
from ..interpolation import interpolate
from ..paths import ConstantNoise
from . import require

__all__ = ["ConditionalFlowMatcher", "ExactOptimalTransportConditionalFlowMatcher",
           "TargetConditionalFlowMatcher", "SchrodingerBridgeConditionalFlowMatcher",
           "VariancePreservingConditionalFlowMatcher", "pad_t_like_x"]

_OT_FEATURE = "the minibatch OT plan of fastflow.compat.torchcfm (torchcfm's OTPlanSampler)"
_HOOKS = ("compute_mu_t", "compute_sigma_t", "sample_xt", "compute_conditional_flow")


def _optimal_transport():
    """torchcfm.optimal_transport, imported on first use, with a helpful error when missing."""
    try:
        importlib.import_module("ot")  # POT: torchcfm's plan solvers
    except ImportError as exc:
        raise ImportError(f"{_OT_FEATURE} needs POT: pip install pot (or pip install "
                          f"'fastflow[compat]')") from exc
    require("torchcfm", _OT_FEATURE)
    return importlib.import_module("torchcfm.optimal_transport")


def __getattr__(name):
    # torchcfm.conditional_flow_matching exposes the OTPlanSampler it imports; so do we, lazily.
    if name == "OTPlanSampler":
        return _optimal_transport().OTPlanSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _BatchSizeError(ValueError, AssertionError):
    """A wrong number of times: a ValueError, and the AssertionError that torchcfm raises."""


def pad_t_like_x(t, x):
    """t of shape [B] as [B, 1, ..., 1] with x's number of dimensions; numbers pass through."""
    if isinstance(t, (float, int)):
        return t
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _fused(streams, rows):
    """One pass of the fused kernel: ``out[m] = sum_k rows[m][name_k] * streams[name_k]``.

    streams: {name: tensor}, in the order the terms are summed; only those some row names are
    read. rows: one {name: coefficient} per output; a coefficient is a Python number (rounded to
    the math type, as PyTorch rounds a scalar operand) or a tensor with one value per sample
    (e.g. [B] or pad_t_like_x's [B, 1, ...]); a stream that a row leaves out gets 0 there (an
    inf or nan in it would then reach that output, where torchcfm's formula never reads it).
    Products and sums are rounded in order, so ``{x0: 1 - t, x1: t, epsilon: s}`` gives the bits
    of torchcfm's ``(t * x1 + (1 - t) * x0) + s * epsilon``. Dtypes promote as in PyTorch.
    """
    names = [n for n in streams if any(n in row for row in rows)]
    xs = [streams[n] for n in names]
    for name, x in zip(names, xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    ref_name, ref = names[0], xs[0]
    if ref.dim() == 0:
        raise ValueError(f"{ref_name}: expected a tensor with a batch dimension, got a 0-d tensor")
    for name, x in zip(names[1:], xs[1:]):
        if x.shape != ref.shape or x.device != ref.device:
            raise ValueError(f"{name}: expected shape {tuple(ref.shape)} on {ref.device} (like "
                             f"{ref_name}), got {tuple(x.shape)} on {x.device}; fastflow's fused "
                             f"kernels do not broadcast")
    per_sample = [c for row in rows for c in row.values() if isinstance(c, torch.Tensor)]
    dtype = _result_dtype(xs, per_sample)
    if not dtype.is_floating_point or dtype.is_complex:
        culprit = "t" if _result_dtype(xs, []).is_floating_point else ref_name
        raise TypeError(f"{culprit}: expected floating-point tensors, got {dtype}")
    batch = ref.shape[0]
    for c in per_sample:
        if c.numel() != batch and c.numel() != 1:
            raise _BatchSizeError(f"t: expected one time per sample of the batch of {batch}, got "
                                  f"{c.numel()} values")
    backend = _ops.direct_backend(xs + per_sample)  # one decision for the assembly and the pass
    coeffs = _ops.coefficient_matrix([row.get(n, 0) for row in rows for n in names], len(rows),
                                     len(names), batch, _ops.math_dtype(dtype), ref.device,
                                     backend)
    return _ops.affine([x if x.dtype == dtype else x.to(dtype) for x in xs], coeffs, backend)


def _result_dtype(streams, coefficients):
    """The dtype PyTorch gives an expression over these streams and coefficient tensors: a
    0-d tensor (a tensor sigma, say) does not widen tensors with dimensions."""
    dims = [x.dtype for x in streams] + [c.dtype for c in coefficients if c.dim() > 0]
    return functools.reduce(torch.promote_types, dims)


def _row_dtype(streams, row):
    """The dtype of one output of `_fused(streams, [row])`."""
    return _result_dtype([x for name, x in streams.items() if name in row],
                         [c for c in row.values() if isinstance(c, torch.Tensor)])


def _records(row):
    """Whether autograd records a gradient to some coefficient of `row`."""
    return torch.is_grad_enabled() and any(
        isinstance(c, torch.Tensor) and c.requires_grad for c in row.values())


class ConditionalFlowMatcher:
    r"""Drop-in for torchcfm's ConditionalFlowMatcher (I-CFM): x_t ~ N(t x1 + (1 - t) x0, sigma^2),
    target u_t = x1 - x0.

    Fused: ``sample_location_and_conditional_flow`` builds x_t and u_t in one pass over
    (x0, x1, epsilon); ``compute_mu_t``, ``sample_xt`` and ``compute_conditional_flow`` are one
    pass each. The subclasses reuse this skeleton through the per-sample hooks ``_mu_row`` (the
    coefficients of mu_t) and ``_flow_row`` (those of u_t).
    """

    #: torchcfm's u_t multiplies the rounded sum of ``_flow_row`` by this (VP), or nothing.
    _flow_scale = None

    def __init__(self, sigma: Union[float, int] = 0.0):
        # A NumPy scalar would become an array in pad_t_like_x (and fail there, in torchcfm
        # too): its value as a Python float instead.
        if isinstance(sigma, numbers.Real) and type(sigma) not in (int, float, bool):
            sigma = float(sigma)
        self.sigma = sigma

    # Per-sample coefficients, written as torchcfm writes its formulas (t already padded).
    def _mu_row(self, t):
        return {"x0": 1 - t, "x1": t}

    def _flow_row(self, t):
        return {"x0": -1, "x1": 1}

    def _xt_row(self, t, x):
        """x_t = mu_t + sigma_t * epsilon; torchcfm evaluates sigma_t on the unpadded t."""
        return {**self._mu_row(pad_t_like_x(t, x)),
                "epsilon": pad_t_like_x(self.compute_sigma_t(t), x)}

    def _is_icfm(self, x0, x1, t, eps):
        """Whether this call is plain I-CFM on what ConstantNoise takes as torchcfm computes it:
        this class's rows (not a subclass's), a constant sigma >= 0, and plain tensors of one
        shape, float type (fp32 or fp64: 16-bit data would promote with t's type) and device,
        one time per sample, no gradient to record."""
        cls = type(self)
        if any(getattr(cls, n) is not getattr(ConditionalFlowMatcher, n)
               for n in ("_mu_row", "_flow_row", "_xt_row", "compute_sigma_t", "_flow_scale")):
            return False
        sigma = self.sigma
        if type(sigma) not in (int, float) or not 0 <= sigma < math.inf:
            return False
        tensors = (x0, x1, eps, t)
        if any(type(x) is not torch.Tensor for x in tensors):
            return False
        return (x0.dtype in (torch.float32, torch.float64) and t.dim() == 1
                and all(x.dtype == x0.dtype and x.device == x0.device for x in tensors)
                and x0.shape == x1.shape == eps.shape
                and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)))

    def _scale_flow(self, ut):
        # A product with the rounded sum (not foldable into the coefficients without changing
        # the rounding): in place, after the fused pass.
        return ut if self._flow_scale is None else ut.mul_(self._flow_scale)

    def _own(self, *names):
        """Whether these methods are still this module's (not a subclass's overrides)."""
        return all(getattr(getattr(self, n), "__module__", None) == __name__ for n in names)

    # torchcfm's API.
    def compute_mu_t(self, x0, x1, t):
        """The mean of the path at t (one fused pass)."""
        (mu,) = _fused({"x0": x0, "x1": x1}, [self._mu_row(pad_t_like_x(t, x1))])
        return mu

    def compute_sigma_t(self, t):
        """The standard deviation of the path at t: the constant sigma."""
        del t
        return self.sigma

    def sample_xt(self, x0, x1, t, epsilon):
        """x_t = mu_t + sigma_t * epsilon (one fused pass)."""
        if not self._own("compute_mu_t", "compute_sigma_t"):
            return self.compute_mu_t(x0, x1, t) + pad_t_like_x(self.compute_sigma_t(t),
                                                               x0) * epsilon
        (xt,) = _fused({"x0": x0, "x1": x1, "epsilon": epsilon}, [self._xt_row(t, x1)])
        return xt

    def compute_conditional_flow(self, x0, x1, t, xt):
        """The target u_t(x | x0, x1) (one fused pass)."""
        del xt
        (ut,) = _fused({"x0": x0, "x1": x1}, [self._flow_row(pad_t_like_x(t, x1))])
        return self._scale_flow(ut)

    def sample_noise_like(self, x):
        return torch.randn_like(x)

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        """(t, x_t, u_t[, epsilon]): t drawn uniformly when None, then epsilon drawn."""
        if t is None:
            t = torch.rand(x0.shape[0]).type_as(x0)
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise TypeError(f"t: expected a tensor with one time per sample, or None; got "
                            f"{t!r}")
        if len(t) != x0.shape[0]:
            raise _BatchSizeError(f"t has to have batch size dimension: got {len(t)} times for a "
                                  f"batch of {x0.shape[0]}")
        eps = self.sample_noise_like(x0)
        if self._own(*_HOOKS):
            xt, ut = self._xt_and_ut(x0, x1, t, eps)
        else:
            xt, ut = self._xt_then_ut(x0, x1, t, eps)
        return (t, xt, ut, eps) if return_noise else (t, xt, ut)

    def compute_lambda(self, t):
        """The score weighting 2 sigma_t / (sigma^2 + 1e-8) (per sample, eager)."""
        sigma_t = self.compute_sigma_t(t)
        return 2 * sigma_t / (self.sigma**2 + 1e-8)

    # The two ways to build (x_t, u_t).
    def _xt_then_ut(self, x0, x1, t, eps):
        """torchcfm's composition of the public methods."""
        xt = self.sample_xt(x0, x1, t, eps)
        return xt, self.compute_conditional_flow(x0, x1, t, xt)

    def _xt_and_ut(self, x0, x1, t, eps):
        """Both in one pass over (x0, x1, epsilon): u_t here does not read x_t."""
        if self._is_icfm(x0, x1, t, eps):
            # I-CFM's rows are fastflow's ConstantNoise path's, whose coefficients the backend
            # builds from t in one call with torchcfm's bits (1 - t and sigma rounded once):
            # about 25 us less than assembling them here, most of a small batch's call.
            return interpolate(x0, x1, t, path=ConstantNoise(self.sigma), noise=eps)
        streams = {"x0": x0, "x1": x1, "epsilon": eps}
        rows = [self._xt_row(t, x1), self._flow_row(pad_t_like_x(t, x1))]
        if (_row_dtype(streams, rows[0]) != _row_dtype(streams, rows[1])
                or _records(rows[0]) != _records(rows[1])):
            # Something that promotes x_t but not u_t (fp64 t or noise beside fp32 data, for
            # I-CFM's u_t = x1 - x0), or that x_t's gradient flows to and u_t's does not (a
            # learnable tensor sigma): one pass computes in one dtype and records both outputs
            # as functions of all its coefficients, so keep torchcfm's two results apart.
            return self._xt_then_ut(x0, x1, t, eps)
        xt, ut = _fused(streams, rows)
        return xt, self._scale_flow(ut)


class _OTCoupled(ConditionalFlowMatcher):
    """Couples each batch with torchcfm's OTPlanSampler (``self.ot_sampler``) before matching."""

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        x0, x1 = self.ot_sampler.sample_plan(x0, x1)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def guided_sample_location_and_conditional_flow(self, x0, x1, y0=None, y1=None, t=None,
                                                    return_noise=False):
        """(t, x_t, u_t, y0, y1[, epsilon]) with the labels coupled like the samples."""
        x0, x1, y0, y1 = self.ot_sampler.sample_plan_with_labels(x0, x1, y0, y1)
        t, xt, ut, *eps = super().sample_location_and_conditional_flow(x0, x1, t, return_noise)
        return (t, xt, ut, y0, y1, *eps)


class ExactOptimalTransportConditionalFlowMatcher(_OTCoupled):
    """Drop-in for torchcfm's OT-CFM: I-CFM on a batch coupled by the exact OT plan.

    The plan is torchcfm's (needs torchcfm and POT); x_t and u_t are one fused pass, as in
    ConditionalFlowMatcher.
    """

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma)
        self.ot_sampler = _optimal_transport().OTPlanSampler(method="exact")


class TargetConditionalFlowMatcher(ConditionalFlowMatcher):
    """Drop-in for torchcfm's TargetConditionalFlowMatcher (Lipman et al.): mu_t = t x1,
    sigma_t = 1 - (1 - sigma) t, u_t = (x1 - (1 - sigma) x_t) / sigma_t.

    Fused: x_t (one pass over x1, epsilon) and the numerator x1 - (1 - sigma) x_t (one pass over
    x1, x_t). Eager: the division by sigma_t, in place; multiplying by 1 / sigma_t instead would
    round differently from torchcfm.
    """

    def _mu_row(self, t):
        return {"x1": t}

    def compute_sigma_t(self, t):
        return 1 - (1 - self.sigma) * t

    def compute_conditional_flow(self, x0, x1, t, xt):
        del x0
        t = pad_t_like_x(t, x1)
        (num,) = _fused({"x1": x1, "xt": xt}, [{"x1": 1, "xt": -(1 - self.sigma)}])
        if isinstance(t, torch.Tensor) and t.device != num.device:
            # A meta t made the in-place division below a silent no-op.
            raise ValueError(f"t: expected a tensor on {num.device} (the device of x1), got "
                             f"{t.device}")
        sigma_t = 1 - (1 - self.sigma) * t
        # In place where the quotient keeps num's dtype (fp64 t would promote, as in torchcfm).
        if isinstance(sigma_t, torch.Tensor) and torch.result_type(num, sigma_t) == num.dtype:
            return num.div_(sigma_t)
        return num / sigma_t

    def _xt_and_ut(self, x0, x1, t, eps):
        # u_t reads the rounded x_t: two passes, as composed by the public methods.
        return self._xt_then_ut(x0, x1, t, eps)


class SchrodingerBridgeConditionalFlowMatcher(_OTCoupled):
    """Drop-in for torchcfm's SB-CFM: a batch coupled by the entropic OT plan (reg 2 sigma^2),
    x_t ~ N(t x1 + (1 - t) x0, sigma^2 t (1 - t)),
    u_t = (1 - 2t) / (2t(1 - t) + 1e-8) * (x_t - mu_t) + x1 - x0.

    The plan is torchcfm's. Fused: (mu_t, x_t) in one pass over (x0, x1, epsilon), then
    x_t - mu_t, then u_t from (x_t - mu_t, x1, x0): torchcfm's u_t reads the rounded x_t - mu_t,
    which no single sum of (x0, x1, epsilon) reproduces bit for bit.
    """

    def __init__(self, sigma: Union[float, int] = 1.0, ot_method="exact"):
        if sigma <= 0:
            raise ValueError(f"Sigma must be strictly positive, got {sigma}.")
        if sigma < 1e-3:
            warnings.warn("Small sigma values may lead to numerical instability.")
        super().__init__(sigma)
        self.ot_method = ot_method
        self.ot_sampler = _optimal_transport().OTPlanSampler(method=ot_method,
                                                             reg=2 * self.sigma**2)

    def compute_sigma_t(self, t):
        return self.sigma * torch.sqrt(t * (1 - t))

    def compute_conditional_flow(self, x0, x1, t, xt):
        t = pad_t_like_x(t, x0)
        return self._flow_from_mu(x0, x1, t, xt, self.compute_mu_t(x0, x1, t))

    def _flow_from_mu(self, x0, x1, t, xt, mu):
        ratio = (1 - 2 * t) / (2 * t * (1 - t) + 1e-8)
        (diff,) = _fused({"xt": xt, "mu": mu}, [{"xt": 1, "mu": -1}])
        (ut,) = _fused({"diff": diff, "x1": x1, "x0": x0}, [{"diff": ratio, "x1": 1, "x0": -1}])
        return ut

    def _xt_and_ut(self, x0, x1, t, eps):
        mu, xt = _fused({"x0": x0, "x1": x1, "epsilon": eps},
                        [self._mu_row(pad_t_like_x(t, x1)), self._xt_row(t, x1)])
        return xt, self._flow_from_mu(x0, x1, t, xt, mu)


class VariancePreservingConditionalFlowMatcher(ConditionalFlowMatcher):
    """Drop-in for torchcfm's VP-CFM (Albergo et al.'s trigonometric interpolant):
    mu_t = cos(pi t / 2) x0 + sin(pi t / 2) x1, u_t = pi/2 (cos(pi t / 2) x1 - sin(pi t / 2) x0).

    Fused: x_t and the bracket of u_t in one pass over (x0, x1, epsilon). Eager: the product of
    the rounded bracket with pi/2, in place (folding pi/2 into the coefficients would round
    differently from torchcfm).
    """

    _flow_scale = math.pi / 2

    def _mu_row(self, t):
        return {"x0": torch.cos(math.pi / 2 * t), "x1": torch.sin(math.pi / 2 * t)}

    def _flow_row(self, t):
        return {"x0": -torch.sin(math.pi / 2 * t), "x1": torch.cos(math.pi / 2 * t)}
