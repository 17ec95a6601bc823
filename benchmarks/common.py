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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def time_variants(variants, device, min_time=0.5, rounds=5, warmup=5, spreads=None):
    """Median wall time in ms of each variant (a no-argument callable), sampled in `rounds`
    interleaved rounds: every round times a block of calls of each variant in turn, so a burst
    of load on a shared machine (or a GPU's clock moving) lands on every variant alike instead
    of on whichever ran then. The figure is the median of the rounds' medians: a round that a
    burst of load (or the VM's scheduler) slowed throughout moves it no more than any other
    round. `spreads`, a dict, receives each variant's slowest round median over its fastest:
    how far to trust the figure.

    Warm-up first, until two calls in a row agree within a quarter (at least `warmup` calls):
    on CPU the first calls that allocate fresh huge pages run up to 2x slower until the
    kernel's pool settles, and torch.compile may recompile on a call after its first.
    CUDA is timed with events."""
    reps = {}
    for name, fn in variants.items():
        reps[name] = max(2, min(200, int(min_time * 1e3 / rounds / _settled(fn, device, warmup))))
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(statistics.median(_timed_calls(fn, device, reps[name])))
    if spreads is not None:
        spreads.update({name: max(s) / min(s) for name, s in samples.items()})
    return {name: statistics.median(s) for name, s in samples.items()}


def _settled(fn, device, warmup, most=50):
    """The time in ms of a call of fn once two calls in a row agree within a quarter (after at
    least `warmup` calls, at most `most`)."""
    last = None
    for calls in range(1, most + 1):
        now = max(_timed_calls(fn, device, 1)[0], 1e-3)
        if calls >= warmup and last is not None and abs(now - last) <= 0.25 * min(now, last):
            break
        last = now
    return now


def time_ms(fn, device, min_time=0.5, rounds=1):
    """Median wall time of fn() in ms (see time_variants)."""
    return time_variants({"fn": fn}, device, min_time, rounds)["fn"]


def with_backend(name, fn):
    """fn run with FASTFLOW_BACKEND=name, set around each call (a microsecond or so, against
    the tens of microseconds of the smallest op)."""
    def run():
        previous = os.environ.get("FASTFLOW_BACKEND")
        os.environ["FASTFLOW_BACKEND"] = name
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["FASTFLOW_BACKEND"]
            else:
                os.environ["FASTFLOW_BACKEND"] = previous
    return run


def _timed_calls(fn, device, reps):
    """The time in ms of each of `reps` calls of fn."""
    times = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth_gbps(device, nbytes):
    """The machine's measured copy bandwidth (bytes read + written per second), on buffers of
    nbytes: the roof that a streaming kernel can reach."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.nbytes / ms / 1e6


def check_same_results(variants, for_scale=()):
    """Raise unless the variants that return tensors return the same ones: the same number, float
    types and shapes, and values close to "eager"'s. A comparison with code that writes wider
    outputs, or computes something else, would report a speedup it did not measure. Variants
    named in `for_scale` do other work on purpose (torch.randn_like beside the sampler's noise)
    and are not checked. They run in their order: one may update in place what the next reads
    (the guided step's state)."""
    def returned(name):
        out = variants[name]()
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [x.detach() for x in out if isinstance(x, torch.Tensor)]

    def described(tensors):
        return [(x.dtype, tuple(x.shape)) for x in tensors]

    results = {name: returned(name) for name in variants if name not in for_scale}
    expected = results.get("eager", [])
    for name, tensors in results.items():
        if not tensors:  # works in place (a sampler's state)
            continue
        if described(tensors) != described(expected):
            raise RuntimeError(f"benchmark variant {name!r} returns {described(tensors)}, where "
                               f"'eager' returns {described(expected)}")
        for got, want in zip(tensors, expected):
            # Loose: the variants round differently (eager rounds every op to the data's type).
            torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05,
                                       msg=lambda text: f"benchmark variant {name!r}: {text}")


def measure(device, dtype_name, numel, variants, moved_bytes, copy_gbps, extra=None,
            for_scale=()):
    """Time each variant (a no-argument callable) and return one result row per variant.
    `moved_bytes` is the minimum traffic of the op; speedups are against the variants named
    "eager" and "torch.compile", which every benchmark includes. extra(name) adds columns.
    The variants must compute the same thing, except those named in `for_scale`: see
    check_same_results."""
    check_same_results(variants, for_scale)
    spreads = {}
    ms = time_variants(variants, device, spreads=spreads)
    rows = []
    for name in variants:
        gbps = moved_bytes / ms[name] / 1e6
        rows.append({
            "device": device_name(device), "allocator": allocator_setting(device), **versions(),
            "dtype": dtype_name, "numel": numel, "variant": name, "ms": ms[name], "GB/s": gbps,
            "vs eager": ms["eager"] / ms[name], "vs compile": ms["torch.compile"] / ms[name],
            "copy GB/s": copy_gbps, "of copy bw": gbps / copy_gbps, "spread": spreads[name],
            **(extra(name) if extra else {}),
        })
    return rows


def report(rows, op, title, device):
    """Print the table, write results/<op>_<device>_<allocator>.csv and the plot beside it."""
    first = rows[0]
    print(f"# {title} on {first['device']}, allocator {first['allocator']}, torch {first['torch']}, "
          f"triton {first['triton']}")
    columns = ["dtype", "numel", "variant", "ms", "GB/s", "vs eager", "vs compile", "of copy bw"]
    print_table(rows, columns + [c for c in first if c not in columns and c not in _CONTEXT])
    name = f"{op}_{slug(device.type)}_{slug(first['allocator'])}"
    print("wrote", write_csv(name, rows))
    plot_gbps(rows, os.path.join(RESULTS, f"{name}.png"), title)


_CONTEXT = ("device", "allocator", "torch", "triton", "copy GB/s")


def main(run, op, title, doc, sizes, dtypes):
    """Command line of a benchmark script: --device, --sizes, --dtypes, then run and report."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=",".join(str(n) for n in sizes))
    parser.add_argument("--dtypes", default=",".join(dtypes), help=", ".join(DTYPES))
    args = parser.parse_args()
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)}; expected names from "
                     f"{', '.join(DTYPES)}")
    device = torch.device(args.device)
    rows = run(device, [int(n) for n in args.sizes.split(",")], args.dtypes.split(","))
    report(rows, op, title, device)


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


def plot_gbps(rows, path, title):
    """Effective GB/s against size, one panel per dtype (and op or path, where rows name
    one), one line per variant, copy dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(_panel(r) for r in rows))
    columns = min(4, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6 * columns, 4 * lines), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if _panel(r) == panel and r["variant"] == variant]
            ax.plot([r["numel"] for r in sel], [r["GB/s"] for r in sel], marker="o", label=variant)
        sel = [r for r in rows if _panel(r) == panel and r["variant"] == rows[0]["variant"]]
        ax.plot([r["numel"] for r in sel], [r["copy GB/s"] for r in sel], "k--", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements per tensor")
        ax.set_ylabel("effective GB/s")
        ax.set_title(f"{title}, {panel}")
        ax.legend()
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{rows[0]['device']}, allocator {rows[0]['allocator']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _panel(row):
    return ", ".join(str(row[k]) for k in ("layout", "op", "path", "dtype") if k in row)


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
