"""ODE samplers with fused steps: Euler, midpoint, Heun, RK4 (DESIGN.md section 6).

A step of an explicit Runge-Kutta method is linear in the state and in what the model returns:
the stage inputs, the guidance (v_u + w (v_c - v_u)), the conversion of a noise, data or score
prediction into a velocity, and the update x + h sum_j b_j k_j are all per-sample affine
combinations of a few streams. So after each model call the sampler runs one fused pass
(``affine_out``) that reads the model's output(s) and the fp32 state once and writes the next
model input (in the model's dtype) and the updated state or accumulator, in place. The
coefficients of every pass are computed once, on the device, before the loop; the loop itself
never synchronises with the host, and on CUDA it can be recorded as one CUDA graph
(``capture=True``) and replayed for new inputs of the same shape.

    >>> x = fastflow.sample(model, torch.randn(16, 2), steps=50, method="heun")
    >>> sampler = fastflow.Sampler(model, sigmas=fastflow.schedules.flow_match_sigmas(28),
    ...                            method="euler", time_convention="sigma", time_scale=1000,
    ...                            guidance_scale=3.5)
    >>> images = sampler(latents, uncond_kwargs={"y": null_labels}, y=labels)
"""
import inspect
import numbers
import threading
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch

from . import _noise, _ops
from ._checks import FLOAT_DTYPES, check_callable, check_positive, describe, is_integer
from ._tableaus import TABLEAUS
from .conversions import DIVISOR_EPS, KINDS, conversion_coefficients
from .paths import AffinePath, get_path, value_key

__all__ = ["METHODS", "Sampler", "sample"]

METHODS = tuple(TABLEAUS)
GUIDANCE = ("cfg", "cfg_zero_star")
TIME_CONVENTIONS = ("t", "sigma")
# Kernel arity: a pass that would need more streams is split (the velocity is stored first).
_MAX_IN, _MAX_OUT = _ops.MAX_INPUTS, _ops.MAX_OUTPUTS
# Built coefficient tables, shared by samplers with the same options (oldest dropped first),
# whichever threads sample.
_PLANS = {}
_PLANS_LOCK = threading.Lock()
_PLAN_CACHE_SIZE = 32
# The model's times per plan are kept for this many (batch, dtype) pairs (_TimeViews), emptied
# when full: a server sampling batches of every size from 1 to N would otherwise keep N copies
# of the views for every plan.
_TIME_VIEWS_SIZE = 16
# CFG-Zero*: alpha = <v_c, v_u> / (|v_u|^2 + _ZERO_STAR_EPS), per sample.
_ZERO_STAR_EPS = 1e-8


def sample(model, x_init, *, model_kwargs=None, uncond_kwargs=None, sample_ids=None, **options):
    """Integrate the model's flow from x_init and return the final state in x_init's dtype.

    ``fastflow.sample(model, x_init, steps=N, method=m)`` integrates from t = 0 (noise) to
    t = 1 (data) on a uniform grid of N steps; ``time_grid=`` takes an explicit grid instead.
    The model is called as ``model(x, t, **model_kwargs)`` with t a [B] tensor on x's device.
    Every other option is the :class:`Sampler`'s; this is ``Sampler(model, **options)(x_init,
    uncond_kwargs=uncond_kwargs, sample_ids=sample_ids, **model_kwargs)``.

    Example::

        >>> x = fastflow.sample(model, torch.randn(16, 2), steps=50, method="heun")
        >>> x = fastflow.sample(model, noise, steps=28, model_kwargs={"y": labels},
        ...                     uncond_kwargs={"y": null_labels}, guidance_scale=4.0)
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(f"sample: unknown option {', '.join(map(repr, unknown))}; the model's "
                        f"keyword arguments go in model_kwargs={{...}} (and uncond_kwargs=)")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs: expected a dict of the model's keyword arguments, got "
                        f"{type(model_kwargs).__name__}")
    taken = sorted(set(model_kwargs or ()) & {"x_init", "uncond_kwargs", "sample_ids"})
    if taken:
        raise ValueError(f"model_kwargs: {taken[0]!r} is an argument of the sampler itself, so "
                         f"the model cannot take a keyword argument of that name")
    return Sampler(model, **options)(x_init, uncond_kwargs=uncond_kwargs, sample_ids=sample_ids,
                                     **(model_kwargs or {}))


class Sampler:
    """A reusable sampler: validates its options and computes every step's coefficients once,
    keeps static buffers per input shape, and runs the loop without host synchronisation.

    Sampling is not differentiable: the fused passes update buffers in place, so the loop runs
    without autograd. The differentiable loop is ``fastflow.reference.sample(model, x_init,
    time_grid, ...)``: an explicit grid (a list of t) where this takes steps or sigmas too, and
    no re-noising (see its docstring).

    Args:
        model: called as ``model(x, t, **kwargs)``, x in x_init's dtype, t a [B] tensor.
        method: "euler", "midpoint", "heun", "rk4" (classic) or "rk4_38" (Kutta's 3/8 rule,
            torchdiffeq's "rk4").
        steps: number of steps of a uniform grid from t = 0 to 1 (1 to 0 with reverse=True).
        time_grid: explicit grid t_0, ..., t_N (1-D, strictly monotone; decreasing integrates
            from data towards noise, for inversion). t = 0 is noise, t = 1 is data.
        sigmas: a diffusers-style decreasing sigma grid (e.g. from
            ``fastflow.schedules.flow_match_sigmas``), used as the grid t = 1 - sigma; an
            increasing one (``invert_sigmas=True``) integrates from data to noise, as a
            decreasing time_grid does. Exactly one of steps, time_grid and sigmas.
        reverse: with steps, integrate from t = 1 to 0.
        prediction: what the model returns: "velocity" (default), "epsilon", "data" or "score",
            converted to a velocity on `path` inside the fused pass. The conversion divides by
            sigma_t (data) or alpha_t (epsilon, score), which vanish at an end of most paths
            (t = 1, t = 0): the model is never evaluated there. A grid that starts at such a
            point is refused (start it just inside, e.g. at t = 1e-3); where it ends at one, a
            method that would evaluate there (Heun, RK4) takes its last step with the midpoint
            rule, as diffusers' Heun scheduler and EDM drop to Euler at sigma = 0.
        path: the affine path of a non-velocity prediction and of stochastic re-noising
            (default CondOT).
        time_convention: "t" (default) gives the model t; "sigma" gives it 1 - t and reads a
            velocity prediction as dx/dsigma = -dx/dt (diffusers' flow-matching models).
        time_scale: multiplies the time the model sees (1000 for diffusers' transformers).
        guidance_scale: classifier-free guidance scale w: a float, a [B] tensor, list or
            array (per sample) or a callable ``w(t) -> float or [B] tensor`` evaluated once
            per step when the sampler is built. None disables guidance; a step whose scale is
            1 (the conditional prediction alone) skips the unconditional call.
        guidance: "cfg" (v_u + w (v_c - v_u)) or "cfg_zero_star" (the unconditional
            prediction first scaled by alpha = <p_c, p_u> / |p_u|^2 per sample, computed on
            the model's predictions p as they come: on velocities for a velocity model, on
            the noise, data or score for the others).
        guidance_interval: (t_lo, t_hi): guide only the steps starting inside it; the others
            use the conditional prediction alone (and skip the unconditional call, unless the
            batch is doubled).
        zero_init_steps: CFG-Zero*'s zero init: the first steps use a zero velocity, whatever
            the prediction's kind (the state does not move; with `stochastic`, it is re-noised
            from its own data estimate). The model is not called for them, so a model singular
            at the start is never read, nor converted there.
        stochastic: re-noise after every Euler step instead of following the ODE: with x1^
            the data estimate of (x, v) on `path`, x' = alpha_t' x1^ + sigma_t' eps (on CondOT,
            x1^ = x + (1 - t) v and x' = t' x1^ + (1 - t') eps); increasing grids, Euler.
            The noise of sample b at step i depends only on (noise_seed, sample_ids[b], i).
            With capture, give sample_ids as a tensor on the device: a list or a CPU tensor is
            copied from the host at every call.
        noise_seed: the seed of that noise, an integer in [-2**63, 2**64) (a negative seed
            is its 64-bit two's complement, as in ``torch.manual_seed``).
        doubled_batch: call the model once on a doubled batch [uncond; cond] (the diffusers
            convention: the kwargs must then describe 2B samples) instead of twice.
        state_dtype: dtype of the integrated state; default float32 (float64 for float64 x).
        callback: ``callback(step, t, x)`` after every `callback_every` steps, x the state: a
            buffer the next steps overwrite (clone it to keep it).
        return_intermediates: also return the states after every step, [N + 1, *x.shape].
        progress: show a tqdm progress bar (if tqdm is installed).
        capture: on CUDA, record the whole loop as one CUDA graph on the first call for a
            shape and replay it afterwards (model kwargs are copied into static buffers); on
            other devices the loop runs normally. A capturing sampler serves one thread at a
            time (its graphs share static buffers); without capture, threads may share one.

    The model's input x is also a buffer that later stages overwrite, and t a view of the
    sampler's time table, shared by samplers with the same options: the model must not modify
    t in place (the run then raises an error).

    torch.compile: compile the model, not the sampler, whose options become host tables when
    it is built; ``capture=True`` records the whole loop on CUDA instead.

    Example::

        >>> sigmas = fastflow.schedules.flow_match_sigmas(28, shift=3.0)
        >>> sampler = fastflow.Sampler(model, method="euler", sigmas=sigmas,
        ...                            time_convention="sigma", time_scale=1000,
        ...                            guidance_scale=4.5, capture=True)
        >>> images = sampler(latents, uncond_kwargs={"y": null_labels}, y=labels)
    """

    def __init__(self, model, *, method="euler", steps=None, time_grid=None, sigmas=None,
                 reverse=False, prediction="velocity", path=None, time_convention="t",
                 time_scale=1.0, guidance_scale=None, guidance="cfg", guidance_interval=None,
                 zero_init_steps=0, doubled_batch=False, stochastic=False, noise_seed=0,
                 state_dtype=None, callback=None, callback_every=1, return_intermediates=False,
                 progress=False, capture=False):
        check_callable(model, "model", "model(x, t, **kwargs)")
        if not isinstance(method, str) or method not in TABLEAUS:
            raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got "
                             f"{method!r}")
        if prediction not in KINDS:
            raise ValueError(f"prediction: expected one of {', '.join(map(repr, KINDS))}, got "
                             f"{prediction!r}")
        if time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention: expected 't' or 'sigma', got {time_convention!r}")
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance: expected 'cfg' or 'cfg_zero_star', got {guidance!r}")
        if doubled_batch and guidance_scale is None:
            raise ValueError("doubled_batch: needs a guidance_scale (the doubled batch is the "
                             "[unconditional; conditional] pair of classifier-free guidance)")
        if not is_integer(zero_init_steps) or zero_init_steps < 0:
            raise ValueError(f"zero_init_steps: expected a non-negative integer, got "
                             f"{zero_init_steps!r}")
        if not is_integer(callback_every) or callback_every < 1:
            raise ValueError(f"callback_every: expected a positive integer, got {callback_every!r}")
        if callback is not None:
            check_callable(callback, "callback", "callback(step, t, x)")
        if state_dtype is not None and state_dtype not in FLOAT_DTYPES:
            raise TypeError(f"state_dtype: expected None or one of "
                            f"{', '.join(map(str, FLOAT_DTYPES))}, got {state_dtype!r}")
        self.model = model
        self.method = method
        self.prediction = prediction
        self.path = get_path(path)
        if (prediction != "velocity" or stochastic) and not isinstance(self.path, AffinePath):
            raise TypeError(f"path: converting a {prediction!r} prediction or re-noising needs "
                            f"an affine path, got {self.path!r}")
        self.time_convention = time_convention
        check_positive(time_scale, "time_scale")
        self.time_scale = float(time_scale)
        self.grid = _host_grid(steps, time_grid, sigmas, reverse)
        self.guidance_scale = guidance_scale
        self.zero_star = guidance == "cfg_zero_star"
        self.doubled_batch = bool(doubled_batch)
        self.zero_init_steps = int(zero_init_steps)
        self.stochastic, self.noise_seed = bool(stochastic), _seed(noise_seed)
        if self.stochastic and (method != "euler" or self.grid[-1] < self.grid[0]):
            raise ValueError("stochastic: re-noising is defined for method='euler' on an "
                             "increasing time grid")
        if self.stochastic:
            self._check_renoising()
        self.last_method = self._last_step_method()
        self.guidance_weights = self._guidance_weights()
        self.guided_steps = self._guided_steps(guidance_interval)
        self.state_dtype = state_dtype
        self.callback, self.callback_every = callback, int(callback_every)
        self.return_intermediates = return_intermediates
        self.progress = progress
        self.capture = capture
        self._plans = {}    # (device, math type, shared) -> this sampler's tables
        self._graphs = {}   # input signature -> captured CUDA graph and its static tensors

    # ---------------------------------------------------------------- setup (host, once)

    def _method(self, step):
        return self.last_method if step == len(self.grid) - 2 else self.method

    def _stage_times(self, method, steps):
        """Per step of `steps`, the times of the method's stages."""
        c = TABLEAUS[method][0]
        return [[self.grid[i] + cj * (self.grid[i + 1] - self.grid[i]) for cj in c] for i in steps]

    def _last_step_method(self):
        """The method of the last step (see `prediction`): the main one, or the midpoint rule
        where the main one would evaluate the model at the end of the grid and the prediction
        cannot become a velocity there. Raises for any other such evaluation."""
        last = len(self.grid) - 2
        # The zero-init steps convert nothing (their velocity is zero).
        if self.prediction == "velocity" or self.zero_init_steps > last:
            return self.method
        earlier = [tau for row in self._stage_times(self.method, range(self.zero_init_steps, last))
                   for tau in row]
        for method in dict.fromkeys((self.method, "midpoint")):
            taus = earlier + self._stage_times(method, [last])[0]
            reasons = self._unconvertible(taus)
            if not any(reasons):
                return method
            # Only stages at the end of the grid (c = 1 of the last step) can be avoided.
            ends = [False] * len(earlier) + [c == 1.0 for c in TABLEAUS[method][0]]
            if any(r and not end for r, end in zip(reasons, ends)):
                break
        tau, reason = next((tau, r) for tau, r in zip(taus, reasons) if r)
        raise ValueError(f"prediction: a {self.prediction!r} prediction cannot be turned into a "
                         f"velocity at t = {tau:g} on {self.path!r} ({reason}), where the grid "
                         f"would evaluate the model; start the grid just inside"
                         f"{_example_inside(tau, self._unconvertible)}")

    def _check_renoising(self):
        """Re-noising estimates the data from (x, v) at each step's start, dividing by
        alpha_t d_sigma_t - sigma_t d_alpha_t: refuse a grid where that vanishes (t = 0 on
        Polynomial(n > 1), say), which would amplify the model's error a millionfold."""
        alpha, sigma, d_alpha, d_sigma = self.path(_host(self.grid[:-1]))
        det = alpha * d_sigma - sigma * d_alpha
        singular = (det.abs() < DIVISOR_EPS) | ~torch.isfinite(det)
        if singular.any():
            tau = self.grid[int(singular.nonzero()[0])]
            raise ValueError(f"stochastic: re-noising cannot estimate the data from a velocity "
                             f"at t = {tau:g} on {self.path!r} (alpha_t sigma_t' - sigma_t "
                             f"alpha_t' vanishes there); start the grid just inside, e.g. at "
                             f"t = 1e-3")

    def _unconvertible(self, taus):
        """Per time, why the prediction cannot become a velocity there (its conversion divides
        by sigma_t (data) or alpha_t (epsilon, score), or the path's derivatives are infinite
        there), or None where it can."""
        alpha, sigma, d_alpha, d_sigma = self.path(_host(taus))
        name, divisor = ("sigma_t", sigma) if self.prediction == "data" else ("alpha_t", alpha)
        reasons = []
        for i in range(len(taus)):
            if not (torch.isfinite(d_alpha[i]) and torch.isfinite(d_sigma[i])):
                reasons.append(f"alpha_t' = {float(d_alpha[i]):g}, sigma_t' = "
                               f"{float(d_sigma[i]):g} there")
            elif not abs(float(divisor[i])) >= DIVISOR_EPS:
                reasons.append(f"{name} = {float(divisor[i]):g} there, below {DIVISOR_EPS:g}")
            else:
                reasons.append(None)
        return reasons

    def _guidance_weights(self):
        """Per step, the scale w: a float64 [steps, G] table, G = 1 or one column per sample."""
        if self.guidance_scale is None:
            return None
        scale = self.guidance_scale
        steps = self.grid[:-1]
        rows = ([_scale_row(scale(t)) for t in steps] if callable(scale) else
                [_scale_row(scale)] * len(steps))
        if len({len(r) for r in rows}) > 1:
            raise ValueError("guidance_scale: every step must give one scale or one per sample")
        return torch.stack(rows)

    def _guided_steps(self, interval):
        """Per step, whether it runs guidance: inside the interval, with a scale other than 1
        (w = 1 is the conditional prediction alone, CFG-Zero*'s included). A doubled batch
        still evaluates both halves outside; the step then reads the conditional one."""
        lo, hi = -float("inf"), float("inf")
        if interval is not None:
            try:
                lo, hi = (float(v) for v in interval)
            except (TypeError, ValueError):
                raise ValueError(f"guidance_interval: expected (t_lo, t_hi), got "
                                 f"{interval!r}") from None
            if not lo <= hi:
                raise ValueError(f"guidance_interval: expected (t_lo, t_hi) with t_lo <= t_hi, "
                                 f"got {interval!r}")
        if self.guidance_weights is None:
            return [False] * (len(self.grid) - 1)
        return [lo <= t <= hi and not bool((w == 1).all())
                for t, w in zip(self.grid[:-1], self.guidance_weights)]

    def _passes(self, method, stage, guided, shared):
        """The fused passes after stage `stage`'s model call, as ({output: combo}, copies) with
        each combo {stream: coefficient per step} over named streams, and copies (dst, src) of
        buffers to make after the pass:

            x     the state                      S    this stage's input, fp32 (stage > 0)
            P     the model's prediction         Pu, Pc  its unconditional and conditional ones
            K<l>  a stored stage velocity        F    the accumulated update x + h sum b_l k_l
            M     the next model input           S+   the next stage's input, fp32
            Kcur  this stage's velocity, stored when one pass would need too many streams
            E     the stochastic sampler's fresh noise
        """
        h = [t1 - t0 for t0, t1 in zip(self.grid[:-1], self.grid[1:])]
        alpha, beta = self._velocity_rows(method, stage)
        here = "x" if stage == 0 else "S"
        k = {} if self.prediction == "velocity" else {here: alpha}
        for name in (("Pu", "Pc") if guided else ("P",)):
            k[name] = beta
        out, copies = self._outputs(method, stage, h, k, shared)
        if len(_streams(out)) > _MAX_IN:
            # Store the velocity first; the rest then reads it as one stream.
            stored, copies = self._outputs(method, stage, h, {"Kcur": [1.0] * len(h)}, shared)
            return [({"Kcur": k}, []), (stored, copies)]
        return [(out, copies)]

    def _outputs(self, method, stage, h, k, shared):
        """`_passes`'s outputs and copies for one pass, the stage's velocity given as k: its
        combo of the stage's streams, or the stored stream Kcur."""
        c, a, b = TABLEAUS[method]
        last = stage == len(c) - 1
        out = {}
        if not last:
            nxt = {"x": [1.0] * len(h)}
            for l, a_l in enumerate(a[stage + 1]):
                if a_l:
                    term = k if l == stage else {f"K{l}": [1.0] * len(h)}
                    _add(nxt, term, [a_l * hi for hi in h])
            needs_fp32 = self.prediction != "velocity" or shared
            if not shared:
                out.update({m: nxt for m in (("Mu", "Mc") if self.doubled_batch else ("M",))})
            if needs_fp32:
                out["S+"] = nxt
            if any(a[m][stage] for m in range(stage + 2, len(c))):
                out[f"K{stage}"] = k
        carried = any(b[:stage])
        update = {"F": [1.0] * len(h)} if carried else {"x": [1.0] * len(h)}
        if b[stage]:
            _add(update, k, [b[stage] * hi for hi in h])
        if self.stochastic:  # Euler: x' = alpha' x1^ + sigma' eps, x1^ the data estimate
            x_coeff, v_coeff, noise = self._renoising_rows()
            update = {"x": x_coeff, "E": noise}
            _add(update, k, v_coeff)
        if last:
            if not shared:
                out.update({m: update for m in (("Mu", "Mc") if self.doubled_batch else ("M",))})
            out["x"] = update
        elif carried or b[stage]:
            out["F"] = update
        copies = []
        if len(out) > _MAX_OUT:  # the conditional half of a doubled model input is a copy
            del out["Mc"]
            copies.append(("Mc", "Mu"))
        return out, copies

    def _velocity_rows(self, method, stage):
        """Per step, the velocity k = alpha * x_stage + beta * prediction at the stage's time;
        zero in the zero-init steps (whose prediction is a zero buffer, and whose conversion
        may be undefined: t = 0 for a noise prediction)."""
        taus = [row[stage] for row in self._stage_times(method, range(len(self.grid) - 1))]
        if self.prediction == "velocity":
            sign = -1.0 if self.time_convention == "sigma" else 1.0
            alpha, beta = [0.0] * len(taus), [sign] * len(taus)
        else:
            rows = conversion_coefficients(self.path, _host(taus),
                                           self.prediction, "velocity")[:, 0]
            alpha, beta = rows[:, 0].tolist(), rows[:, 1].tolist()
        zero = min(self.zero_init_steps, len(taus))
        return [0.0] * zero + alpha[zero:], [0.0] * zero + beta[zero:]

    def _renoising_rows(self):
        """Per step t -> t', the stochastic update x' = alpha_t' x1^ + sigma_t' eps with the
        data estimate x1^ = d_x x + d_v v of (x, v) at t on the path, as the coefficients
        (alpha_t' d_x, alpha_t' d_v, sigma_t')."""
        t0 = _host(self.grid[:-1])
        to_data = conversion_coefficients(self.path, t0, "velocity", "data")[:, 0]   # [steps, 2]
        alpha, sigma, _, _ = self.path(_host(self.grid[1:]))
        return ((alpha * to_data[:, 0]).tolist(), (alpha * to_data[:, 1]).tolist(),
                sigma.tolist())

    def _plan(self, device, math, shared):
        """(passes, model times) for a run on `device` in the `math` type, built once by this
        sampler, or taken from a sampler with the same options (a one-shot
        ``fastflow.sample`` in a loop builds them once) when they compare by value."""
        plan = self._plans.get((device, math, shared))
        if plan is None:
            key = self._cache_key(device, math, shared)
            plan = _PLANS.get(key) if key is not None else None
            if plan is None:
                # Normal tensors even under inference mode: the plan outlives the call.
                with torch.inference_mode(False):
                    plan = self._build_plan(device, math, shared)
                if key is not None:
                    with _PLANS_LOCK:
                        if len(_PLANS) >= _PLAN_CACHE_SIZE:
                            del _PLANS[next(iter(_PLANS))]
                        _PLANS[key] = plan
            self._plans[device, math, shared] = plan
        return plan

    def _cache_key(self, device, math, shared):
        """The options that shape the plan, as a hashable value; None for a path of the user's
        own, which does not compare by value (its formulas can change under the same repr)."""
        path = None
        if self.prediction != "velocity" or self.stochastic:
            path = value_key(self.path)
            if path is None:
                return None
        weights = self.guidance_weights
        if weights is not None:   # the bytes hash in microseconds, even one scale per sample
            weights = (tuple(weights.shape), weights.numpy().tobytes())
        return (device, math, shared, self.method, self.last_method, tuple(self.grid),
                self.prediction, path, self.time_convention, self.time_scale,
                tuple(self.guided_steps), self.doubled_batch, weights,
                self.stochastic, self.zero_init_steps)

    def _build_plan(self, device, math, shared):
        """Every stage's passes with their coefficients on the device ([steps, G, M, K] tables,
        G = 1 unless the guidance is per sample), by (method, guided), and the model's time at
        every (step, stage). `shared`: whether the model reads the state itself (same dtype)."""
        steps = len(self.grid) - 1
        passes = {}
        for method in {self.method, self.last_method}:
            for guided in {*self.guided_steps}:
                passes[method, guided] = [
                    [_Pass(p, copies, steps, self.guidance_weights if guided else None, device,
                           math)
                     for p, copies in self._passes(method, j, guided, shared)]
                    for j in range(len(TABLEAUS[method][0]))]
        stages = len(TABLEAUS[self.method][0])   # the last step's method may have fewer
        rows = [self._stage_times(self._method(i), [i])[0] for i in range(steps)]
        taus = _host([row + [0.0] * (stages - len(row)) for row in rows])
        model_t = (taus if self.time_convention == "t" else 1 - taus) * self.time_scale
        return passes, _TimeViews(model_t.to(device=device, dtype=math))

    # ---------------------------------------------------------------- the loop

    def __call__(self, x_init, uncond_kwargs=None, sample_ids=None, **model_kwargs):
        """Sample from x_init ([B, ...] noise, or data with a reversed grid). Returns the final
        state in x_init's dtype (and the [N + 1, ...] intermediates if asked). sample_ids ([B]
        integers, default 0..B-1) name the samples for the stochastic sampler's noise. The
        other keyword arguments are the model's (so it cannot take one named x_init,
        uncond_kwargs or sample_ids)."""
        if (not isinstance(x_init, torch.Tensor) or x_init.dtype not in FLOAT_DTYPES
                or x_init.dim() < 1):
            raise TypeError(f"x_init: expected a float tensor [B, ...] (float32, float64, bfloat16 "
                            f"or float16), got {describe(x_init)}")
        if x_init.requires_grad and torch.is_grad_enabled():
            raise ValueError("x_init: requires grad, but fastflow's sampler is not "
                             "differentiable (its fused passes update buffers in place); pass "
                             "x_init.detach(), or differentiate through "
                             "fastflow.reference.sample(model, x_init, time_grid, ...), which "
                             "takes an explicit list of times")
        if _ops.transforming():
            raise RuntimeError("fastflow's sampler does not run under torch.func transforms or "
                               "forward-mode AD (its fused passes update buffers in place, "
                               "which would drop the tangents); use fastflow.reference.sample")
        groups = 1 if self.guidance_weights is None else self.guidance_weights.shape[1]
        if groups not in (1, x_init.shape[0]):
            raise ValueError(f"guidance_scale: expected one scale per sample ({x_init.shape[0]}), "
                             f"got {groups}")
        if sample_ids is not None and not self.stochastic:   # unused, but never wrong
            _sample_ids(sample_ids, x_init.shape[0], x_init.device)
        if uncond_kwargs is not None and not isinstance(uncond_kwargs, Mapping):
            raise TypeError(f"uncond_kwargs: expected a dict of the unconditional call's keyword "
                            f"arguments, got {type(uncond_kwargs).__name__}")
        guided_anywhere = any(self.guided_steps)
        if guided_anywhere and not self.doubled_batch and uncond_kwargs is None:
            raise ValueError("uncond_kwargs: guidance needs the unconditional call's keyword "
                             "arguments (e.g. uncond_kwargs={'y': null_labels}); pass {} if the "
                             "model takes none, or use doubled_batch=True")
        if self.capture and x_init.device.type == "cuda":
            if self.callback is not None or self.progress:
                raise ValueError("capture: a captured loop cannot call back to the host; drop "
                                 "callback and progress, or capture=False")
            # torch.cuda.graph captures on the current device's streams: make it x_init's.
            with torch.cuda.device(x_init.device), torch.no_grad():
                return self._replay(x_init, uncond_kwargs or {}, model_kwargs, sample_ids)
        with torch.no_grad():
            return self._run(x_init, uncond_kwargs or {}, model_kwargs, sample_ids)

    def _tables(self, x_init):
        """(state dtype, shared, plan, model times) of a run from x_init; shared: whether the
        model reads the state itself (same dtype) rather than a copy."""
        state_dtype = self.state_dtype or _ops.math_dtype(x_init.dtype)
        math = _ops.math_dtype(x_init.dtype, state_dtype)
        shared = x_init.dtype == state_dtype and not self.doubled_batch
        return (state_dtype, shared, *self._plan(x_init.device, math, shared))

    def _run(self, x_init, uncond_kwargs, model_kwargs, sample_ids=None, keep=None):
        """The loop; `keep`: a list that gets the times' entry (_TimeViews.entry) the run read,
        for a captured graph to hold."""
        state_dtype, shared, plan, model_t = self._tables(x_init)
        batch = x_init.shape[0]
        model_batch = batch * (2 if self.doubled_batch else 1)
        times_entry = model_t.entry(model_batch, _ops.math_dtype(x_init.dtype))
        if keep is not None:
            keep.append(times_entry)
        times = times_entry.views
        layout = _Layout(x_init)
        launch = layout.launcher(_ops.affine_out_launcher(x_init.device, mixed_dtypes=True))
        # fp32 tables read streams of at most fp32: an fp64 output is narrowed to them.
        math = _ops.math_dtype(x_init.dtype, state_dtype)
        narrow = math != torch.float64
        # Every buffer in x_init's layout (empty_like keeps it), so a channels_last model
        # reads and returns channels_last tensors that the passes stream as they are.
        buf = {"x": layout.empty(x_init.shape, state_dtype).copy_(x_init)}
        buf["F"] = torch.empty_like(buf["x"])
        if not shared:
            model_in = layout.empty((2 * batch if self.doubled_batch else batch, *x_init.shape[1:]),
                                    x_init.dtype)
            buf.update(M=model_in, Mu=model_in[:batch], Mc=model_in[batch:])
            model_in[:batch].copy_(x_init)
            if self.doubled_batch:
                model_in[batch:].copy_(x_init)
        stage_bufs = [torch.empty_like(buf["x"]) for _ in range(2)]
        for stages in plan.values():   # the stored velocities (K0, ..., Kcur)
            for passes in stages:
                for p in passes:
                    for name in p.outputs:
                        if name[0] == "K" and name not in buf:
                            # Kcur, split off a pass too wide for the kernel, in the tables'
                            # type: the two passes then round as the one would (and a pass of
                            # fp32 streams alone would refuse fp64 tables).
                            buf[name] = torch.empty_like(buf["x"], dtype=math if name == "Kcur"
                                                         else None)
        steps = len(self.grid) - 1
        if self.stochastic:
            ids = _sample_ids(sample_ids, batch, x_init.device)
            buf["E"] = torch.empty_like(buf["x"])
        zeros = None   # the prediction of CFG-Zero*'s first steps
        trail = None
        if self.return_intermediates:
            trail = torch.empty((steps + 1, *x_init.shape), dtype=x_init.dtype, device=x_init.device)
            trail[0].copy_(x_init)
        for i in _progress(range(steps), self.progress):
            guided = self.guided_steps[i]
            for j, passes in enumerate(plan[self._method(i), guided]):
                buf["S"], buf["S+"] = stage_bufs[j % 2], stage_bufs[(j + 1) % 2]
                if shared:
                    x_model = buf["x"] if j == 0 else buf["S"]
                else:
                    x_model = buf["M"]
                if i < self.zero_init_steps:
                    # Zeros, not the model's output times 0: a NaN there would stay NaN.
                    if zeros is None:
                        zeros = layout.empty((batch, *x_init.shape[1:]), x_init.dtype).zero_()
                    preds = {"Pu": zeros, "Pc": zeros} if guided else {"P": zeros}
                else:
                    preds = self._predict(x_model, times[i][j], guided, uncond_kwargs,
                                          model_kwargs, batch, narrow, layout)
                buf.update(preds)
                g = None
                if self.stochastic:
                    _noise.gaussian(self.noise_seed, ids, i, x_init.shape, out=buf["E"])
                if self.zero_star and guided:
                    g = _zero_star_weights(preds["Pu"], preds["Pc"], batch)
                for p in passes:
                    p.run(launch, buf, i, g)
            if trail is not None:
                trail[i + 1].copy_(buf["x"])
            if self.callback is not None and (i + 1) % self.callback_every == 0:
                self.callback(i + 1, self.grid[i + 1], buf["x"])
        model_t.check_unmodified(model_batch, _ops.math_dtype(x_init.dtype), times_entry)
        out = buf["x"].to(x_init.dtype, copy=True)
        return (out, trail) if trail is not None else out

    def _predict(self, x, t, guided, uncond_kwargs, model_kwargs, batch, narrow, layout):
        """The model's output(s) for this stage: {"P"} or {"Pu", "Pc"}, checked, in the
        buffers' layout."""
        want = (2 * batch if self.doubled_batch else batch, *x.shape[1:])
        model, conform = self.model, layout.conform
        if self.doubled_batch:
            out = conform(_checked(model(x, t, **model_kwargs), want, narrow, x))
            if not guided:
                return {"P": out[batch:]}
            return {"Pu": out[:batch], "Pc": out[batch:]}
        cond = conform(_checked(model(x, t, **model_kwargs), want, narrow, x))
        if not guided:
            return {"P": cond}
        return {"Pu": conform(_checked(model(x, t, **uncond_kwargs), want, narrow, x)),
                "Pc": cond}

    def _replay(self, x_init, uncond_kwargs, model_kwargs, sample_ids):
        """Capture the loop as a CUDA graph on the first call for this signature, then replay."""
        key = (tuple(x_init.shape), x_init.dtype, x_init.device, _signature(model_kwargs),
               _signature(uncond_kwargs))
        if key not in self._graphs:
            static_x = x_init.clone()
            static_ids = _sample_ids(sample_ids, x_init.shape[0], x_init.device).clone()
            static_kw, static_uncond = _static(model_kwargs), _static(uncond_kwargs)
            side = torch.cuda.Stream(device=x_init.device)
            side.wait_stream(torch.cuda.current_stream(x_init.device))
            with torch.cuda.stream(side):  # warm up (lazy inits, autotuning) outside the graph
                self._run(static_x, static_uncond, static_kw, static_ids)
            torch.cuda.current_stream(x_init.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            held = []
            with torch.cuda.graph(graph):
                result = self._run(static_x, static_uncond, static_kw, static_ids, keep=held)
            # The graph reads the coefficient and time tables by address: hold them for its
            # lifetime, whatever the plan cache and the times' cache evict.
            tables = (*self._tables(static_x), held)
            self._graphs[key] = graph, static_x, static_ids, static_kw, static_uncond, result, tables
        graph, static_x, static_ids, static_kw, static_uncond, result, _ = self._graphs[key]
        static_x.copy_(x_init)
        if self.stochastic:  # only the noise reads them
            static_ids.copy_(_sample_ids(sample_ids, x_init.shape[0], x_init.device))
        _copy_into(static_kw, model_kwargs)
        _copy_into(static_uncond, uncond_kwargs)
        graph.replay()
        if isinstance(result, tuple):
            return tuple(r.clone() for r in result)
        return result.clone()


class _Pass:
    """One fused affine pass of a stage: named input and output streams and, per step, the
    [G, M, K] coefficients on the device. Columns of Pu and Pc hold the prediction's weight in
    the velocity and are scaled by the guidance weights (1 - w, w): once here for a static
    scale, or per call for CFG-Zero*."""

    def __init__(self, outputs, copies, steps, weights, device, math):
        # The output that may lie on top of an input (x or F, updated in place) goes last.
        self.outputs = sorted(outputs, key=lambda name: name in ("x", "F"))
        self.copies = copies
        self.inputs = _streams(outputs)
        table = _host([[[outputs[o].get(s, [0.0] * steps)[i] for s in self.inputs]
                        for o in self.outputs] for i in range(steps)])
        self.guided_cols = [self.inputs.index(s) for s in ("Pu", "Pc") if s in self.inputs]
        table = table[:, None]                                  # [steps, 1, M, K]
        if self.guided_cols and weights is not None:
            u, c = self.guided_cols
            table = table.expand(-1, weights.shape[1], -1, -1).clone()   # [steps, G, M, K]
            table[..., u] *= (1 - weights)[:, :, None]
            table[..., c] *= weights[:, :, None]
        # One contiguous [G, M, K] view per step, indexed without a tensor op in the loop.
        self.per_step = list(table.to(device=device, dtype=math).contiguous().unbind(0))
        self.uncond_col = self.guided_cols[0] if self.guided_cols else None

    def run(self, launch, buf, step, zero_star=None):
        coeffs = self.per_step[step]
        if zero_star is not None and self.uncond_col is not None:
            # CFG-Zero*: the unconditional column is scaled by alpha per sample.
            factor = torch.ones(zero_star.shape[0], 1, len(self.inputs), dtype=coeffs.dtype,
                                device=coeffs.device)
            factor[:, 0, self.uncond_col] = zero_star
            coeffs = coeffs * factor
        launch([buf[s] for s in self.inputs], coeffs, [buf[o] for o in self.outputs])
        for dst, src in self.copies:
            buf[dst].copy_(buf[src])


class _TimeViews:
    """The model's time per (step, stage) as [B] views of one device table, made once per batch
    size and type (for the last _TIME_VIEWS_SIZE of them), so the loop hands the model a tensor
    without running an op. The type is that of the model's input x (fp32 for 16-bit models;
    fp64 only for fp64 x, whatever the state's type). A model that writes into its t would
    change the times of every later call (PyTorch refuses the write into a view expanded over a
    batch, not into a batch of one's): `check_unmodified` tells, from the table's version
    counter."""

    def __init__(self, table):
        self.table = table
        self.views = _ops.DeviceCache(_TIME_VIEWS_SIZE)   # (batch, dtype) -> _Times

    def entry(self, batch, dtype):
        """The _Times for `batch` and `dtype`, from the cache (DeviceCache: bounded, bypassed
        while a CUDA graph captures). A run holds the entry it read and checks that one
        (`check_unmodified`): another run, in another thread, may drop it from the cache
        meanwhile."""
        def build():
            with torch.inference_mode(False):   # a version counter to check, also in a capture
                copy = self.table.to(dtype, copy=True)
                return _Times(copy, copy._version, [
                    [t.expand(batch) for t in row.unbind(0)] for row in copy.unbind(0)])
        return self.views.get((batch, dtype), self.table.device, build, direct=True)

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle) makes views of its own table when first asked: copied,
        # the views would not be views of it, and deepcopy bumps its version counter.
        return {"table": self.table, "views": _ops.DeviceCache(_TIME_VIEWS_SIZE)}

    def check_unmodified(self, batch, dtype, entry):
        """Raise if the model wrote into the times of `entry` (from `entry(batch, dtype)`),
        dropping them."""
        if entry.copy._version != entry.version:
            self.views.discard((batch, dtype), entry)
            raise RuntimeError(_T_WRITTEN)


class _Times(NamedTuple):
    """The model's times for one batch size and type: a copy of the table, its version when
    made, and the [B] views of it per (step, stage)."""
    copy: torch.Tensor
    version: int
    views: list

    # Where DeviceCache finds it.
    device = property(lambda self: self.copy.device)
    is_cuda = property(lambda self: self.copy.is_cuda)


_T_WRITTEN = ("model: it modified its t in place (t.mul_(1000), t += 1, ...), and the sampler "
              "hands every call a view of one time table, so later calls saw the changed times "
              "and the result is wrong; compute a new tensor instead (t = t * 1000)")


def _zero_star_weights(uncond, cond, batch):
    """alpha_b = <v_c, v_u> / |v_u|^2 per sample (CFG-Zero*), on the device, no host sync."""
    dots = _ops.affine_dot([cond, uncond], [uncond], batch)[:, :, 0]
    return dots[:, 0] / (dots[:, 1] + _ZERO_STAR_EPS)


def _example_inside(tau, reasons):
    """The end of a refusal at the grid's end tau: an example time just inside it where
    `reasons` (Sampler._unconvertible) finds nothing, with a margin (also 10% closer to the
    end: the example rounded to float32 must pass too)."""
    near = [1e-3, 1e-2, 0.05, 0.1]
    side = (lambda d: d) if tau < 0.5 else (lambda d: 1 - d)
    fine = [side(d) for d, reason in zip(near, reasons([side(0.9 * d) for d in near]))
            if reason is None]
    return f", e.g. at t = {fine[0]:g}" if fine else ""


def _add(combo, term, scale):
    """combo += scale * term, coefficient lists per step."""
    for name, coeff in term.items():
        current = combo.setdefault(name, [0.0] * len(scale))
        combo[name] = [cur + s * c for cur, s, c in zip(current, scale, coeff)]


def _sample_ids(ids, batch, device):
    if ids is None:
        return torch.arange(batch, device=device)
    try:
        ids = torch.as_tensor(ids, device=device)
    except (TypeError, ValueError, RuntimeError) as err:   # a meta tensor, strings, ...
        raise ValueError(f"sample_ids: expected {batch} integers, got {describe(ids)} "
                         f"({err})") from None
    if (ids.shape != (batch,) or ids.is_floating_point() or ids.is_complex()
            or ids.dtype == torch.bool):
        raise ValueError(f"sample_ids: expected {batch} integers, got {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")
    return ids.to(torch.int64)


def _host(values):
    """Numbers (nested lists of them) as a float64 CPU tensor: the tables the sampler builds
    on the host, wherever torch.set_default_device points."""
    return torch.tensor(values, dtype=torch.float64, device="cpu")


def _seed(seed):
    if not is_integer(seed) or not -2**63 <= seed < 2**64:
        raise ValueError(f"noise_seed: expected an integer in [-2**63, 2**64), got {seed!r}")
    return int(seed)


def _scale_row(value):
    """One step's guidance scale as a 1-D float64 host tensor: one entry, or one per sample
    (from a tensor, a list or an array)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return _finite_scales(_host([float(value)]), value)
    try:
        scales = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device="cpu")
        if not isinstance(value, torch.Tensor) and scales.dtype != torch.bool:
            # Python floats are float64: keep every digit, as a single scale keeps them.
            scales = torch.as_tensor(value, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        scales = None
    # An empty row is the scales of an empty batch (a rank's shard of sample_distributed).
    # True is no scale (it would read as w = 1, no guidance), nor is a meta tensor.
    if (scales is None or scales.dim() > 1 or scales.is_complex()
            or scales.dtype == torch.bool or scales.is_meta):
        got = (f"a {scales.dtype} tensor of shape {tuple(scales.shape)} on {scales.device}"
               if scales is not None else repr(value))
        raise ValueError(f"guidance_scale: expected a real number or a [B] tensor of scales "
                         f"(one per sample), or a callable giving one per step; got {got}")
    return _finite_scales(scales.detach().to("cpu", torch.float64).reshape(-1), value)


def _finite_scales(row, value):
    if not torch.isfinite(row).all():
        raise ValueError(f"guidance_scale: expected finite scales, got {value!r}")
    return row


def _streams(outputs):
    """The input streams the outputs read, in a fixed order."""
    order = ["x", "S", "F", "Kcur", "K0", "K1", "K2", "P", "Pu", "Pc", "E"]
    used = {name for combo in outputs.values() for name in combo}
    return [name for name in order if name in used]


def _checked(out, shape, narrow, model_input):
    """The model's output after the checks that keep the fused pass in bounds (shape, float
    type, device); fp64 narrowed to fp32 where the tables are fp32; a copy if it shares memory
    with the model's input (an identity or in-place model), which the pass may overwrite before
    it reads the output there; resolved if it has the negative bit. The model's inputs are
    sampler buffers at the start of storages of their own, so an output of their size shares
    memory with one exactly when its storage starts there: one comparison, whichever storage
    object (a NumPy round trip, DLPack) the model hands back."""
    if not isinstance(out, torch.Tensor) or out.shape != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: expected an output of shape {shape}, got {got}")
    if out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"model: expected a floating output (float32, float64, bfloat16 or "
                         f"float16), got {out.dtype}")
    if out.device != model_input.device:
        raise ValueError(f"model: expected an output on {model_input.device} (its input's "
                         f"device), got {out.device}")
    if out.layout != torch.strided:
        raise TypeError(f"model: expected a dense output, got a {out.layout} one")
    if narrow and out.dtype == torch.float64:
        out = out.float()
    elif out.untyped_storage().data_ptr() == model_input.untyped_storage().data_ptr():
        out = out.clone()
    if out.is_neg():   # its memory holds minus its values (x.conj().imag), which a pass reads
        out = out.resolve_neg()
    return out


def _as_is(x):
    return x


class _Layout:
    """The memory layout of the sampler's buffers: x_init's when it is dense with the batch
    outermost (channels_last, say: ``_ops.flat_layout``), else contiguous. The passes stream
    such buffers through contiguous [B, n] views of their memory."""

    def __init__(self, x_init):
        self.device = x_init.device
        self.order = None   # the dimensions from outermost to innermost in memory
        # conform(x): a model's output x in this layout, called once per model call.
        if _ops.flat_layout([x_init], 1):
            # The batch outermost whatever its stride: a batch of one may have any (an image
            # permuted from HWC, say), and the doubled batch of guidance must not interleave.
            self.order = [0] + sorted(range(1, x_init.dim()), key=lambda d: (-x_init.stride(d), d))
            self.conform = self._permuted
        elif _ops.takes_any_layout(self.device):
            # The CPU kernels read a model's output as it lies: a slice of a wider output (the
            # velocity half of a network that also predicts a variance) in place, other layouts
            # through a copy of their own.
            self.conform = _as_is
        else:   # no Python in between
            self.conform = torch.Tensor.contiguous

    def empty(self, shape, dtype):
        if self.order is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return torch.empty_permuted(shape, self.order, dtype=dtype, device=self.device)

    def strides(self, shape):
        strides, step = [0] * len(shape), 1
        for d in reversed(self.order):
            strides[d] = step
            step *= shape[d]
        return tuple(strides)

    def _permuted(self, x):
        """x in the permuted layout (the strides of dimensions of size 1 do not matter): itself
        when it is, else a copy."""
        if x.numel() == 0 or all(n == 1 or a == b for n, a, b in
                                 zip(x.shape, x.stride(), self.strides(x.shape))):
            return x
        return self.empty(x.shape, x.dtype).copy_(x)

    def launcher(self, launch):
        """`launch` (inputs, coeffs, outputs) on the streams' contiguous views."""
        if self.order is None:
            return launch
        flat = _ops.flat_view
        return lambda inputs, coeffs, outputs: launch([flat(x) for x in inputs], coeffs,
                                                      [flat(o) for o in outputs])


def _host_grid(steps, time_grid, sigmas, reverse):
    """The t grid as Python floats (read once, when the sampler is built)."""
    given = [name for name, v in (("steps", steps), ("time_grid", time_grid), ("sigmas", sigmas))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"steps, time_grid, sigmas: give exactly one, got "
                         f"{', '.join(given) or 'none'}")
    if steps is not None:
        if not is_integer(steps) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps!r}")
        grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device="cpu").tolist()
        return grid[::-1] if reverse else grid
    if reverse:
        raise ValueError("reverse: only with steps; give a decreasing time_grid instead")
    name, values = ("time_grid", time_grid) if time_grid is not None else ("sigmas", sigmas)
    if not isinstance(values, torch.Tensor):   # Python floats are float64: keep every digit
        try:
            values = _host(values)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name}: expected a 1-D floating grid of at least 2 points, got "
                             f"{values!r}") from None
    if values.is_meta:
        raise ValueError(f"{name}: expected a grid of numbers, got a meta tensor (no values)")
    if values.dim() != 1 or values.numel() < 2 or not values.is_floating_point():
        raise ValueError(f"{name}: expected a 1-D floating grid of at least 2 points, got shape "
                         f"{tuple(values.shape)} and dtype {values.dtype}")
    grid = values.double().cpu().tolist()
    if not all(abs(t) < float("inf") for t in grid):
        raise ValueError(f"{name}: expected finite values, got {values.tolist()}")
    if name == "sigmas":
        grid = [1.0 - s for s in grid]
    diffs = [t1 - t0 for t0, t1 in zip(grid[:-1], grid[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(f"{name}: expected a strictly monotone grid, got {values.tolist()}")
    return grid


def _progress(steps, show):
    if not show:
        return steps
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); sampling without a bar",
                      stacklevel=3)
        return steps
    return tqdm(steps, desc="sampling")


def _signature(kwargs):
    """What a captured graph is specialised on: each tensor's shape and dtype (its values are
    copied in before every replay), and the other arguments by value."""
    for k, v in kwargs.items():
        if not isinstance(v, torch.Tensor) and (_holds_tensor(v) or not _hashable(v)):
            raise ValueError(f"capture: model keyword argument {k!r} must be a tensor or a "
                             f"hashable constant, got {type(v).__name__} (a graph reads tensors "
                             f"inside containers by address, so new values would be ignored)")
    return tuple(sorted((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, v)
                        for k, v in kwargs.items()))


def _holds_tensor(value):
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return isinstance(value, (list, tuple, set)) and any(_holds_tensor(v) for v in value)


def _hashable(value):
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _static(kwargs):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _copy_into(static, kwargs):
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            static[k].copy_(v)


# The options fastflow.sample passes on to the Sampler (everything but the model).
_OPTIONS = frozenset(inspect.signature(Sampler).parameters) - {"model"}
