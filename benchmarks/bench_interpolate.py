"""fastflow.interpolate (CondOT) against the eager expressions and torch.compile of them.

    python benchmarks/bench_interpolate.py [--device cpu|cuda] [--sizes 65536,...] [--dtypes fp32,bf16]

Per size and dtype: fused with fresh outputs, fused with out= buffers, eager
`t*x1 + (1-t)*x0, x1 - x0`, and torch.compile of that eager function. Reports ms, effective GB/s
(two reads and two writes of the tensor size), speedups and the fraction of the copy bandwidth
measured in the same run. Writes benchmarks/results/interpolate_<device>_<allocator>.csv and a
PNG plot beside it. On CPU, run with THP_MEM_ALLOC_ENABLE=1 too: fresh-output figures depend on
the allocator (page faults), and the file name says which setting was used.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCH = 64


def eager_cond_ot(x0, x1, t):
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return t * x1 + (1 - t) * x0, x1 - x0


def run(device, sizes, dtypes):
    compiled = torch.compile(eager_cond_ot)
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
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
            ms = {name: common.time_ms(fn, device) for name, fn in variants.items()}
            for name in variants:
                gbps = moved / ms[name] / 1e6
                rows.append({
                    "device": common.device_name(device), "allocator": common.allocator_setting(device),
                    **common.versions(), "dtype": dtype_name, "numel": numel, "variant": name,
                    "ms": ms[name], "GB/s": gbps, "vs eager": ms["eager"] / ms[name],
                    "vs compile": ms["torch.compile"] / ms[name], "copy GB/s": copy_gbps,
                    "of copy bw": gbps / copy_gbps,
                })
            del x0, x1, out
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if r["dtype"] == dtype and r["variant"] == variant]
            ax.plot([r["numel"] for r in sel], [r["GB/s"] for r in sel], marker="o", label=variant)
        sel = [r for r in rows if r["dtype"] == dtype and r["variant"] == "eager"]
        ax.plot([r["numel"] for r in sel], [r["copy GB/s"] for r in sel], "k--", label="copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements per tensor")
        ax.set_ylabel("effective GB/s")
        ax.set_title(f"interpolate (CondOT), {dtype}")
        ax.legend()
    fig.suptitle(f"{rows[0]['device']}, allocator {rows[0]['allocator']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=",".join(str(1 << p) for p in range(16, 27, 2)))
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = run(device, [int(s) for s in args.sizes.split(",")], args.dtypes.split(","))
    print(f"# interpolate on {rows[0]['device']}, allocator {rows[0]['allocator']}, "
          f"torch {rows[0]['torch']}, triton {rows[0]['triton']}")
    common.print_table(rows, ["dtype", "numel", "variant", "ms", "GB/s", "vs eager", "vs compile",
                              "of copy bw"])
    name = f"interpolate_{common.slug(device.type)}_{common.slug(rows[0]['allocator'])}"
    print("wrote", common.write_csv(name, rows))
    plot(rows, os.path.join(common.RESULTS, f"{name}.png"))


if __name__ == "__main__":
    main()
