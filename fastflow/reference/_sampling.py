"""Reference of fastflow.sample: the plain explicit Runge-Kutta loop, one eager op at a time."""
import torch

from .._tableaus import TABLEAUS
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
    a velocity (a "sigma"-convention velocity is dx/dsigma = -dx/dt)."""
    c, a, b = TABLEAUS[method]
    model_kwargs = model_kwargs or {}
    x = x_init.to(state_dtype)
    batch = x.shape[0]
    time_dtype = torch.float64 if x_init.dtype == torch.float64 else torch.float32
    for i in range(len(time_grid) - 1):
        t, h = time_grid[i], time_grid[i + 1] - time_grid[i]
        guided = guidance_scale is not None and (
            guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1])
        ks = []
        for j in range(len(c)):
            stage = x
            for l, a_jl in enumerate(a[j]):
                stage = stage + (h * a_jl) * ks[l]
            tau = t + c[j] * h
            model_t = (tau if time_convention == "t" else 1 - tau) * time_scale
            pred = _guided(model, stage.to(x_init.dtype), torch.full((batch,), model_t, device=x.device,
                                                           dtype=time_dtype),
                           guided, guidance_scale, uncond_kwargs, doubled_batch, cfg_zero_star,
                           model_kwargs).to(state_dtype)
            if i < zero_init_steps:
                pred = torch.zeros_like(pred)
            if prediction == "velocity":
                v = -pred if time_convention == "sigma" else pred
            else:
                v = convert(pred, stage, tau, path, prediction, "velocity")
            ks.append(v)
        for j, b_j in enumerate(b):
            x = x + (h * b_j) * ks[j]
    return x.to(x_init.dtype)


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
        flat_c, flat_u = cond.reshape(len(cond), -1), uncond.reshape(len(uncond), -1)
        alpha = ((flat_c * flat_u).sum(1) / (flat_u.square().sum(1) + 1e-8)).view(rows)
        uncond = alpha * uncond
    return uncond + w * (cond - uncond)
