"""fastflow.interpolate (CondOT) against the eager expressions and torch.compile of them.

    python benchmarks/bench_interpolate.py [--device cpu|cuda] [--sizes 65536,...] [--dtypes fp32,bf16]

Per size and dtype: fused with fresh outputs, fused with out= buffers, eager
`(t*x1 + (1-t)*x0).to(x1.dtype), x1 - x0` (rounded to the data's type, as fastflow's x_t is:
float32 t times 16-bit data is float32), and torch.compile of that eager function. On CUDA with
the CUDA C++ kernels built, fused also on that backend ("fused, cuda backend") beside the default
(Triton):
the figures that decide which of the two CUDA tensors should get. Reports ms, effective GB/s
(two reads and two writes of the tensor size), speedups and the fraction of the copy bandwidth
measured in the same run. Writes benchmarks/results/interpolate_<device>_<allocator>.csv and a
PNG plot beside it. On CPU, run with THP_MEM_ALLOC_ENABLE=1 too: fresh-output figures depend on
the allocator (page faults), and the file name says which setting was used.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402

BATCH = 64


def eager_cond_ot(x0, x1, t):
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    # Rounded to the data's type, as fastflow's xt is: float32 t times bf16 x1 is float32.
    return (t * x1 + (1 - t) * x0).to(x1.dtype), x1 - x0


def run(device, sizes, dtypes):
    compiled = torch.compile(eager_cond_ot)
    backends = fastflow.backends()
    both_gpu_backends = (device.type == "cuda" and backends["cuda"].available
                         and backends["triton"].available)
    rows = []
    for dtype_name in dtypes:
        dtype = common.DTYPES[dtype_name]
        for numel in sizes:
            x1 = torch.randn(BATCH, numel // BATCH, device=device, dtype=dtype)
            x0 = torch.randn_like(x1)
            t = torch.rand(BATCH, device=device)
            out = (torch.empty_like(x1), torch.empty_like(x1))
            moved = 4 * x1.nbytes
            copy_gbps = common.copy_bandwidth_gbps(device, x1.nbytes)
            variants = {
                "fused": lambda: fastflow.interpolate(x0, x1, t),
                "fused out=": lambda: fastflow.interpolate(x0, x1, t, out=out),
                "eager": lambda: eager_cond_ot(x0, x1, t),
                "torch.compile": lambda: compiled(x0, x1, t),
            }
            if both_gpu_backends:
                variants["fused, cuda backend"] = common.with_backend("cuda", variants["fused"])
            rows += common.measure(device, dtype_name, numel, variants, moved, copy_gbps)
            del x0, x1, out
    return rows


if __name__ == "__main__":
    common.main(run, "interpolate", "interpolate (CondOT)", __doc__,
                sizes=[1 << p for p in range(10, 27, 2)], dtypes=["fp32", "bf16", "fp16"])
