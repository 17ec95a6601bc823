"""Sampling schedules: the sigmas of diffusers' FlowMatchEulerDiscreteScheduler, and time grids.

diffusers counts noise levels down, sigma = 1 at pure noise to sigma = 0 at data; fastflow counts
time up, t = 0 at noise (x0) to t = 1 at data (x1), so t = 1 - sigma (DESIGN.md section 6).

:func:`flow_match_sigmas` gives, bit for bit and in fp32, the ``.sigmas`` that diffusers 0.42's
``FlowMatchEulerDiscreteScheduler(**config)`` holds after ``set_timesteps(num_steps, sigmas=...,
mu=...)``: ``num_steps`` decreasing sigmas and a final 0. It replays the scheduler's arithmetic,
numpy float64 and float32 steps included, without depending on diffusers. :func:`time_grid` turns
those sigmas into the increasing t grid a fastflow sampler walks::

    >>> mu = fastflow.schedules.calculate_shift(4096)          # a 1024 x 1024 FLUX image
    >>> sigmas = fastflow.schedules.flow_match_sigmas(
    ...     28, sigmas=np.linspace(1, 1 / 28, 28), mu=mu, use_dynamic_shifting=True)
    >>> sigmas.shape, sigmas[0].item(), sigmas[-1].item()
    (torch.Size([29]), 1.0, 0.0)
    >>> t = fastflow.schedules.time_grid(sigmas)                # 0 = t_0 < t_1 < ... < t_28 = 1

The legacy behaviour of the scheduler is kept on purpose, since models were tuned with it:

* Without explicit ``sigmas`` the grid runs linearly (in float64) between the first and last of
  the scheduler's 1000 training sigmas, which ``__init__`` already shifted by the static
  ``shift``: set_timesteps shifts them once more, so the static shift is applied twice (and the
  last sigma before the appended 0 is shift(shift(1/1000)), not 0).
* Explicit ``sigmas`` are rounded to float32 first and every later step stays in float32 until a
  Karras, exponential or beta respacing, which works in float64 between the shifted ends.
* ``use_dynamic_shifting`` replaces the static ``shift`` (which is then ignored, in ``__init__``
  too) by the resolution shift ``mu``; ``mu`` is ignored without it.
* ``shift_terminal`` is tested for truth, so 0 means "off".
* ``invert_sigmas`` (Mochi) returns 1 - sigmas followed by a final 1: an increasing sequence.

Where diffusers would return NaN or complex values, a ValueError says why instead: a
``shift_terminal`` stretch whose last shifted sigma is 1 (one step, say), a shift <= 0, a
Karras grid with a negative end, a linear time shift with mu <= 0, a shift, mu or
shift_terminal that is not finite, and any other config whose sigmas come out NaN (a mu so
negative that e^mu is 0, say). A ``shift_terminal`` outside [0, 1), which diffusers stretches
to sigmas below 0 or above 1, is refused too.
"""
import math
import numbers

import numpy as np
import torch

from ._checks import as_device

__all__ = ["calculate_shift", "flow_match_sigmas", "time_grid", "uniform_time_grid"]

TIME_SHIFT_TYPES = ("exponential", "linear")
RESPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5,
                    max_shift=1.15):
    """The resolution shift mu of diffusers' FLUX / SD3-style pipelines, as a Python float.

    mu is linear in the number of image tokens: base_shift at base_seq_len, max_shift at
    max_seq_len (and extrapolated beyond them). Computed with the pipelines' exact operations, so
    the float is the same one they pass to the scheduler.

    Args:
        image_seq_len: number of latent tokens, e.g. (H / 16) * (W / 16) for FLUX.
        base_seq_len, max_seq_len, base_shift, max_shift: the scheduler config's
            ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift`` and ``max_shift``.
    """
    for name, value in (("image_seq_len", image_seq_len), ("base_seq_len", base_seq_len),
                        ("max_seq_len", max_seq_len), ("base_shift", base_shift),
                        ("max_shift", max_shift)):
        _check_number(name, value)
    if max_seq_len == base_seq_len:
        raise ValueError(f"calculate_shift: max_seq_len must differ from base_seq_len, both are "
                         f"{base_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return float(image_seq_len * m + b)


def _check_number(name, value, low=None, low_open=False, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a real number'}, got {value!r}")
    if not integer and not math.isfinite(value):   # NaN passes every comparison below
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")


def _user_sigmas(sigmas):
    """Custom sigmas as diffusers reads them: ``np.array(sigmas).astype(np.float32)``."""
    if isinstance(sigmas, torch.Tensor):  # exact upcast first, so bf16 / CUDA tensors work too
        sigmas = sigmas.detach().cpu().to(torch.float64).numpy()
    try:
        array = np.array(sigmas).astype(np.float32)
    except (TypeError, ValueError) as err:
        raise TypeError(f"sigmas must be a 1-D sequence of numbers, got {type(sigmas).__name__}") from err
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"sigmas must be 1-D and non-empty, got shape {tuple(array.shape)}")
    return array


def flow_match_sigmas(num_steps=None, *, sigmas=None, mu=None, num_train_timesteps=1000, shift=1.0,
                      use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
                      use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                      time_shift_type="exponential", stochastic_sampling=False, device=None,
                      **config_metadata):
    """The sigmas of diffusers' FlowMatchEulerDiscreteScheduler, bit-identical, as fp32.

    Equal to ``FlowMatchEulerDiscreteScheduler(**config).set_timesteps(num_steps, sigmas=sigmas,
    mu=mu)`` followed by ``.sigmas`` (diffusers 0.42), where config holds the keyword arguments
    below. The steps, in the scheduler's order: the grid (explicit ``sigmas``, or a linspace
    between the shifted training sigmas), the static shift s sigma / (1 + (s - 1) sigma) or the
    dynamic one e^mu / (e^mu + 1/sigma - 1) ("linear": mu / (mu + 1/sigma - 1)), the stretch to
    ``shift_terminal``, one optional respacing, then the appended 0 (1 with ``invert_sigmas``).

    Args:
        num_steps: number of sampling steps N; may be None when ``sigmas`` is given.
        sigmas: optional custom sigmas (list, numpy array or tensor), N of them, before shifting;
            FLUX pipelines pass ``np.linspace(1, 1 / N, N)``. Not required to be decreasing.
        mu: the resolution shift (see :func:`calculate_shift`); required with
            ``use_dynamic_shifting``, ignored otherwise.
        num_train_timesteps, shift, use_dynamic_shifting, invert_sigmas, shift_terminal,
            use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, time_shift_type: the
            scheduler config. Beta respacing needs scipy.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len, stochastic_sampling:
            accepted so that a whole scheduler config can be passed
            (``flow_match_sigmas(28, **scheduler.config)``); they do not change the result
            (pipelines turn the first four into ``mu`` with :func:`calculate_shift`).
        **config_metadata: the config's own entries (``_class_name``, ``_diffusers_version``,
            ``_use_default_values``), ignored; any other name is an error.
        device: where the result goes; it is always computed on the CPU, then moved.

    Returns:
        A float32 tensor of N + 1 sigmas, decreasing from at most 1 to a final 0 for the usual
        configs (increasing to a final 1 with ``invert_sigmas``).
    """
    # Argument checks, with the scheduler's own errors where it has one.
    device = as_device(device)
    unknown = sorted(name for name in config_metadata if not name.startswith("_"))
    if unknown:
        raise TypeError(f"flow_match_sigmas() got an unexpected keyword argument {unknown[0]!r}")
    if num_steps is not None:
        _check_number("num_steps", num_steps, low=1, integer=True)
    _check_number("num_train_timesteps", num_train_timesteps, low=1, integer=True)
    if not use_dynamic_shifting:   # the dynamic shift ignores it, as diffusers does
        _check_number("shift", shift, low=0, low_open=True)
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
    chosen = [name for name, on in zip(RESPACINGS, (use_karras_sigmas, use_exponential_sigmas,
                                                    use_beta_sigmas)) if on]
    if len(chosen) > 1:
        raise ValueError(f"only one of {', '.join(RESPACINGS)} can be True, got {', '.join(chosen)}")
    if use_dynamic_shifting:
        if mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting=True (see calculate_shift)")
        if isinstance(mu, torch.Tensor) and mu.numel() == 1:   # math.exp reads it in diffusers
            mu = mu.item()
        _check_number("mu", mu)
        if time_shift_type == "linear" and mu <= 0:
            raise ValueError(f"mu must be > 0 with time_shift_type='linear', got {mu!r}")
    if shift_terminal is False:   # a config's "off", as diffusers' truth test reads it
        shift_terminal = None
    if shift_terminal is not None:
        _check_number("shift_terminal", shift_terminal, low=0)
        if shift_terminal >= 1:
            raise ValueError(f"shift_terminal must be in [0, 1), got {shift_terminal!r}")
    if sigmas is None and num_steps is None:
        raise ValueError("pass num_steps, sigmas or both")

    if sigmas is None:
        # __init__'s training sigmas, of which set_timesteps reads only the two ends: N / N and
        # 1 / N in float32, statically shifted unless the shift is dynamic (torch, float32).
        ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32,
                            device="cpu") / num_train_timesteps
        if not use_dynamic_shifting:
            ends = shift * ends / (1 + (shift - 1) * ends)
        sigma_max, sigma_min = ends.tolist()
        # set_timesteps: a float64 linspace in timestep units, back to sigmas.
        grid = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
        grid = grid / num_train_timesteps
    else:
        grid = _user_sigmas(sigmas)
        if num_steps is not None and len(grid) != num_steps:
            raise ValueError(f"sigmas should have the same length as num_steps, got {len(grid)} and "
                             f"{num_steps}")
    n = len(grid)

    # Shift, in numpy and in the grid's dtype (Python scalars do not promote float32 arrays).
    # A sigma of 0 goes through 1 / 0 = inf to 0, as in diffusers; NaN is refused below.
    with np.errstate(divide="ignore", invalid="ignore"):
        if not use_dynamic_shifting:
            grid = shift * grid / (1 + (shift - 1) * grid)
        elif time_shift_type == "exponential":
            grid = math.exp(mu) / (math.exp(mu) + (1 / grid - 1))
        else:
            grid = mu / (mu + (1 / grid - 1))

    if shift_terminal:  # truth test, as in diffusers: 0 turns it off
        one_minus = 1 - grid
        if one_minus[-1] == 0:
            raise ValueError("shift_terminal: the last shifted sigma is 1, so there is nothing to stretch "
                             "(diffusers returns nan here); use more steps or a last sigma below 1")
        grid = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))

    if chosen:
        # Respacings keep the shifted ends (as Python floats) and work in float64.
        lo, hi = grid[-1].item(), grid[0].item()
        if use_karras_sigmas:
            if min(lo, hi) < 0:
                raise ValueError(f"use_karras_sigmas needs sigmas >= 0, the shifted ends are {hi}, {lo}")
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            lo_inv, hi_inv = lo ** (1 / rho), hi ** (1 / rho)
            grid = (hi_inv + ramp * (lo_inv - hi_inv)) ** rho
        elif use_exponential_sigmas:
            if min(lo, hi) <= 0:
                raise ValueError(f"use_exponential_sigmas needs sigmas > 0, the shifted ends are "
                                 f"{hi}, {lo}")
            grid = np.exp(np.linspace(math.log(hi), math.log(lo), n))
        else:
            try:
                import scipy.stats
            except ImportError as err:
                raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy)") from err
            ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
            grid = lo + ppf * (hi - lo)

    out = torch.from_numpy(np.asarray(grid)).to(torch.float32)
    if out.isnan().any():
        cause = f"mu={mu!r}" if use_dynamic_shifting else f"shift={shift!r}"
        raise ValueError(f"the sigmas of this config are NaN from step "
                         f"{int(out.isnan().nonzero()[0])} (diffusers returns them so): check "
                         f"{cause} and the grid")
    # The final value is appended in fp32 explicitly (diffusers uses the default dtype there).
    if invert_sigmas:
        out = torch.cat([1.0 - out, torch.ones(1, dtype=torch.float32, device="cpu")])
    else:
        out = torch.cat([out, torch.zeros(1, dtype=torch.float32, device="cpu")])
    return out.to(device) if device is not None else out


def time_grid(sigmas):
    """fastflow's time grid t = 1 - sigma, in fp32, on the device of ``sigmas``.

    For the (non-inverted) output of :func:`flow_match_sigmas` this increases from t_0 = 1 -
    sigma_0 (0 for the usual schedules, which start at sigma = 1) to exactly 1 (the final sigma 0);
    the sampler steps with h = t_{i+1} - t_i. Do not use it on ``invert_sigmas`` schedules, which
    already count up.
    """
    try:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"sigmas: expected a 1-D grid of numbers, got {sigmas!r}") from None
    if sigmas.dim() != 1:
        raise ValueError(f"sigmas: expected a 1-D grid, got shape {tuple(sigmas.shape)}")
    return 1 - sigmas


def uniform_time_grid(num_steps, device=None, dtype=torch.float32):
    """The uniform grid 0 = t_0 < t_1 < ... < t_N = 1 of N = ``num_steps`` equal steps."""
    _check_number("num_steps", num_steps, low=1, integer=True)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype for the times, got {dtype!r}")
    return torch.linspace(0, 1, num_steps + 1, device=device, dtype=dtype)
