"""Time embeddings against the eager source formulas and torch.compile of them.

    python benchmarks/bench_embedding.py [--device cpu|cuda] [--sizes 4096,...] [--dtypes fp32,bf16]

--sizes are batch sizes B; the width is 256 (DiT's frequency_embedding_size). Two workloads:

    sinusoidal   fastflow.timestep_embedding in the ADM/DiT convention (forward), against
                 diffusers' get_timestep_embedding formula (fastflow.reference), torch.compile of
                 it, and diffusers itself where installed; output in the given dtype
    fourier      fastflow.fourier_embedding with a learned W, forward + backward to W

Reports ms, effective GB/s (the [B, 256] output written once; the backward also reads its
gradient once), speedups and the fraction of the copy bandwidth measured in the same run. Writes
benchmarks/results/embedding_{sinusoidal,fourier}_<device>_<allocator>.csv and PNG plots.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402
from fastflow import reference  # noqa: E402

DIM = 256
DIT = fastflow.embeddings.convention("dit")


def eager_sinusoidal(t, dtype):
    return reference.timestep_embedding(t, DIM, **DIT).to(dtype)


def eager_fourier(t, W, grad):
    out = reference.fourier_embedding(t, W)
    out.backward(grad)
    return out


def _diffusers():
    try:
        from diffusers.models.embeddings import get_timestep_embedding
    except ImportError:
        return None
    return get_timestep_embedding


def run_sinusoidal(device, sizes, dtypes):
    compiled = torch.compile(eager_sinusoidal)
    peer = _diffusers()
    rows = []
    for dtype_name in dtypes:
        dtype = common.DTYPES[dtype_name]
        for batch in sizes:
            t = torch.randint(0, 1000, (batch,), device=device)
            nbytes = batch * DIM * dtype.itemsize
            variants = {
                "fused": lambda: fastflow.timestep_embedding(t, DIM, dtype=dtype, **DIT),
                "eager": lambda: eager_sinusoidal(t, dtype),
                "torch.compile": lambda: compiled(t, dtype),
            }
            if peer is not None:
                variants["diffusers"] = lambda: peer(t, DIM, **DIT).to(dtype)
            rows += common.measure(device, dtype_name, batch * DIM, variants, nbytes,
                                   common.copy_bandwidth_gbps(device, nbytes))
    return rows


def run_fourier(device, sizes):
    compiled = torch.compile(eager_fourier)
    rows = []
    for batch in sizes:
        t = torch.rand(batch, device=device)
        W = (torch.randn(DIM // 2, device=device) * 16).requires_grad_()
        grad = torch.randn(batch, DIM, device=device)

        def fused():
            out = fastflow.fourier_embedding(t, W)
            out.backward(grad)
            return out

        variants = {"fused": fused, "eager": lambda: eager_fourier(t, W, grad),
                    "torch.compile": lambda: compiled(t, W, grad)}
        nbytes = 2 * grad.nbytes
        rows += common.measure(device, "fp32", batch * DIM, variants, nbytes,
                               common.copy_bandwidth_gbps(device, nbytes))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="256,1024,4096,16384,65536")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [int(n) for n in args.sizes.split(",")]
    common.report(run_sinusoidal(device, sizes, args.dtypes.split(",")), "embedding_sinusoidal",
                  f"timestep_embedding (dim {DIM})", device)
    common.report(run_fourier(device, sizes), "embedding_fourier",
                  f"fourier_embedding fwd+bwd (dim {DIM})", device)


if __name__ == "__main__":
    main()
