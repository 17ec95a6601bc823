"""Timing, bandwidth and reporting helpers shared by the benchmark scripts.

Benchmarks print and save figures; they never assert timings. Every result row carries the
device name, the library versions and the allocator setting, so files from different machines
can sit side by side in benchmarks/results/.
"""
import csv
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def allocator_setting(device):
    if device.type == "cuda":
        return "cuda-caching"
    return "THP" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "default"


def time_ms(fn, device, reps=None, min_time=0.5):
    """Median wall time of fn() in ms, after warm-up; CUDA timed with events."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        reps = reps or max(10, min(1000, int(min_time * 1e3 / once)))
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    t0 = time.perf_counter()
    fn()
    once = (time.perf_counter() - t0) * 1e3
    reps = reps or max(5, min(200, int(min_time * 1e3 / max(once, 1e-3))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device, nbytes):
    """The machine's measured copy bandwidth (bytes read + written per second), on buffers of
    nbytes: the roof that a streaming kernel can reach."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.nbytes / ms / 1e6


def versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"torch": torch.__version__, "triton": triton_version}


def write_csv(name, rows):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows, columns):
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r[c]).rjust(widths[c]) for c in columns))


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def slug(text):
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_").lower()
