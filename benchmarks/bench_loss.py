"""fastflow.flow_matching_loss forward + backward against the eager MSE and torch.compile of it.

    python benchmarks/bench_loss.py [--device cpu|cuda] [--sizes ...] [--dtypes fp32,bf16,fp16]

The eager reference is what a training loop writes: F.mse_loss(pred, x1 - x0), backward to pred.
Reports ms for forward + backward, effective GB/s (the fused op's minimum traffic: pred, x0, x1
read twice, the gradient written once), speedups, and the peak memory each variant adds, measured
in a fresh process (CPU: peak resident set; CUDA: peak allocated). Writes
benchmarks/results/loss_<device>_<allocator>.csv and a PNG plot.
"""
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402

BATCH = 64


def eager_loss(pred, x0, x1):
    return F.mse_loss(pred.float(), (x1 - x0).float())


_compiled_loss = torch.compile(eager_loss)


def _variants(x0, x1, t):
    return {
        "fused": lambda p: fastflow.flow_matching_loss(p, x0, x1, t),
        "eager": lambda p: eager_loss(p, x0, x1),
        "torch.compile": lambda p: _compiled_loss(p, x0, x1),
    }


def _inputs(numel, dtype, device):
    x1 = torch.randn(BATCH, numel // BATCH, device=device, dtype=dtype)
    return torch.randn_like(x1).requires_grad_(), torch.randn_like(x1), x1, torch.rand(BATCH, device=device)


def peak_extra_bytes(variant, numel, dtype_name, device):
    """Peak memory one forward + backward adds beyond what is live before it, measured in a fresh
    process after a warm-up call: the resident-set high-water mark, reset through
    /proc/self/clear_refs. (On CUDA, `run` reads the allocator's peak in its own process: a
    process per figure would take most of a GPU session.)"""
    code = f"""
import json, sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import bench_loss as b
pred, x0, x1, t = b._inputs({numel}, b.common.DTYPES[{dtype_name!r}], torch.device({device.type!r}))
fn = b._variants(x0, x1, t)[{variant!r}]
fn(pred).backward(); pred.grad = None
print(json.dumps(b._measure_peak(lambda: fn(pred).backward(), {device.type!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure_peak(fn, device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set, to the current one
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def run(device, sizes, dtypes):
    rows = []
    for dtype_name in dtypes:
        for numel in sizes:
            pred, x0, x1, t = _inputs(numel, common.DTYPES[dtype_name], device)
            moved = 7 * x1.nbytes
            copy_gbps = common.copy_bandwidth_gbps(device, x1.nbytes)

            def step(fn):
                pred.grad = None
                fn(pred).backward()

            fns = _variants(x0, x1, t)
            variants = {name: (lambda fn=fn: step(fn)) for name, fn in fns.items()}

            def peak_mb(name):
                if device.type == "cuda":
                    pred.grad = None
                    extra = _measure_peak(lambda: fns[name](pred).backward(), "cuda")
                else:
                    extra = peak_extra_bytes(name, numel, dtype_name, device)
                return {"peak MB": extra / 2**20}

            rows += common.measure(device, dtype_name, numel, variants, moved, copy_gbps,
                                   extra=peak_mb)
            del pred, x0, x1
    return rows


if __name__ == "__main__":
    common.main(run, "loss", "flow_matching_loss forward+backward", __doc__,
                sizes=[1 << p for p in (10, 16, 20, 24, 26)], dtypes=["fp32", "bf16", "fp16"])
