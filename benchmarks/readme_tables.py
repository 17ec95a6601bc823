"""The README's CPU performance tables, rendered from benchmarks/results/*_cpu_default.csv.

    python benchmarks/readme_tables.py [results folder]

Prints one markdown table per op (interpolate, loss, embedding, convert, paths, sampler
overhead) in the README's columns, so that the README's figures are the CSVs' and none is typed
by hand.
"""
import csv
import os
import sys

K, M = 1 << 10, 1 << 20


def ms(x):
    x = float(x)
    if x < 0.1:
        return f"{x:.3f} ms"
    return f"{x:.0f} ms" if x >= 1000 else f"{x:#.3g}".rstrip(".") + " ms"


def ratio(x):
    return f"{float(x):.2f}x"


def megabytes(x):
    x = float(x)
    return f"{round(x):g}" if x >= 1 else f"{round(x, 2):g}"


def elements(n):
    return f"{n // M}M" if n >= M else f"{n // K}K"


def _markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def op_table(results, name, cases, variants, extra_cells, column="dtype", where=None):
    """One row per (label, value, size) of `cases`, value that of `column` in the CSV (the
    dtype, or the path of the paths benchmark), among the CSV's rows whose columns have the
    values of `where`: first the label and size, then each variant's time, then
    extra_cells(rows by variant). Cases missing from the CSV are left out."""
    where = where or {}
    with open(os.path.join(results, f"{name}_cpu_default.csv")) as f:
        found = {(r[column], int(r["numel"]), r["variant"]): r for r in csv.DictReader(f)
                 if all(r.get(k) == v for k, v in where.items())}
    rows = []
    for label, dtype, sizes, scale in cases:
        for size in sizes:
            by = {v: found.get((dtype, size * scale, v)) for v in variants}
            if by[variants[0]] is None:
                continue
            times = [ms(by[v]["ms"]) if by[v] else "" for v in variants]
            fused = by["fused"]
            rows.append([label, str(size) if scale > 1 else elements(size), *times,
                         ratio(fused["vs eager"]), ratio(fused["vs compile"]), *extra_cells(by)])
    return rows


def interpolate(results):
    variants = ["fused", "fused out=", "eager", "torch.compile"]
    cases = [("fp32", "fp32", [K, 64 * K, M, 16 * M, 64 * M], 1),
             ("bf16", "bf16", [M, 4 * M, 16 * M, 64 * M], 1),
             ("fp16", "fp16", [M, 4 * M, 16 * M], 1)]
    rows = op_table(results, "interpolate", cases, variants,
                    lambda by: [f"{float(by['fused out=']['of copy bw']):.2f}"])
    return _markdown(["dtype", "elements", "fused", "fused `out=`", "eager", "torch.compile",
                      "fused vs eager", "fused vs compile", "`out=` of copy bw"], rows)


def loss(results):
    variants = ["fused", "eager", "torch.compile"]
    cases = [("fp32", "fp32", [K, 64 * K, M, 16 * M, 64 * M], 1),
             ("bf16", "bf16", [M, 16 * M, 64 * M], 1),
             ("fp16", "fp16", [M, 16 * M], 1)]
    rows = op_table(results, "loss", cases, variants, lambda by: [
        " / ".join(megabytes(by[v]["peak MB"]) for v in variants)])
    return _markdown(["dtype", "elements", "fused", "eager", "torch.compile", "fused vs eager",
                      "fused vs compile", "peak MB fused / eager / compile"], rows)


def embedding(results):
    width = 256   # numel = batch * width
    variants = ["fused", "eager", "torch.compile", "diffusers"]
    rows = op_table(results, "embedding_sinusoidal",
                    [("sinusoidal fp32", "fp32", [256, 4096, 65536], width),
                     ("sinusoidal bf16", "bf16", [4096], width)], variants, lambda by: [])
    rows += op_table(results, "embedding_fourier",
                     [("Fourier fwd+bwd fp32", "fp32", [1024, 4096], width)], variants,
                     lambda by: [])
    return _markdown(["workload", "batch", *variants, "fused vs eager", "fused vs compile"], rows)


def convert(results):
    variants = ["fused", "eager", "torch.compile", "by hand"]
    cases = [("fp32", "fp32", [K, 64 * K, M, 16 * M, 64 * M], 1), ("bf16", "bf16", [16 * M], 1)]
    rows = op_table(results, "convert", cases, variants, lambda by: [])
    return _markdown(["dtype", "elements", *variants, "fused vs eager", "fused vs compile"], rows)


def paths(results):
    variants = ["fused", "eager", "torch.compile"]
    names = ["cond_ot", "polynomial", "cosine", "linear_vp", "vp", "target_cfm", "constant_noise",
             "schrodinger_bridge"]
    rows = []
    for op, layout, sizes in (("interpolate", "sample", [K, M]), ("interpolate", "token", [M]),
                              ("loss fwd+bwd", "token", [M])):
        rows += op_table(results, "paths", [(n, n, sizes, 1) for n in names], variants,
                         lambda by, op=op, layout=layout: [op, layout], column="path",
                         where={"op": op, "layout": f"time per {layout}"})
    return _markdown(["path (fp32)", "elements", *variants, "fused vs eager", "fused vs compile",
                      "op", "a time per"], rows)


def sampler(results):
    solvers = ["fastflow Sampler", "fastflow.sample", "flow_matching ODESolver",
               "torchdiffeq odeint", "diffusers Euler loop"]
    with open(os.path.join(results, "sampler_overhead_cpu_default.csv")) as f:
        found = {(r["method"], r["solver"]): r for r in csv.DictReader(f)}
    rows = []
    for method, label in (("euler", "euler"), ("midpoint", "midpoint"),
                          ("rk4", "rk4 (3/8 rule, as torchdiffeq)")):
        cells = [f"{float(found[method, s]['overhead us/step']):.0f} us"
                 if (method, s) in found else "" for s in solvers]
        ours = found[method, "fastflow Sampler"]["overhead vs ODESolver"]
        rows.append([label, *cells, f"{float(ours):.2f}x"])
    return _markdown(["method", *solvers, "Sampler vs ODESolver"], rows)


if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        sys.exit(print(__doc__))
    if len(sys.argv) > 2:
        sys.exit(__doc__)
    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results")
    for table in (interpolate, loss, embedding, convert, paths, sampler):
        print(f"\n## {table.__name__}\n{table(folder)}")
