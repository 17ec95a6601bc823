"""Drop-in for ``flow_matching.solver`` (flow_matching 1.0.10): ODESolver on fastflow's sampler.

    # from flow_matching.solver import ODESolver
    from fastflow.compat.flow_matching.solver import ODESolver

    solver = ODESolver(velocity_model=model)           # called as model(x=x, t=t, **model_extras)
    x_1 = solver.sample(x_init=x_0, step_size=0.01, method="midpoint")

``ODESolver.sample`` with the fixed-step methods "euler", "midpoint", "heun2" and "rk4" (the
torchdiffeq names; "rk4" is Kutta's 3/8 rule, fastflow's "rk4_38") runs on ``fastflow.Sampler``:
after each model call one fused pass reads the model's output and the state once and writes the
next model input and the updated state in place, instead of torchdiffeq's several eager
operators per stage. Everything else about the call is flow_matching's:

- the grid is torchdiffeq's: from ``step_size``, ``ceil((t_end - t_start) / step_size + 1)``
  points ``t_start + k step_size`` computed in time_grid's dtype, the last one set to t_end (a
  descending time_grid is negated first, as torchdiffeq does); with ``step_size=None`` the
  time_grid itself;
- ``return_intermediates=True`` returns the states at every time_grid point, [len(time_grid),
  *x_init.shape], each requested time that falls between two grid points linearly interpolated
  between their states, as torchdiffeq does (the other steps keep no state);
- the model is called as ``velocity_model(x=x, t=t, **model_extras)`` with x shaped like x_init
  (with or without a batch dimension) and t a 0-d tensor in x_init's dtype (x is the sampler's
  buffer, updated in place after the call: a model that keeps its input must clone it);
- it runs without autograd, like flow_matching's default ``enable_grad=False``.

Euler results equal torchdiffeq's bit for bit on CPU for fp32 x_init on an fp32 or fp64
time_grid, and for fp64 x_init on an fp64 time_grid (the same products and sums; torchdiffeq
takes the step of a grid in the grid's type, the sampler exactly, so fp64 states on an fp32 grid
differ by about 1e-8, and any state on an fp16 / bf16 grid by that grid's rounding of each
step). Midpoint
updates are the same operations too, but the sampler computes the midpoint time t0 + h/2 in
fp64 where torchdiffeq rounds h first, so the model may see a time one ulp apart; heun2 and rk4
fold each stage's coefficients into one per stream. These differ from torchdiffeq by rounding
(about 1e-7 relative in fp32). fp16 / bf16 states are kept in fp32 between steps, which is
more accurate than torchdiffeq (it keeps them in x_init's dtype) and so not equal to it.

flow_matching's ODESolver itself runs (``pip install flow_matching``) for the other methods
(dopri5 and the other adaptive ones, heun3, the Adams methods), for ``enable_grad=True``
(gradients through the solve), for ``compute_likelihood``, and for inputs the sampler does not
take (non-float or empty x_init, a time_grid that is not a strictly monotone 1-D float tensor of
two or more points, a step_size that is not a positive number). RiemannianODESolver and
MixtureDiscreteEulerSolver are flow_matching's own, imported on first use.
"""
import math
import numbers
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ... import _ops, sampling as _sampling
from ..._checks import FLOAT_DTYPES
from . import delegating_getattr, original

# (MixtureDiscreteEulerSolver and RiemannianODESolver, flow_matching's own, are attributes too,
# loaded on first use; not in __all__, so that ``import *`` works without flow_matching.)
__all__ = ["ODESolver", "Solver"]

# Under a sys.modules redirect of flow_matching.solver this module stands in for a package: an
# (empty) __path__ lets flow_matching's own submodules (riemannian_ode_solver, ...) still be
# found below it (see fastflow.compat.flow_matching).
__path__ = []

#: ODESolver methods (torchdiffeq's names) that run on fastflow.Sampler, and its name for each.
FUSED_METHODS = {"euler": "euler", "midpoint": "midpoint", "heun2": "heun", "rk4": "rk4_38"}

_DELEGATED = {
    "MixtureDiscreteEulerSolver": "flow_matching.solver.discrete_solver",
    "RiemannianODESolver": "flow_matching.solver.riemannian_ode_solver",
}


__getattr__ = delegating_getattr(__name__, _DELEGATED)


class Solver(ABC, torch.nn.Module):
    """Base of the solvers."""

    @abstractmethod
    def sample(self, x_0: Tensor = None) -> Tensor:
        """Integrate from x_0."""


class ODESolver(Solver):
    """Solves dx/dt = velocity_model(x, t) from x_init over a time grid.

    Args:
        velocity_model: a ``flow_matching.utils.ModelWrapper`` or any callable, called as
            ``velocity_model(x=x, t=t, **model_extras)``.
    """

    def __init__(self, velocity_model):
        super().__init__()
        self.velocity_model = velocity_model

    def sample(self, x_init: Tensor, step_size, method: str = "euler", atol: float = 1e-5,
               rtol: float = 1e-5, time_grid: Tensor = torch.tensor([0.0, 1.0]),
               return_intermediates: bool = False, enable_grad: bool = False, **model_extras):
        """Integrate the velocity field from x_init at time_grid[0] to time_grid[-1].

        Args:
            x_init: the initial state (e.g. noise x_0), [batch_size, ...] or unbatched.
            step_size: the fixed step; None to step along time_grid itself (and for adaptive
                methods).
            method: "euler", "midpoint", "heun2", "rk4" (fused), or any other torchdiffeq
                method (run by flow_matching's ODESolver).
            atol, rtol: tolerances of the adaptive methods.
            time_grid: the times to integrate over (descending to integrate backwards), and
                the times whose states ``return_intermediates`` returns.
            return_intermediates: return the states at every time_grid point instead of the
                last one.
            enable_grad: keep the autograd graph of the solve (flow_matching's solver runs).
            **model_extras: passed to the model on every call.

        Returns:
            The state at time_grid[-1], or the states at every time_grid point stacked.
        """
        reason = _delegation_reason(x_init, step_size, method, time_grid, enable_grad)
        if reason is not None:
            return self._peer(reason).sample(
                x_init=x_init, step_size=step_size, method=method, atol=atol, rtol=rtol,
                time_grid=time_grid, return_intermediates=return_intermediates,
                enable_grad=enable_grad, **model_extras)
        with torch.no_grad():
            return _integrate(self.velocity_model, x_init, step_size, FUSED_METHODS[method],
                              time_grid, return_intermediates, model_extras)

    def compute_likelihood(self, x_1: Tensor, log_p0, step_size, method: str = "euler",
                           atol: float = 1e-5, rtol: float = 1e-5,
                           time_grid: Tensor = torch.tensor([1.0, 0.0]),
                           return_intermediates: bool = False, exact_divergence: bool = False,
                           enable_grad: bool = False, **model_extras):
        """The samples at t = 0 and the log-likelihood of x_1 (flow_matching's own: the
        divergence term needs the model's autograd at every step)."""
        return self._peer("ODESolver.compute_likelihood").compute_likelihood(
            x_1=x_1, log_p0=log_p0, step_size=step_size, method=method, atol=atol, rtol=rtol,
            time_grid=time_grid, return_intermediates=return_intermediates,
            exact_divergence=exact_divergence, enable_grad=enable_grad, **model_extras)

    def _peer(self, feature):
        """flow_matching's ODESolver around the same model."""
        module = original("flow_matching.solver.ode_solver",
                          f"fastflow.compat.flow_matching ODESolver with {feature}")
        return module.ODESolver(velocity_model=self.velocity_model)


def _delegation_reason(x_init, step_size, method, time_grid, enable_grad):
    """Why flow_matching's solver must run this call (a short description), or None."""
    if method not in FUSED_METHODS:
        return f"method={method!r}"
    if enable_grad:
        return "enable_grad=True"
    if _ops.transforming():
        return "a torch.func transform or forward-mode AD"
    if (not isinstance(x_init, Tensor) or x_init.dtype not in FLOAT_DTYPES or x_init.numel() == 0
            or x_init.layout != torch.strided):
        return "this x_init"
    if (not isinstance(time_grid, Tensor) or time_grid.ndim != 1 or time_grid.numel() < 2
            or not time_grid.is_floating_point()):
        return "this time_grid"
    times = time_grid.tolist()
    steps = [b - a for a, b in zip(times[:-1], times[1:])]
    if not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
        return "this time_grid"
    if step_size is not None and (not isinstance(step_size, numbers.Real)
                                  or isinstance(step_size, bool)
                                  or not 0 < step_size < math.inf):
        return f"step_size={step_size!r}"
    return None


def _grid(times, step_size):
    """torchdiffeq's fixed grid over ascending `times` (a tensor): the times themselves, or
    ceil((end - start) / step_size + 1) points start + k * step_size with the last one set to
    end, computed in the times' dtype and device as torchdiffeq computes them."""
    if step_size is None:
        return times
    start, end = times[0], times[-1]
    count = torch.ceil((end - start) / step_size + 1).item()
    grid = torch.arange(0, count, dtype=times.dtype, device=times.device) * step_size + start
    grid[-1] = end
    return grid


def _sign(x):
    return (x > 0) - (x < 0)


def _keeper(states, needed, offset, dtype):
    """A sampler callback that keeps the states at the `needed` grid indices (the sampler's step
    count plus `offset`) in `states`, as copies in `dtype`."""
    def callback(step, t, x):
        if offset + step in needed:
            states[offset + step] = x[0].to(dtype, copy=True)
    return callback


def _integrate(model, x_init, step_size, method, time_grid, return_intermediates, extras):
    # torchdiffeq integrates in ascending time: a descending time_grid is negated (and the
    # field with it); its grid, the matching of requested times and the interpolation all
    # happen in that ascending frame, the sampler runs in the model's own time.
    requested = time_grid.to(x_init.device)
    reverse = bool(requested[0] > requested[1])
    ascending = -requested if reverse else requested
    grid = _grid(ascending, step_size)
    g, req = grid.tolist(), ascending.tolist()

    # Which step each requested time falls in: torchdiffeq's loop (the first step whose end is
    # at or past it).
    picks = []
    j = 1
    for i in range(len(g) - 1):
        while j < len(req) and g[i + 1] >= req[j]:
            picks.append((j, i))
            j += 1
        if j == len(req):
            break
    if not return_intermediates:
        picks = picks[-1:]
    needed = set()
    for j, i in picks:
        if req[j] == g[i]:
            needed.add(i)
        elif req[j] == g[i + 1]:
            needed.add(i + 1)
        else:
            needed.update((i, i + 1))

    def field(x, t):
        t = t[0]
        if t.dtype != x_init.dtype:
            t = t.to(x_init.dtype)
        out = model(x=x[0], t=t, **extras)
        if not isinstance(out, Tensor):
            return out                     # the sampler says what it expected
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if out.shape != x.shape[1:]:
            out = torch.broadcast_to(out, x.shape[1:])   # torchdiffeq's y + dt * f broadcasts
        return out.unsqueeze(0)

    states = {0: x_init}
    current = x_init
    i, last = 0, max(needed)
    while i < last:
        # Grids from step_size may end in a zero-length step, or (fp64) a tiny backward one:
        # each run of steps of one direction is one sampler call; a zero step changes nothing.
        direction = _sign(g[i + 1] - g[i])
        if direction == 0:
            i += 1
            states[i] = current
            continue
        end = i + 1
        while end < last and _sign(g[end + 1] - g[end]) == direction:
            end += 1
        inner = any(i < k < end for k in needed)
        callback = _keeper(states, needed, i, x_init.dtype) if inner else None
        segment = [-v if reverse else v for v in g[i:end + 1]]
        sampler = _sampling.Sampler(field, method=method,
                                    time_grid=torch.tensor(segment, dtype=torch.float64),
                                    callback=callback)
        # (contiguous: fastflow's sampler streams its state buffers as flat memory)
        current = sampler(current.unsqueeze(0).contiguous())[0]
        states[end] = current
        i = end

    def state_at(j, i):
        if req[j] == g[i]:
            return states[i]
        if req[j] == g[i + 1]:
            return states[i + 1]
        y0, y1 = states[i], states[i + 1]
        slope = (ascending[j] - grid[i]) / (grid[i + 1] - grid[i])
        return y0 + slope * (y1 - y0)

    if not return_intermediates:
        return state_at(*picks[-1])
    return torch.stack([x_init] + [state_at(j, i) for j, i in picks])
