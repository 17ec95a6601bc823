"""Flow-map matching (DESIGN.md section 4): a network phi(x, s, t) that jumps from time s to t.

    match        |phi(x0, 0, t) - x_t|^2                       the jump from noise lands on the path
    consistency  |phi(phi(x_s, s, u), u, t) - phi(x_s, s, t)|^2  two jumps equal one (s <= u <= t)
    identity     |phi(x_t, t, t) - x_t|^2                      a jump of length zero stays put

Each term is a per-sample mean of squares reduced by the fused kernel (the match target x_t is
built inside it, never materialised) and the total is their weighted sum.
"""
import torch

from . import _ops
from ._checks import (FLOAT_DTYPES, batch_time, check_callable, check_like, describe,
                      path_inputs, real_number)
from .losses import check_reduction
from .paths import AffinePath, coefficients, get_path


def flow_map_loss(model, x0, x1, t, s=None, u=None, path=None, match_weight=1.0,
                  consistency_weight=1.0, identity_weight=1.0, reduction="mean", **model_kwargs):
    """Weighted sum of the match, consistency and identity losses of a two-time map.

    Args:
        model: called as ``model(x, s, t, **model_kwargs)`` with s and t [B] tensors; returns
            the state at time t of the trajectory through x at time s.
        x0, x1: noise and data samples, same shape, dtype and device.
        t: the target time of the jumps, a float or one per sample.
        s, u: start and intermediate times of the consistency term (default 0 and (s + t) / 2);
            x_s, the start point, is the path at s.
        path: an affine path or its name (default CondOT).
        match_weight, consistency_weight, identity_weight: weights of the terms, finite
            numbers (a zero weight skips that term's network calls) or tensors that broadcast
            to [B] (per sample, or learned).
        reduction: "mean", "sum" or "none" (per sample), as in ``flow_matching_loss``.

    Example::

        >>> loss = fastflow.flow_map_loss(phi, x0, x1, torch.rand(B))
        >>> loss.backward()
    """
    check_callable(model, "model", "model(x, s, t)")
    path = get_path(path)
    if not isinstance(path, AffinePath):
        raise TypeError(f"path: flow-map matching needs an affine path, got {path!r}")
    check_reduction(reduction)
    path_inputs(path, x0, x1, None)
    batch = x1.shape[0]
    match_weight, consistency_weight, identity_weight = (
        _term_weight(w, name, x1) for w, name in ((match_weight, "match_weight"),
                                                  (consistency_weight, "consistency_weight"),
                                                  (identity_weight, "identity_weight")))
    t = batch_time(t, x1).expand(batch)
    s = batch_time(s, x1, "s").expand(batch) if s is not None else torch.zeros_like(t)
    u = batch_time(u, x1, "u").expand(batch) if u is not None else (s + t) / 2
    model_t, model_s, model_u = (v.to(torch.float32 if x1.dtype != torch.float64 else x1.dtype)
                                 for v in (t, s, u))

    def location(at):
        return coefficients(path, at, at.dtype)[:, 0]  # [B, 2] over (x0, x1)

    def phi(x, start, end):
        out = model(x, start, end, **model_kwargs)
        check_like(out, x1, "model output", "x1")   # the passes pair elements by position
        return out

    one = torch.ones_like(t)[:, None]
    total = x1.new_zeros((batch,), dtype=_ops.math_dtype(x1.dtype))
    if _runs(match_weight):
        jump = phi(x0, torch.zeros_like(model_t), model_t)
        rows = torch.cat([one, -location(t)], dim=1)
        total = total + match_weight * _mean_square([jump, x0, x1], rows)
    if _runs(consistency_weight) or _runs(identity_weight):
        points = torch.stack([location(s), location(t)], dim=1).to(_ops.math_dtype(x1.dtype))
        x_s, x_t = _ops.affine([x0, x1], points)
    if _runs(consistency_weight):
        two_jumps = phi(phi(x_s, model_s, model_u), model_u, model_t)
        one_jump = phi(x_s, model_s, model_t)
        rows = torch.cat([one, -one], dim=1)
        total = total + consistency_weight * _mean_square([two_jumps, one_jump], rows)
    if _runs(identity_weight):
        stay = phi(x_t, model_t, model_t)
        rows = torch.cat([one, -one], dim=1)
        total = total + identity_weight * _mean_square([stay, x_t], rows)
    return _reduce(total, reduction)


def _mean_square(inputs, rows):
    """Per-sample mean of (sum_k rows[:, k] * inputs[k])^2 over each sample's elements, fused:
    rows is [B, K] and the combination is never written out."""
    coeffs = rows[:, None, :].to(_ops.math_dtype(inputs[0].dtype))
    batch = rows.shape[0]
    return _ops.affine_sqnorm(inputs, coeffs) / (inputs[0].numel() // batch if batch else 0)


def _reduce(per_sample, reduction):
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def _term_weight(value, name, x1):
    """A term's weight: a finite number, or a float tensor of shape [], [1] or [B] on x1's
    device (a 0-d one may stay on the CPU): a [B, 1] weight would broadcast the per-sample
    terms to [B, B], and its mean is not the mean of the weighted terms."""
    if not isinstance(value, torch.Tensor):
        return real_number(value, name)
    batch = x1.shape[0]
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a number or a floating-point tensor, got {value.dtype}")
    if value.dim() > 1 or value.numel() not in (1, batch):
        raise ValueError(f"{name}: expected a number or a tensor of shape [{batch}] (one weight "
                         f"per sample) or [1], got shape {tuple(value.shape)}")
    if value.device != x1.device and not (value.dim() == 0 and value.device.type == "cpu"):
        raise ValueError(f"{name}: expected a tensor on {x1.device}, got {value.device}")
    return value


def _runs(weight):
    """Whether a term's network calls are made: always for a tensor weight (reading its value
    would wait for the device), else unless the weight is 0."""
    return isinstance(weight, torch.Tensor) or weight != 0.0


def sample_flow_map(model, x_init, steps=None, time_grid=None, **model_kwargs):
    """Sample with a two-time map phi(x, s, t) by jumping along a grid:
    x_{i+1} = phi(x_i, t_i, t_{i+1}). One step (the default) is phi(x_init, 0, 1); more steps
    compose shorter jumps, which a consistent map makes more accurate.

    Args:
        model: ``model(x, s, t, **model_kwargs)`` with s and t [B] tensors on x's device,
            views of a cached grid that it must not modify in place (that raises an error).
        x_init: noise [B, ...] (or data, with a decreasing time_grid).
        steps: number of jumps on a uniform grid from 0 to 1 (one without time_grid).
        time_grid: an explicit monotone grid instead (a tensor or a list of floats).

    Example::

        >>> x = fastflow.sample_flow_map(phi, torch.randn(16, 3, 32, 32))           # one jump
        >>> x = fastflow.sample_flow_map(phi, torch.randn(16, 3, 32, 32), steps=4)
    """
    from .sampling import _host_grid

    check_callable(model, "model", "model(x, s, t)")
    if not isinstance(x_init, torch.Tensor) or x_init.dtype not in FLOAT_DTYPES or x_init.dim() < 1:
        raise TypeError(f"x_init: expected a float tensor [B, ...] (float32, float64, bfloat16 or "
                        f"float16), got {describe(x_init)}")
    if steps is not None and time_grid is not None:
        raise ValueError("steps, time_grid: give one of them, got both")
    if steps is None and time_grid is None:
        steps = 1
    grid = _host_grid(steps, time_grid, None, False)
    times = _device_times(tuple(grid), x_init.device, _ops.math_dtype(x_init.dtype))
    version = times._version
    batch = x_init.shape[0]
    x = x_init
    for i in range(len(grid) - 1):
        x = model(x, times[i].expand(batch), times[i + 1].expand(batch), **model_kwargs)
        if (not isinstance(x, torch.Tensor) or x.shape != x_init.shape or x.dtype != x_init.dtype
                or x.device != x_init.device or x.layout != x_init.layout):
            got = (f"a {x.layout} {x.dtype} of shape {tuple(x.shape)} on {x.device}"
                   if isinstance(x, torch.Tensor) else type(x).__name__)
            raise ValueError(f"model: expected the map to return a {x_init.dtype} tensor of shape "
                             f"{tuple(x_init.shape)} on {x_init.device} (like x_init), got {got}")
    if times._version != version:   # a batch of one's times are writable views of the cache
        _times.clear()
        raise RuntimeError("model: it modified its s or t in place (t.mul_(1000), ...), and "
                           "they are views of one time grid, so later jumps saw the changed "
                           "times and the result is wrong; compute new tensors instead "
                           "(t = t * 1000)")
    return x


_times = _ops.DeviceCache(maxsize=32)


def _device_times(grid, device, dtype):
    """The grid (a tuple) as times of `dtype` (the math type, as flow_map_loss gives the model)
    on `device`, made once per grid, device and dtype: a copy from the host on every call would
    make the host wait for the GPU each time. Built by fills, without a copy from the host,
    which a CUDA graph could not capture."""
    return _times.get((grid, device, dtype), device, lambda: torch.stack(
        [torch.full((), v, dtype=dtype, device=device) for v in grid]))
