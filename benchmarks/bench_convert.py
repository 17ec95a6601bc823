"""fastflow.convert (noise prediction to velocity, CondOT) against the eager reference,
torch.compile of it, and the hand-simplified formula.

    python benchmarks/bench_convert.py [--device cpu|cuda] [--sizes 65536,...] [--dtypes fp32,bf16]

The eager reference (fastflow.reference.convert) goes through the data and noise estimates as
the general formulas do; "by hand" is what one writes for this one path and pair,
v = (x_t - eps) / t, two passes. Reports ms, effective GB/s (two reads and one write), speedups
and the fraction of the copy bandwidth. Writes benchmarks/results/convert_<device>_<allocator>.csv
and a PNG plot.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402
from fastflow import reference  # noqa: E402

BATCH = 64


def eager_convert(eps, x_t, t):
    return reference.convert(eps, x_t, t, "cond_ot", "epsilon", "velocity")


def by_hand(eps, x_t, t):
    # Rounded to the data's type, as fastflow's result is: bf16 over float32 t is float32.
    return ((x_t - eps) / t.view(-1, *([1] * (x_t.dim() - 1)))).to(x_t.dtype)


def run(device, sizes, dtypes):
    compiled = torch.compile(eager_convert)
    rows = []
    for dtype_name in dtypes:
        dtype = common.DTYPES[dtype_name]
        for numel in sizes:
            eps = torch.randn(BATCH, numel // BATCH, device=device, dtype=dtype)
            x_t = torch.randn_like(eps)
            t = torch.rand(BATCH, device=device) * 0.9 + 0.05
            variants = {
                "fused": lambda: fastflow.convert(eps, x_t, t, "cond_ot", "epsilon", "velocity"),
                "eager": lambda: eager_convert(eps, x_t, t),
                "torch.compile": lambda: compiled(eps, x_t, t),
                "by hand": lambda: by_hand(eps, x_t, t),
            }
            rows += common.measure(device, dtype_name, numel, variants, 3 * eps.nbytes,
                                   common.copy_bandwidth_gbps(device, eps.nbytes))
            del eps, x_t
    return rows


if __name__ == "__main__":
    common.main(run, "convert", "convert (epsilon to velocity, CondOT)", __doc__,
                sizes=[1 << p for p in range(10, 27, 2)], dtypes=["fp32", "bf16"])
