"""fastflow under torch.func.vmap: an ensemble of 8 members (as torch.func.stack_module_state
trains one), each with its own batch of 64 samples, interpolating on the Cosine path and taking
its loss (forward + backward), against the same written by hand under vmap and torch.compile
of that; and per-sample gradients of the loss (vmap of grad over the 512 samples, as
differential privacy takes them), through the ops' autograd.

    python benchmarks/bench_vmap.py [--device cpu|cuda] [--sizes ...] [--dtypes fp32,bf16]

The ops' vmap rules fold the vmapped dimension into the groups (8 members of 64 samples are 512
groups), so vmap runs one fused pass ("fused"), and torch.compile of the vmapped function traces
it ("fused, compiled"). "eager" is much what fastflow ran before the rules: under vmap the ops
took their plain PyTorch formulas. "fused, loop" calls fastflow once per member, for scale.
Sizes are the elements of each tensor over all members. Reports ms, effective GB/s
(interpolate: two reads, two writes; the loss: pred and the data read twice, the gradient
written; per-sample gradients: three reads, one write), speedups and the fraction of the copy
bandwidth. Writes
benchmarks/results/vmap_<device>_<allocator>.csv and a PNG plot beside it.
"""
import itertools
import os
import sys

import torch
from torch.func import grad, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402
from bench_paths import eager_for, eager_loss_for  # noqa: E402
from fastflow import paths  # noqa: E402

MEMBERS, BATCH = 8, 64
PATH = paths.Cosine()
_eager_interpolate, _eager_loss = eager_for(PATH), eager_loss_for(PATH)


def eager_interpolate(x0, x1, t):
    return _eager_interpolate(x0, x1, t, None)


def eager_loss(pred, x0, x1, t):
    return _eager_loss(pred, x0, x1, t, None)


def fused_interpolate(x0, x1, t):
    return fastflow.interpolate(x0, x1, t, PATH)


def fused_loss(pred, x0, x1, t):
    return fastflow.flow_matching_loss(pred, x0, x1, t, PATH)


def fused_sample_loss(pred, x0, x1, t):
    """One sample's loss, as a batch of one."""
    return fastflow.flow_matching_loss(pred[None], x0[None], x1[None], t[None], PATH)


def eager_sample_loss(pred, x0, x1, t):
    return _eager_loss(pred[None], x0[None], x1[None], t[None], None)


def run(device, sizes, dtypes):
    rows = []
    for dtype_name, numel in itertools.product(dtypes, sizes):
        # A fresh cache for each configuration: past dynamo's recompile limit (8 per function)
        # torch.compile would silently run the eager code.
        torch._dynamo.reset()
        dtype = common.DTYPES[dtype_name]
        shape = (MEMBERS, BATCH, numel // (MEMBERS * BATCH))
        x0, x1, pred = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        pred.requires_grad_()
        t = torch.rand(MEMBERS, BATCH, device=device)
        copy_gbps = common.copy_bandwidth_gbps(device, x1.nbytes)
        members = range(MEMBERS)

        def step(loss):
            pred.grad = None
            loss(pred, x0, x1, t).sum().backward()

        def looped_step():
            pred.grad = None
            sum(fused_loss(pred[e], x0[e], x1[e], t[e]) for e in members).backward()

        compiled = {f: torch.compile(vmap(f)) for f in (fused_interpolate, eager_interpolate,
                                                        fused_loss, eager_loss)}
        per_sample = {f: vmap(grad(f)) for f in (fused_sample_loss, eager_sample_loss)}
        compiled.update({f: torch.compile(g) for f, g in per_sample.items()})
        samples = [x.reshape(MEMBERS * BATCH, -1) for x in (pred.detach(), x0, x1)]
        samples.append(t.reshape(-1))
        interpolate = {
            "fused": lambda: vmap(fused_interpolate)(x0, x1, t),
            "fused, compiled": lambda: compiled[fused_interpolate](x0, x1, t),
            "eager": lambda: vmap(eager_interpolate)(x0, x1, t),
            "torch.compile": lambda: compiled[eager_interpolate](x0, x1, t),
            "fused, loop": lambda: [fused_interpolate(x0[e], x1[e], t[e]) for e in members],
        }
        loss = {
            "fused": lambda: step(vmap(fused_loss)),
            "fused, compiled": lambda: step(compiled[fused_loss]),
            "eager": lambda: step(vmap(eager_loss)),
            "torch.compile": lambda: step(compiled[eager_loss]),
            "fused, loop": looped_step,
        }
        gradients = {
            "fused": lambda: per_sample[fused_sample_loss](*samples),
            "fused, compiled": lambda: compiled[fused_sample_loss](*samples),
            "eager": lambda: per_sample[eager_sample_loss](*samples),
            "torch.compile": lambda: compiled[eager_sample_loss](*samples),
        }
        for op, variants, moved in (("interpolate", interpolate, 4 * x1.nbytes),
                                    ("loss fwd+bwd", loss, 7 * x1.nbytes),
                                    ("per-sample grads", gradients, 4 * x1.nbytes)):
            rows += common.measure(device, dtype_name, x1.numel(), variants, moved, copy_gbps,
                                   extra=lambda name, op=op: {"op": op},
                                   for_scale=("fused, loop",))
        del x0, x1, pred
    return rows


if __name__ == "__main__":
    common.main(run, "vmap", "torch.func.vmap of an 8-member ensemble", __doc__,
                sizes=[1 << 16, 1 << 20, 1 << 24], dtypes=["fp32", "bf16"])
