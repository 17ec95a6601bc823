"""fastflow.interpolate on every built-in path against the eager formulas and torch.compile.

    python benchmarks/bench_paths.py [--device cpu|cuda] [--sizes 1024,...] [--dtypes fp32]

The kernel is the same for every path; what differs is the coefficients computed from t, which
eager PyTorch does in 4 to 20 tiny ops (kernel launches on a GPU) before the two products and
sums, and fastflow in one call. Two layouts ("layout" column): a time per sample of a batch of
64, where the sizes stop once the tensors, not the coefficients, take the time; and a time per
token, [N / 4, 4], where a time comes with every 4 elements and the cost of exp, pow and sin
per time shows. "eager" is what one writes by hand: the path's schedule from t (fastflow.paths'
formulas; torchcfm's for the noise paths), then the products and sums. Reports ms, effective
GB/s (two or three reads, two writes), speedups and the fraction of the copy bandwidth. Writes
benchmarks/results/paths_<device>_<allocator>.csv and a PNG plot, one panel per layout and path.
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402
from fastflow import paths  # noqa: E402

BATCH = 64


def eager_for(path):
    """interpolate on `path` as one writes it by hand: the schedule from t as [B, 1, ...] (in
    t's float32), then the products and sums, rounded to the data's float type as fastflow's
    outputs are (float32 times bf16 is float32: without the rounding, 16-bit data would have
    eager and torch.compile write wider outputs than fastflow and skip a conversion)."""
    def rounded(outputs, x):
        return tuple(out.to(x.dtype) for out in outputs)

    def column(t, x):
        return t.view(-1, *([1] * (x.dim() - 1)))

    if isinstance(path, paths.AffinePath):
        def eager(x0, x1, t, noise):
            alpha, sigma, d_alpha, d_sigma = path(column(t, x1))
            return rounded((alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0), x1)
    elif isinstance(path, paths.ConstantNoise):
        def eager(x0, x1, t, noise):
            t = column(t, x1)
            return rounded((t * x1 + (1 - t) * x0 + path.sigma * noise, x1 - x0), x1)
    else:  # the Schrodinger bridge, as torchcfm computes it
        def eager(x0, x1, t, noise):
            t = column(t, x1)
            s_t = path.sigma * torch.sqrt(t * (1 - t))
            ratio = (1 - 2 * t) / (2 * t * (1 - t) + 1e-8)
            return rounded((t * x1 + (1 - t) * x0 + s_t * noise,
                            x1 - x0 + ratio * s_t * noise), x1)
    return eager


# [rows, elements per row] of each layout: one time per row.
LAYOUTS = {"time per sample": lambda numel: (BATCH, numel // BATCH),
           "time per token": lambda numel: (numel // 4, 4)}


def run(device, sizes, dtypes):
    rows = []
    for name, layout in itertools.product(paths._BY_NAME, LAYOUTS):
        path = paths.get_path(name)
        eager = eager_for(path)
        # The closures share code objects, and each layout brings its shapes: a fresh cache.
        torch._dynamo.reset()
        compiled = torch.compile(eager)
        for dtype_name, numel in itertools.product(dtypes, sizes):
            dtype = common.DTYPES[dtype_name]
            x1 = torch.randn(LAYOUTS[layout](numel), device=device, dtype=dtype)
            x0 = torch.randn_like(x1)
            noise = torch.randn_like(x1) if path.uses_noise else None
            t = torch.rand(x1.shape[0], device=device) * 0.98 + 0.01
            variants = {
                "fused": lambda: fastflow.interpolate(x0, x1, t, path, noise),
                "eager": lambda: eager(x0, x1, t, noise),
                "torch.compile": lambda: compiled(x0, x1, t, noise),
            }
            streams = 5 if path.uses_noise else 4
            rows += common.measure(device, dtype_name, numel, variants, streams * x1.nbytes,
                                   common.copy_bandwidth_gbps(device, x1.nbytes),
                                   extra=lambda variant: {"layout": layout, "path": name})
            del x0, x1, noise
    return rows


if __name__ == "__main__":
    common.main(run, "paths", "interpolate per path", __doc__,
                sizes=[1 << 10, 1 << 14, 1 << 18, 1 << 20], dtypes=["fp32"])
