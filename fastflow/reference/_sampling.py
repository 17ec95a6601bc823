"""Reference of fastflow.sample: the plain explicit Runge-Kutta loop, one eager op at a time."""
import math

import torch

from .._tableaus import TABLEAUS
from ..conversions import DIVISOR_EPS
from ..paths import get_path
from ._conversions import convert


def sample(model, x_init, time_grid, method="euler", prediction="velocity", path=None,
           guidance_scale=None, uncond_kwargs=None, doubled_batch=False, cfg_zero_star=False,
           zero_init_steps=0, guidance_interval=None, time_convention="t", time_scale=1.0,
           state_dtype=torch.float32, model_kwargs=None):
    """Integrate dx/dt = v(x, t) over the grid (a list of floats) with the method's tableau.

    The state is kept in `state_dtype`; the model sees it in x_init's dtype, with a [B] time
    tensor (t, or 1 - t with time_convention="sigma", times time_scale) in float32, float64 for
    float64 x_init. Its prediction of kind
    `prediction` is guided (v_u + w (v_c - v_u), or CFG-Zero*'s projected form) and converted to
    a velocity (a "sigma"-convention velocity is dx/dsigma = -dx/dt). The first
    `zero_init_steps` steps use a zero velocity without calling the model. A prediction is never
    converted where it has no velocity (a divisor below DIVISOR_EPS = 1e-6, an infinite
    derivative of the path): where the last step would evaluate it at the end of the grid,
    that step is a midpoint step; any other such time raises a ValueError."""
    model_kwargs = model_kwargs or {}
    x = x_init.to(state_dtype)
    batch = x.shape[0]
    time_dtype = torch.float64 if x_init.dtype == torch.float64 else torch.float32
    steps = len(time_grid) - 1
    for i in range(steps):
        t, h = time_grid[i], time_grid[i + 1] - time_grid[i]
        c, a, b = TABLEAUS[method]
        if prediction != "velocity" and i >= zero_init_steps:
            singular = [not _convertible(prediction, path, t + c_j * h) for c_j in c]
            if i == steps - 1 and singular[-1] and c[-1] == 1:
                c, a, b = TABLEAUS["midpoint"]
                singular = [not _convertible(prediction, path, t + c_j * h) for c_j in c]
            if any(singular):
                raise ValueError(f"a {prediction!r} prediction has no velocity at "
                                 f"t = {t + c[singular.index(True)] * h:g} on {get_path(path)!r}")
        guided = guidance_scale is not None and (
            guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1])
        ks = []
        for j in range(len(c)):
            stage = x
            for l, a_jl in enumerate(a[j]):
                stage = stage + (h * a_jl) * ks[l]
            if i < zero_init_steps:
                ks.append(torch.zeros_like(stage))
                continue
            tau = t + c[j] * h
            model_t = (tau if time_convention == "t" else 1 - tau) * time_scale
            pred = _guided(model, stage.to(x_init.dtype), torch.full((batch,), model_t, device=x.device,
                                                           dtype=time_dtype),
                           guided, guidance_scale, uncond_kwargs, doubled_batch, cfg_zero_star,
                           model_kwargs).to(state_dtype)
            if prediction == "velocity":
                v = -pred if time_convention == "sigma" else pred
            else:
                v = convert(pred, stage, tau, path, prediction, "velocity")
            ks.append(v)
        for j, b_j in enumerate(b):
            x = x + (h * b_j) * ks[j]
    return x.to(x_init.dtype)


def _convertible(prediction, path, tau):
    """Whether a `prediction` at time tau has a velocity on the path: its divisor (sigma_t for
    data, alpha_t for noise and score) at least 1e-6 from zero, the derivatives finite."""
    alpha, sigma, d_alpha, d_sigma = (float(v) for v in get_path(path)(
        torch.tensor([tau], dtype=torch.float64)))
    divisor = sigma if prediction == "data" else alpha
    return abs(divisor) >= DIVISOR_EPS and math.isfinite(d_alpha) and math.isfinite(d_sigma)


def _guided(model, x, t, guided, scale, uncond_kwargs, doubled_batch, cfg_zero_star, kwargs):
    if doubled_batch:
        uncond, cond = model(torch.cat([x, x]), torch.cat([t, t]), **kwargs).chunk(2)
    else:
        cond = model(x, t, **kwargs)
        uncond = model(x, t, **uncond_kwargs) if guided else None
    if not guided:
        return cond
    w = torch.as_tensor(scale, dtype=torch.float64).to(cond.device)
    w = w.view(-1, *([1] * (cond.dim() - 1))) if w.dim() else w
    uncond, cond = uncond.double(), cond.double()
    if cfg_zero_star:
        # Per sample, over a [B, n] view: summing over dims 1.. of a 1-D state would sum over
        # nothing there, and .sum(()) reduces everything.
        rows = cond.shape[:1] + (1,) * (cond.dim() - 1)
        per_sample = (len(cond), math.prod(cond.shape[1:]))
        flat_c, flat_u = cond.reshape(per_sample), uncond.reshape(per_sample)
        alpha = ((flat_c * flat_u).sum(1) / (flat_u.square().sum(1) + 1e-8)).view(rows)
        uncond = alpha * uncond
    return uncond + w * (cond - uncond)
