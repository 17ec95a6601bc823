"""Fused interpolation plus target: (x_t, u_t) from (x0, x1[, noise]) in one pass."""
from . import _ops
from ._checks import batch_time, check_outputs, path_inputs
from .paths import coefficients, get_path


def interpolate(x0, x1, t, path=None, noise=None, out=None):
    """Sample a point of a probability path and its regression target in one fused pass.

    For an affine path ``x_t = alpha_t x1 + sigma_t x0`` and ``u_t = d_alpha_t x1 + d_sigma_t x0``
    (plus a noise term for ConstantNoise and SchrodingerBridge); t = 0 is the noise x0 and t = 1
    the data x1. Reads each input once and writes each output once; math in fp32 (fp64 for
    fp64), outputs in the dtype of x1.

    Args:
        x0: noise (source sample), any shape with a leading batch dimension.
        x1: data (target sample), same shape, dtype and device as x0.
        t: a float, a 0-d tensor, or one time per sample as [B] or [B, 1, ..., 1]; broadcast
            over the non-batch dimensions. Differentiable.
        path: a ``fastflow.paths.Path`` or one of the names "cond_ot" (default), "polynomial",
            "cosine", "linear_vp", "vp", "target_cfm", "constant_noise", "schrodinger_bridge".
        noise: the extra Gaussian sample of paths with ``uses_noise`` (like x1); None otherwise.
        out: optional pair of preallocated tensors (x_t, u_t) like x1, written in place and
            returned; skips the allocation (and, on CPU, its page faults) in training loops.
            Either may be an input (updated in place), but their memory spans (first to last
            element) must not overlap (ValueError): buf[0] and buf[1] of one buffer are fine;
            the same tensor twice, or buf[:, :n] and buf[:, n:], are not.
            Not differentiable, like every ``out=`` in PyTorch: with grad mode on, no input nor
            output may require grad (RuntimeError). The writes bump the buffers' version
            counters, as in-place ops do: a backward that saved a buffer before it was
            refilled raises instead of using the new values.

    Returns:
        (x_t, u_t), each shaped and typed like x1.

    Example::

        >>> x1 = torch.randn(64, 3, 32, 32)
        >>> x0 = torch.randn_like(x1)
        >>> t = torch.rand(64)
        >>> x_t, u_t = fastflow.interpolate(x0, x1, t)          # CondOT: t x1 + (1-t) x0, x1 - x0
        >>> x_t, u_t = fastflow.interpolate(x0, x1, t, path="cosine")
    """
    path = get_path(path)
    inputs = path_inputs(path, x0, x1, noise)
    t = batch_time(t, x1, keep_type=True)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError("out: expected a pair of tensors (x_t, u_t)")
        # t too: the coefficients need a gradient exactly when t does.
        check_outputs(out, ("out[0]", "out[1]"), x1, "x1", (*inputs, t))
    # The outputs too: a subclass takes the dispatcher.
    backend = _ops.direct_backend((*inputs, t, *(out or ())))
    coeffs = coefficients(path, t, _ops.math_dtype(x1.dtype), backend)
    if out is None:
        x_t, u_t = _ops.affine(inputs, coeffs, backend)
        return x_t, u_t
    return tuple(_ops.affine_out(inputs, coeffs, out, backend))
