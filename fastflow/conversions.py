"""Converting a network's prediction between velocity, noise, data and score (DESIGN.md section 4).

On an affine path x_t = alpha_t x1 + sigma_t x0, every kind of prediction is affine in
(x_t, pred): the data estimate x1^ and noise estimate x0^ follow from (x_t, pred) by solving

    x_t = alpha x1^ + sigma x0^        v = d_alpha x1^ + d_sigma x0^        score = -x0^ / sigma

and the requested kind is read back from (x1^, x0^). fastflow builds that 2-coefficient row per
sample in PyTorch (differentiable in t) and runs it through the fused affine kernel: one read of
x_t and pred, one write.
"""
import torch

from . import _ops
from ._checks import batch_time, check_like, check_positive, check_stream, formula_time
from .paths import AffinePath, coefficients, get_path

KINDS = ("velocity", "epsilon", "data", "score")
# The smallest magnitude a divisor of a conversion (sigma_t, alpha_t) is allowed by default.
DIVISOR_EPS = 1e-6


def _check_kind(kind, name):
    if kind not in KINDS:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, KINDS))}, got {kind!r}")


def _safe(x, eps):
    """x moved away from 0 by at least eps, keeping its sign (0 counts as positive)."""
    return torch.where(x < 0, x.clamp(max=-eps), x.clamp(min=eps))


def conversion_coefficients(path, t, src, dst, eps=DIVISOR_EPS):
    """Per-sample [G, 1, 2] coefficients of dst over (x_t, pred of kind src) at times t [G].

    csrc/conversions_cpu.cpp and triton_kernels/conversions.py repeat these formulas operation
    for operation (tests/test_conversions.py compares the bits): change them together."""
    alpha, sigma, d_alpha, d_sigma = path(t)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    # (data, noise) estimates as rows over (x_t, pred).
    if src == "data":
        data = (zero, one)
        safe_sigma = _safe(sigma, eps)
        noise = (1 / safe_sigma, -alpha / safe_sigma)
    elif src == "epsilon":
        noise = (zero, one)
        safe_alpha = _safe(alpha, eps)
        data = (1 / safe_alpha, -sigma / safe_alpha)
    elif src == "score":
        noise = (zero, -sigma)
        safe_alpha = _safe(alpha, eps)
        data = (1 / safe_alpha, sigma * sigma / safe_alpha)
    else:  # velocity: invert [[alpha, sigma], [d_alpha, d_sigma]]
        det = _safe(alpha * d_sigma - sigma * d_alpha, eps)
        data = (d_sigma / det, -sigma / det)
        noise = (-d_alpha / det, alpha / det)
    if dst == "data":
        row = data
    elif dst == "epsilon":
        row = noise
    elif dst == "score":
        safe_sigma = _safe(sigma, eps)
        row = (-noise[0] / safe_sigma, -noise[1] / safe_sigma)
    else:
        row = (d_alpha * data[0] + d_sigma * noise[0], d_alpha * data[1] + d_sigma * noise[1])
    return _ops.coefficient_matrix(row, 1, 2)


def _conversion_rows(path, t, src, dst, eps, dtype, backend=None):
    """``conversion_coefficients(...).to(dtype)``. When t needs no gradient and nothing traces
    the call, the backend's builder (C++ on CPU, Triton on GPU) computes the same formulas from
    the path's coefficient matrix in one call: the same bits, without the twenty-odd tiny tensor
    ops (kernel launches on a GPU) that cost more than the fused pass on a small batch.
    `backend` as in ``_ops.coefficient_builder``."""
    build = _ops.coefficient_builder(t, "conversion_coefficients", backend)
    if build is not None:
        return build(coefficients(path, t, torch.float64, backend), src, dst, float(eps), dtype)
    return conversion_coefficients(path, formula_time(t), src, dst, eps).to(dtype)


# The kinds whose conversion row never reads x_t (an exact 0 there): they stream pred alone, so
# a non-finite x_t does not become NaN through 0 * inf, as the formula would not read it.
_PRED_ONLY = {("data", "data"), ("epsilon", "epsilon"), ("epsilon", "score"),
              ("score", "epsilon"), ("score", "score")}


def convert(pred, x_t, t, path=None, src="epsilon", dst="velocity", eps=DIVISOR_EPS):
    """Convert a prediction of kind `src` at (x_t, t) into kind `dst`, in one fused pass.

    Kinds: "velocity" (u_t), "epsilon" (the noise x0), "data" (x1) and "score"
    (grad log p_t = -x0 / sigma_t). Differentiable in pred, x_t and t.

    Divisions by alpha_t, sigma_t (and, from velocity, by alpha d_sigma - sigma d_alpha) are
    unsafe where these vanish, at an end of [0, 1] for most paths: each divisor is moved away
    from zero to at least `eps` in magnitude, so the result stays finite (and large) there.
    Where the path's derivative itself is infinite (VP and LinearVP at t = 1, Polynomial with
    n < 1 at t = 0) the conversions that read it are not finite: inf or NaN, as in the
    reference, except that the folded rows (one coefficient on x_t and one on pred, infinite
    both) give NaN in entries where the reference's unfolded formula gives inf.

    Args:
        pred: the network output, any shape with a leading batch dimension.
        x_t: the point it was evaluated at; shape, dtype and device of pred.
        t: a float, a 0-d tensor, [B] or [B, 1, ..., 1].
        path: an affine path (``fastflow.paths.AffinePath``) or its name; default CondOT.
        src, dst: the kinds to convert from and to.
        eps: the smallest magnitude a divisor is allowed: a finite positive number.

    Example::

        >>> eps_hat = model(x_t, t)                                  # a noise-predicting net
        >>> v = fastflow.convert(eps_hat, x_t, t, src="epsilon", dst="velocity")
    """
    path = get_path(path)
    if not isinstance(path, AffinePath):
        raise TypeError(f"path: conversions need an affine path (alpha_t, sigma_t), got {path!r}")
    _check_kind(src, "src")
    _check_kind(dst, "dst")
    check_positive(eps, "eps")
    check_stream(pred, "pred")
    check_like(x_t, pred, "x_t", "pred")
    t = batch_time(t, pred, keep_type=True)
    backend = _ops.direct_backend((x_t, pred, t))
    coeffs = _conversion_rows(path, t, src, dst, eps, _ops.math_dtype(pred.dtype), backend)
    if (src, dst) in _PRED_ONLY:
        (out,) = _ops.affine([pred], coeffs[:, :, 1:], backend)
    else:
        (out,) = _ops.affine([x_t, pred], coeffs, backend)
    return out
