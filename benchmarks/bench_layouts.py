"""fastflow on data laid out otherwise than [B, ...] contiguous: interpolate (CondOT) and the loss
(forward + backward) against the eager expressions and torch.compile of them, all on the same
tensors.

    python benchmarks/bench_layouts.py [--device cpu|cuda] [--sizes ...] [--dtypes fp32,bf16]

Layouts:
- channels_last: [64, 16, H, W] in channels_last, the layout convolutional networks run fastest
  in. fastflow streams them in place (each sample is one run of memory in every tensor) and
  returns outputs in the same layout, as the eager expressions do.
- tokens: [N / 4, 4], one time per row of 4 values, as when every token of a sequence has its
  own time. fastflow builds [N / 4, 2, 2] coefficients (entry-major) in one pass, then the CPU
  kernel covers two rows per vector of eight floats (csrc/affine_cpu_kernels.h,
  affine_lanes).
- batch innermost: [64, N / 64] views of [N / 64, 64] tensors (x.T). The CPU kernels stream
  their memory in order, the groups starting over in each row of 64 (csrc/row_layout.cpp,
  batch_period), and fresh outputs keep the layout; the GPU ones copy them to contiguous
  first.
- channel slice: [64, 16, H, W] halves of [64, 32, H, W] tensors, as a network that predicts a
  variance beside the velocity returns them. The CPU kernels stream such rows at one stride
  apart in place (csrc/row_layout.cpp); the GPU ones copy them to contiguous first.
Interpolate is also measured into out= buffers in the layout ("fused out=").
Reports ms, effective GB/s (interpolate: two reads and two writes; the loss: pred, x0, x1 read
twice and the gradient written once) and the fraction of the copy bandwidth. Writes
benchmarks/results/layouts_<device>_<allocator>.csv and a PNG plot beside it.
"""
import itertools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402
from bench_interpolate import eager_cond_ot  # noqa: E402
from bench_loss import eager_loss  # noqa: E402

BATCH, CHANNELS = 64, 16


def _channels_last(numel, dtype, device):
    side = math.isqrt(numel // (BATCH * CHANNELS))
    x = torch.randn(BATCH, CHANNELS, side, side, device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last)


def _tokens(numel, dtype, device):
    return torch.randn(numel // 4, 4, device=device, dtype=dtype)


def _batch_innermost(numel, dtype, device):
    return torch.randn(numel // BATCH, BATCH, device=device, dtype=dtype).t()


def _channel_slice(numel, dtype, device):
    side = math.isqrt(numel // (BATCH * CHANNELS))
    return torch.randn(BATCH, 2 * CHANNELS, side, side, device=device, dtype=dtype)[:, :CHANNELS]


LAYOUTS = {"channels_last": _channels_last, "tokens": _tokens, "batch innermost": _batch_innermost,
           "channel slice": _channel_slice}


def run(device, sizes, dtypes):
    rows = []
    for layout, dtype_name, numel in itertools.product(LAYOUTS, dtypes, sizes):
        # A fresh cache for each configuration: past dynamo's recompile limit (8 per function)
        # torch.compile would silently run the eager code.
        torch._dynamo.reset()
        compiled_interpolate, compiled_loss = torch.compile(eager_cond_ot), torch.compile(eager_loss)
        dtype = common.DTYPES[dtype_name]
        x0, x1, pred, *out = (LAYOUTS[layout](numel, dtype, device) for _ in range(5))
        pred.requires_grad_()
        t = torch.rand(x1.shape[0], device=device)
        copy_gbps = common.copy_bandwidth_gbps(device, x1.nbytes)

        def step(loss):
            pred.grad = None
            loss().backward()

        interpolate = {
            "fused": lambda: fastflow.interpolate(x0, x1, t),
            "fused out=": lambda: fastflow.interpolate(x0, x1, t, out=out),
            "eager": lambda: eager_cond_ot(x0, x1, t),
            "torch.compile": lambda: compiled_interpolate(x0, x1, t),
        }
        loss = {
            "fused": lambda: step(lambda: fastflow.flow_matching_loss(pred, x0, x1, t)),
            "eager": lambda: step(lambda: eager_loss(pred, x0, x1)),
            "torch.compile": lambda: step(lambda: compiled_loss(pred, x0, x1)),
        }
        for op, variants, moved in (("interpolate", interpolate, 4 * x1.nbytes),
                                    ("loss fwd+bwd", loss, 7 * x1.nbytes)):
            rows += common.measure(device, dtype_name, x1.numel(), variants, moved, copy_gbps,
                                   extra=lambda name, op=op: {"op": op, "layout": layout})
        del x0, x1, pred, out
    return rows


if __name__ == "__main__":
    common.main(run, "layouts", "layouts", __doc__,
                sizes=[1 << 20, 1 << 24], dtypes=["fp32", "bf16"])
