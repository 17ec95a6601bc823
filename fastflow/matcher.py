"""FlowMatcher: one training step of flow matching around the user's network.

    >>> fm = fastflow.FlowMatcher(path="cond_ot", time_sampler="logit_normal")
    >>> loss = fm.loss(model, x1)            # draws t and x0, builds x_t, calls model(x_t, t)
    >>> loss.backward()

Everything is drawn on x1's device with the caller's torch.Generator (no host RNG, no host
copies); x_t comes from one fused pass and the loss from another, which builds the target
inside the reduction instead of materialising it.
"""
from typing import NamedTuple, Optional, Union

import torch

from . import _ops
from ._checks import batch_time, check_callable, check_stream, path_inputs, real_number
from .conversions import _check_kind
from .losses import flow_matching_loss, target_coefficients
from .paths import (AffinePath, ConstantNoise, Path, SchrodingerBridge, TargetCFM, coefficients,
                    get_path)

TIME_SAMPLERS = ("uniform", "logit_normal")


class FlowSample(NamedTuple):
    """What a training step regresses on: the times (as given, a float included, or the [B]
    tensor drawn), the network input and its target."""

    t: Union[torch.Tensor, float]
    x_t: torch.Tensor
    target: torch.Tensor
    noise: Optional[torch.Tensor]


def _resolve_path(path, sigma):
    """torchcfm's convention: sigma selects the noisy variant of a named path."""
    if isinstance(path, Path):
        if sigma:
            raise ValueError("sigma: give the noise level to the Path object itself")
        return path
    if sigma is None:
        return get_path(path)
    noisy = {"cond_ot": ConstantNoise, "constant_noise": ConstantNoise,
             "schrodinger_bridge": SchrodingerBridge, "target_cfm": TargetCFM}
    if path in noisy and not (path == "cond_ot" and sigma == 0.0):
        return noisy[path](sigma)   # SchrodingerBridge refuses sigma = 0 itself
    if sigma == 0.0:
        return get_path(path)
    raise ValueError(f"sigma: path {path!r} has no noise level; sigma > 0 applies to "
                     f"{', '.join(map(repr, noisy))}")


class FlowMatcher:
    """Flow-matching training objective with fused kernels.

    Args:
        path: a ``fastflow.paths.Path`` or a name (see ``fastflow.interpolate``).
        prediction: what the network predicts: "velocity", "epsilon", "data" or "score".
        time_sampler: "uniform" on [0, 1], "logit_normal" (sigmoid of N(logit_mean,
            logit_std^2), as in Stable Diffusion 3), or a callable
            ``(batch, device, generator) -> t`` returning a [batch] tensor.
        sigma: torchcfm's noise level (default: the named path's own): with a named path,
            "cond_ot" becomes I-CFM (ConstantNoise) for sigma > 0, and "constant_noise",
            "schrodinger_bridge" and "target_cfm" take it as their sigma.
        logit_mean, logit_std: parameters of the logit-normal sampler.

    Example::

        >>> fm = fastflow.FlowMatcher("cosine", prediction="epsilon")
        >>> loss = fm.loss(model, x1)                        # t and x0 drawn on x1's device
        >>> t, x_t, target, _ = fm.sample_location_and_target(torch.randn_like(x1), x1)
    """

    def __init__(self, path="cond_ot", prediction="velocity", time_sampler="uniform", sigma=None,
                 logit_mean=0.0, logit_std=1.0):
        self.path = _resolve_path(path, None if sigma is None else real_number(sigma, "sigma"))
        _check_kind(prediction, "prediction")
        if prediction == "score" and not isinstance(self.path, AffinePath):   # not at the first step
            raise TypeError(f"prediction: 'score' needs an affine path (alpha_t, sigma_t), got "
                            f"{self.path!r}")
        self.prediction = prediction
        if not callable(time_sampler) and time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler: expected one of {', '.join(map(repr, TIME_SAMPLERS))} "
                             f"or a callable, got {time_sampler!r}")
        self.logit_mean = real_number(logit_mean, "logit_mean")
        self.logit_std = real_number(logit_std, "logit_std")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std: must be positive, got {logit_std}")
        self.time_sampler = time_sampler

    def sample_t(self, batch, device, generator=None):
        """One time per sample, [batch] on `device` in torch's default float type (fp32 unless
        changed), or what a callable time_sampler returns."""
        if callable(self.time_sampler):
            return self.time_sampler(batch, device, generator)
        if self.time_sampler == "uniform":
            return torch.rand(batch, device=device, generator=generator)
        z = torch.randn(batch, device=device, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def _draw(self, x1, x0, t, generator):
        check_stream(x1, "x1")
        if x0 is None:
            x0 = torch.randn(x1.shape, dtype=x1.dtype, device=x1.device, generator=generator)
        if t is None:
            t = self.sample_t(x1.shape[0], x1.device, generator)
        noise = None
        if self.path.uses_noise:
            noise = torch.randn(x1.shape, dtype=x1.dtype, device=x1.device, generator=generator)
        return x0, t, noise

    def sample_location_and_target(self, x0, x1, t=None, generator=None):
        """(t, x_t, target, noise) for users who call the network themselves; x0 is the noise
        (drawn when None), t the times (drawn by the time sampler when None: one per sample),
        generator the torch.Generator of the draws; the target is of the matcher's prediction
        kind, noise is the extra sample of noisy paths (else None). One fused pass."""
        x0, t, noise = self._draw(x1, x0, t, generator)
        times = batch_time(t, x1).expand(x1.shape[0])
        location = coefficients(self.path, times, times.dtype)[:, 0]
        target = target_coefficients(self.path, times, self.prediction)
        both = _ops.coefficient_matrix([*location.T, *target.T], 2, location.shape[1])
        both = both.to(_ops.math_dtype(x1.dtype))
        x_t, target = _ops.affine(path_inputs(self.path, x0, x1, noise), both)
        return FlowSample(t, x_t, target, noise)

    def loss(self, model, x1, x0=None, generator=None, reduction="mean", weight=None, t=None,
             **model_kwargs):
        """Draw t (unless given: one time per sample) and x0 (unless given) and the noise of
        noisy paths, build x_t, call ``model(x_t, t, **model_kwargs)`` and return the fused
        loss against the target of the matcher's prediction kind. The model may run under
        torch.autocast: its output may be of another float type than x1 (see
        ``flow_matching_loss`` for the loss's type). generator: the torch.Generator of the
        draws; reduction ("mean", "sum" or "none") and weight (one per sample) as in
        ``flow_matching_loss``. The other keyword arguments are the model's (so it cannot take
        one named like these)."""
        check_callable(model, "model", "model(x_t, t)")
        x0, t, noise = self._draw(x1, x0, t, generator)
        inputs, times = path_inputs(self.path, x0, x1, noise), batch_time(t, x1, keep_type=True)
        backend = _ops.direct_backend((*inputs, times))
        location = coefficients(self.path, times, _ops.math_dtype(x1.dtype), backend)[:, :1]
        (x_t,) = _ops.affine(inputs, location, backend)
        pred = model(x_t, t, **model_kwargs)
        return flow_matching_loss(pred, x0, x1, t, self.path, self.prediction, noise=noise,
                                  weight=weight, reduction=reduction)
