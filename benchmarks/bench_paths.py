"""fastflow.interpolate and flow_matching_loss (forward + backward) on every built-in path against
the eager formulas and torch.compile.

    python benchmarks/bench_paths.py [--device cpu|cuda] [--sizes 1024,...] [--dtypes fp32]

The kernels are the same for every path; what differs is the coefficients computed from t, which
eager PyTorch does in 4 to 20 tiny ops (kernel launches on a GPU) before the products and sums,
and fastflow in one call. Two layouts ("layout" column): a time per sample of a batch of 64,
where the sizes stop once the tensors, not the coefficients, take the time; and a time per
token, [N / 4, 4], where a time comes with every 4 elements and the cost of exp, pow and sin per
time shows. "eager" is what one writes by hand: the path's schedule from t (fastflow.paths'
formulas; torchcfm's for the noise paths), then the products and sums (interpolate), or
F.mse_loss against the velocity target (the loss). Reports ms, effective GB/s (interpolate: two
or three reads, two writes; the loss: pred and the data read twice, the gradient written),
speedups and the fraction of the copy bandwidth. Writes
benchmarks/results/paths_<device>_<allocator>.csv and a PNG plot, one panel per op, layout and
path.
"""
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402
from fastflow import paths  # noqa: E402

BATCH = 64


def _column(t, x):
    return t.view(-1, *([1] * (x.dim() - 1)))


def eager_for(path):
    """interpolate on `path` as one writes it by hand: the schedule from t as [B, 1, ...] (in
    t's float32), then the products and sums, rounded to the data's float type as fastflow's
    outputs are (float32 times bf16 is float32: without the rounding, 16-bit data would have
    eager and torch.compile write wider outputs than fastflow and skip a conversion)."""
    def rounded(outputs, x):
        return tuple(out.to(x.dtype) for out in outputs)

    if isinstance(path, paths.AffinePath):
        def eager(x0, x1, t, noise):
            alpha, sigma, d_alpha, d_sigma = path(_column(t, x1))
            return rounded((alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0), x1)
    elif isinstance(path, paths.ConstantNoise):
        def eager(x0, x1, t, noise):
            t = _column(t, x1)
            return rounded((t * x1 + (1 - t) * x0 + path.sigma * noise, x1 - x0), x1)
    else:  # the Schrodinger bridge, as torchcfm computes it
        def eager(x0, x1, t, noise):
            t = _column(t, x1)
            s_t = path.sigma * torch.sqrt(t * (1 - t))
            ratio = (1 - 2 * t) / (2 * t * (1 - t) + 1e-8)
            return rounded((t * x1 + (1 - t) * x0 + s_t * noise,
                            x1 - x0 + ratio * s_t * noise), x1)
    return eager


def eager_loss_for(path):
    """The loss on `path` as one writes it by hand: F.mse_loss of pred against the velocity
    target, computed from t as eager_for computes it (the target alone)."""
    if isinstance(path, paths.AffinePath):
        def target(x0, x1, t, noise):
            _, _, d_alpha, d_sigma = path(_column(t, x1))
            return d_alpha * x1 + d_sigma * x0
    elif isinstance(path, paths.ConstantNoise):
        def target(x0, x1, t, noise):
            return x1 - x0
    else:
        def target(x0, x1, t, noise):
            t = _column(t, x1)
            s_t = path.sigma * torch.sqrt(t * (1 - t))
            return x1 - x0 + (1 - 2 * t) / (2 * t * (1 - t) + 1e-8) * s_t * noise

    def loss(pred, x0, x1, t, noise):
        return F.mse_loss(pred.float(), target(x0, x1, t, noise).float())
    return loss


# [rows, elements per row] of each layout: one time per row.
LAYOUTS = {"time per sample": lambda numel: (BATCH, numel // BATCH),
           "time per token": lambda numel: (numel // 4, 4)}


def run(device, sizes, dtypes):
    rows = []
    for name, layout in itertools.product(paths._BY_NAME, LAYOUTS):
        path = paths.get_path(name)
        eager, eager_loss = eager_for(path), eager_loss_for(path)
        # The closures share code objects, and each layout brings its shapes: a fresh cache.
        torch._dynamo.reset()
        compiled, compiled_loss = torch.compile(eager), torch.compile(eager_loss)
        for dtype_name, numel in itertools.product(dtypes, sizes):
            dtype = common.DTYPES[dtype_name]
            x1 = torch.randn(LAYOUTS[layout](numel), device=device, dtype=dtype)
            x0, pred = torch.randn_like(x1), torch.randn_like(x1, requires_grad=True)
            noise = torch.randn_like(x1) if path.uses_noise else None
            t = torch.rand(x1.shape[0], device=device) * 0.98 + 0.01

            def step(loss):
                pred.grad = None
                loss().backward()

            interpolate = {
                "fused": lambda: fastflow.interpolate(x0, x1, t, path, noise),
                "eager": lambda: eager(x0, x1, t, noise),
                "torch.compile": lambda: compiled(x0, x1, t, noise),
            }
            loss = {
                "fused": lambda: step(lambda: fastflow.flow_matching_loss(pred, x0, x1, t, path,
                                                                          noise=noise)),
                "eager": lambda: step(lambda: eager_loss(pred, x0, x1, t, noise)),
                "torch.compile": lambda: step(lambda: compiled_loss(pred, x0, x1, t, noise)),
            }
            streams = 3 if path.uses_noise else 2   # the data streams: x0, x1[, noise]
            copy_gbps = common.copy_bandwidth_gbps(device, x1.nbytes)
            # interpolate reads the streams and writes two; the loss reads pred and the streams
            # twice (forward, backward) and writes the gradient.
            for op, variants, moved in (("interpolate", interpolate, streams + 2),
                                        ("loss fwd+bwd", loss, 2 * (streams + 1) + 1)):
                rows += common.measure(device, dtype_name, numel, variants, moved * x1.nbytes,
                                       copy_gbps, extra=lambda variant, op=op: {
                                           "op": op, "layout": layout, "path": name})
            del x0, x1, pred, noise
    return rows


if __name__ == "__main__":
    common.main(run, "paths", "per path", __doc__,
                sizes=[1 << 10, 1 << 14, 1 << 18, 1 << 20], dtypes=["fp32"])
