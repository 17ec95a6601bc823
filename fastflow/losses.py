"""The fused flow-matching loss: the regression target is built inside the reduction kernel.

    loss_b = weight_b * mean_i (pred[b, i] - target[b, i])^2

with the target of the chosen kind (velocity u_t, noise x0, data x1 or score -x0 / sigma_t) an
affine function of (x0, x1[, noise]) per sample. The residual pred - target is one row of the
affine family over (pred, x0, x1[, noise]); its squared norm per sample (or over the whole
batch, for an unweighted mean or sum of constant rows) is reduced in the kernel (fp64
accumulation, fixed order; on CPU the sum over the groups too, in an order that the thread
count does not change: `_total`), so neither the target nor the squared error is ever
materialised. The backward is one more affine pass writing the gradients of the
inputs that need them (dL/dpred first among them). In eager calls the loss is one autograd node:
_LossNode, or for the training step on CPU (the gradient to pred alone) the C++ node of
csrc/loss_cpu.cpp.
"""
import torch

from . import _backends, _ops
from ._checks import (batch_time, check_like, check_stream, check_time, formula_dtype,
                      formula_time, path_inputs)
from .conversions import DIVISOR_EPS, _check_kind, _safe
from .paths import (AffinePath, ConstantNoise, CondOT, TargetCFM, coefficients, get_path,
                    value_key, velocity_residual)

REDUCTIONS = ("mean", "sum", "none")


def target_coefficients(path, t, prediction, eps=DIVISOR_EPS, backend=None):
    """[G, K] coefficients of the regression target of kind `prediction` over (x0, x1[, noise]),
    computed in float64 from the times t (any float type); `backend` as in
    ``paths.coefficients``."""
    if prediction == "velocity":
        return coefficients(path, t, formula_dtype(t.device), backend)[:, 1]
    t = formula_time(t)
    if prediction == "score":  # -x0 / sigma_t
        if not isinstance(path, AffinePath):
            raise TypeError(f"prediction: 'score' needs an affine path (alpha_t, sigma_t), got {path!r}")
        return torch.stack([-1 / _safe(path(t)[1], eps), torch.zeros_like(t)], dim=-1)
    picks = t.new_zeros((t.shape[0], 3 if path.uses_noise else 2))
    picks[:, 0 if prediction == "epsilon" else 1] = 1
    return picks


# Paths whose velocity u_t = d_alpha x1 + d_sigma x0 (+ ...) has constant coefficients. Exact
# types: a subclass may change the schedule.
_CONSTANT_VELOCITY = (CondOT, TargetCFM, ConstantNoise)
_constant_rows = _ops.DeviceCache()


def _constant_residual(path, prediction, x1, math, whole_batch, direct=False):
    """The residual's coefficients (1, -target) in the math type when they do not depend on t:
    the noise and data targets of every path, the velocity of _CONSTANT_VELOCITY. One cached row,
    built on the device, so the commonest losses (rectified flow above all) build no
    coefficients per call (nor convert t): [1, 1, k] over the k streams it reads (`_read`) when
    the whole batch is one group (`whole_batch`), else a [B, 1, k] view of it. None when the
    rows vary with t. `direct`: nothing intercepts the call (see DeviceCache.get)."""
    constant = prediction in ("epsilon", "data") or (
        prediction == "velocity" and type(path) in _CONSTANT_VELOCITY)
    if not constant:
        return None
    # The noise and data rows depend on the number of inputs only; the velocity rows on the
    # parameters of our own paths (floats).
    kind = value_key(path) if prediction == "velocity" else path.uses_noise
    device = x1.device
    row = _constant_rows.get((kind, prediction, math, device), device, lambda: _ops.take(
        _residual_coeffs(target_coefficients(path, batch_time(0.0, x1), prediction), math), 2,
        _read(path, prediction)), direct)
    return row if whole_batch else row.expand(x1.shape[0], -1, -1)


def _read(path, prediction):
    """The indices of the streams (pred, x0, x1[, noise]) that the residual reads. A noise, data
    or score target reads one input, x0 (x1 for data), and the constant-noise path's velocity
    x1 - x0 no noise: an exact-zero coefficient on the others would turn an inf or NaN in them
    into NaN (0 * inf), where the formula never reads them, and cost a stream (a quarter of
    the I-CFM loss's traffic)."""
    if prediction == "velocity":
        return list(range(3 if type(path) is ConstantNoise else 3 + path.uses_noise))
    return [0, 2 if prediction == "data" else 1]


def _residual_coeffs(target, math):
    """The [G, 1, 1 + K] coefficients (1, -target) over (pred, x0, x1[, noise]) in the math type:
    pred minus the target, as one output of the affine map. In the target's layout: entry-major
    ([1 + K, G] memory) as the CPU builders give it, which the CPU kernels load a vector at a
    time for small groups (a time per token)."""
    # Written in place, converted on the way: at G = 256K (fp64 target, two coefficients) 0.08
    # ms, where -target padded and converted (three passes, three fresh tensors) took 0.35 ms.
    groups, k = target.shape
    if target.stride(0) == 1:
        rows = target.new_empty((1 + k, groups), dtype=math).t()
    else:
        rows = target.new_empty((groups, 1 + k), dtype=math)
    rows[:, 0] = 1.0
    rows[:, 1:].copy_(target).neg_()
    return rows[:, None, :]


def flow_matching_loss(pred, x0, x1, t, path=None, prediction="velocity", noise=None, weight=None,
                       reduction="mean"):
    """Mean squared error between a network output and the flow-matching target, fused.

    Args:
        pred: the network output at x_t, shaped like x1, of any float type: under autocast
            it may differ from the data's (x0, x1 and noise share one).
        x0, x1, t, path, noise: as in ``fastflow.interpolate``, which built the network's input.
        prediction: what the network predicts: "velocity" (default), "epsilon" (the noise x0),
            "data" (x1) or "score" (-x0 / sigma_t, affine paths only).
        weight: None or one weight per sample, shape [B].
        reduction: "mean" (over samples and elements), "sum" (of the per-sample losses) or
            "none" (the [B] per-sample losses).

    Returns:
        The loss in fp32, or fp64 when pred or the data is fp64: computed in that type on the
        values given, whatever their storage types (pred's may differ from the data's: they
        promote, as in ``F.mse_loss``). Differentiable in pred, x0, x1, noise, t and weight;
        each gradient comes back in its tensor's own dtype.

    Example::

        >>> x_t, _ = fastflow.interpolate(x0, x1, t, out=buffers)     # or without out=
        >>> loss = fastflow.flow_matching_loss(model(x_t, t), x0, x1, t)
        >>> loss.backward()
    """
    path = get_path(path)
    _check_kind(prediction, "prediction")
    check_reduction(reduction)
    inputs = path_inputs(path, x0, x1, noise)
    streams = [pred, *inputs]
    if isinstance(pred, torch.Tensor) and pred.dtype != x1.dtype:
        # A network under autocast returns another float type than the data's. The kernels
        # stream one type, so the narrower side is widened to the promoted one, as F.mse_loss
        # promotes: exactly, so this is the loss of the values given; autograd brings each
        # gradient back to its tensor's own type.
        check_stream(pred, "pred")
        promoted = torch.promote_types(pred.dtype, x1.dtype)
        streams = [x.to(promoted) for x in streams]
    check_like(streams[0], streams[2], "pred", "x1")
    batch = x1.shape[0]
    math = _ops.math_dtype(streams[0].dtype)
    if weight is not None:
        weight = _check_weight(weight, batch, x1.device).to(math)
    time = check_time(t, x1)
    tensors = [*streams] + [x for x in (time, weight) if x is not None]
    # One backend decision for the call's kernels and coefficients: a call that records a
    # gradient is one autograd node of our own, which may still run them directly.
    recording = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    backend = _ops.eager_backend(tensors)
    # A t that needs a gradient takes the per-sample formulas, through which it flows.
    t_grad = time is not None and time.requires_grad and torch.is_grad_enabled()
    # A loss that is one unweighted number of constant rows reduces the batch as one group: no
    # per-sample sums to fold, no [B] rows to expand.
    whole_batch = weight is None and reduction != "none" and x1.numel() > 0
    read = _read(path, prediction)
    residual = None if t_grad else _constant_residual(path, prediction, x1, math, whole_batch,
                                                      backend is not None)
    if residual is None:
        # One group per sample; t unconverted for the path's builder, which writes the velocity
        # target's rows (1, -u_t) directly where it can.
        t = batch_time(t, x1, keep_type=True).expand(batch)
        if prediction == "velocity" and not t_grad:
            residual = velocity_residual(path, t, math, backend)
        if residual is None:
            target = target_coefficients(path, t, prediction, backend=None if t_grad else backend)
            residual = _ops.take(_residual_coeffs(target, math), 2, read)
    streams = [streams[k] for k in read]
    if recording and not torch.compiler.is_compiling():   # (the tracer cannot ask)
        # Autograd cannot save inference tensors (data made under torch.inference_mode, such
        # as latents encoded there), copies it can; eager's mse_loss(pred, x1 - x0) saves the
        # target it computes.
        streams = [x.clone() if x.is_inference() else x for x in streams]
    if recording and backend is not None:
        return _recorded_loss(reduction, backend, residual, weight, streams)
    return weighted_mean_square(streams, residual, weight, reduction,
                                None if recording else backend)


def _recorded_loss(reduction, backend, coeffs, weight, inputs):
    """The loss of an eager call that records a gradient, as one autograd node: the backend's
    own (`pred_loss`, C++ on CPU: csrc/loss_cpu.cpp) for the training step's case, a number
    whose gradient goes to pred alone, where Python's autograd.Function costs more than the
    kernels on a small batch; else _LossNode. Streams in a flat_layout (channels_last) take
    _LossNode too, which streams them as they lie (the C++ node would copy them)."""
    pred_loss = _backends.kernels(backend).pred_loss
    batch = inputs[0].shape[0]
    count = _count_per_sample(inputs[0], batch)
    if (pred_loss is not None and reduction != "none" and count
            and not coeffs.requires_grad and not (weight is not None and weight.requires_grad)
            and not any(x.requires_grad for x in inputs[1:])
            and not _ops.flat_layout(inputs, coeffs.shape[0])):
        return pred_loss(inputs[0], inputs[1:], coeffs, weight, _divisor(reduction, batch, count))
    return _LossNode.apply(reduction, backend, coeffs, weight, *inputs)


def weighted_mean_square(inputs, coeffs, weight, reduction, backend=None):
    """The loss (weight * per-sample mean of the squared residual, reduced), recorded op by op.
    `coeffs`: the residual's [G, 1, K] rows over the inputs, one group per sample or (weight
    None, reduction not "none") one for the whole batch."""
    return _loss(_ops.affine_sqnorm(inputs, coeffs, backend), inputs[0], weight, reduction,
                 backend)


def _loss(squares, x, weight, reduction, backend=None):
    """The loss from the sums of squared residuals of each group of x's elements (see
    weighted_mean_square); `backend` as there."""
    batch = x.shape[0]
    count = _count_per_sample(x, batch)
    if reduction != "none" and count:   # as the C++ training step's node rounds it
        if weight is not None:
            squares = squares * weight
        return _total(squares, backend) / _divisor(reduction, batch, count)
    per_sample = squares / count
    if weight is not None:
        per_sample = per_sample * weight
    if reduction == "none":
        return per_sample
    return _total(per_sample, backend) / (batch if reduction == "mean" else 1)


def _total(values, backend):
    """values.sum(); on the CPU `backend` (the call's direct one: nothing records or traces
    it) in fp64 in an order that the thread count does not change, where ATen's sum splits
    between threads beyond 32K values."""
    ordered = _backends.kernels(backend).ordered_sum if backend is not None else None
    if ordered is not None and not (values.requires_grad and torch.is_grad_enabled()):
        return ordered(values)
    return values.sum()


# Where forward's arguments (reduction, backend, coeffs, weight, pred, *data) sit in
# ctx.needs_input_grad.
_COEFFS, _WEIGHT, _PRED = 2, 3, 4


class _LossNode(torch.autograd.Function):
    """weighted_mean_square as one autograd node, for eager calls with a gradient to record.

    Recorded op by op, the loss is three or four nodes (the fused reduction, the division by the
    element count, the weight, the reduction) and a dozen small tensor ops in backward: on a
    small batch, most of a training step's loss. Here the backward folds the reduction, the
    weight and the count into the gradient of the sums of squares, and runs the fused
    reduction's backward once. Traced calls take the op-by-op form, which compilers fuse.
    `coeffs` are the residual's rows (1, -target) over (pred, x0, x1[, noise]) as in
    weighted_mean_square; `backend` runs the forward's kernel, and the backward's when it
    records nothing (a double backward records its ops, which then decide for themselves)."""

    @staticmethod
    def forward(ctx, reduction, backend, coeffs, weight, *inputs):
        squares = _ops.affine_sqnorm(inputs, coeffs, backend)
        ctx.reduction, ctx.backend = reduction, backend
        weight_grad = weight is not None and ctx.needs_input_grad[_WEIGHT]
        ctx.save_for_backward(coeffs, weight, squares if weight_grad else None, *inputs)
        return _loss(squares, inputs[0], weight, reduction, backend)

    @staticmethod
    def backward(ctx, grad):
        coeffs, weight, squares, *inputs = ctx.saved_tensors
        batch = inputs[0].shape[0]
        count = _count_per_sample(inputs[0], batch)
        recording = torch.is_grad_enabled()
        # dL/d(each group's sum of squares): one value for every group unless the loss is
        # unreduced or weighted, then one per sample.
        if weight is None:  # one division for the mean and the element count
            grad_squares = grad / _divisor(ctx.reduction, batch, count)
            grad_weight = None
        else:
            grad = grad / (batch if ctx.reduction == "mean" else 1)
            if squares is not None and recording:
                # A double backward (create_graph) must see how dL/dweight depends on the
                # inputs, and the forward's squares have no history: recompute them, recorded.
                squares = _ops.affine_sqnorm(inputs, coeffs)
            grad_weight = grad * (squares / count) if squares is not None else None
            grad_squares = grad * weight / count
        if grad_squares.dim():
            grad_squares = grad_squares[:, None]    # [B, 1]
        needs = ctx.needs_input_grad
        if needs[_PRED] and not needs[_COEFFS] and not any(needs[_PRED + 1:]):
            # Only pred, as in training: the rows are (1, -target), so dL/dpred = 2 g (pred -
            # target) is the residual with its rows scaled, and there is no [B, K, K] mixing
            # matrix to build (a handful of tiny tensor ops, most of a small batch's backward).
            direct = not (recording or _ops.batched_gradients([grad]))
            (grad_pred,) = _ops.affine(inputs, coeffs * (2 * grad_squares)[..., None],
                                       ctx.backend if direct else None)
            return None, None, None, grad_weight, grad_pred, *([None] * (len(inputs) - 1))
        grad_inputs, grad_coeffs = _ops.sqnorm_gradients(
            coeffs, inputs, grad_squares, needs[_PRED:], needs[_COEFFS])
        return None, None, grad_coeffs, grad_weight, *grad_inputs


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got "
                         f"{reduction!r}")


def _divisor(reduction, batch, count):
    """What the summed squares of an unweighted loss are divided by: every element ("mean") or
    each sample's `count` ("sum" of per-sample means; "none")."""
    return batch * count if reduction == "mean" else count


def _count_per_sample(x, batch):
    return x.numel() // batch if batch else 0


def _check_weight(weight, batch, device):
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor of shape [{batch}]")
    if weight.shape != (batch,):
        raise ValueError(f"weight: expected shape [{batch}] (one weight per sample), got "
                         f"{tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight: expected a tensor on {device}, got {weight.device}")
    return weight
