"""Samplers: fastflow.sample against flow_matching's ODESolver, torchdiffeq's odeint and a
diffusers FlowMatchEulerDiscreteScheduler loop; and the fused guided Euler step.

    python benchmarks/bench_sampler.py [--device cpu|cuda] [--steps 100]

Three tables:

    overhead    per-step cost around a tiny model (Linear 2 -> 2, batch 16): total time minus the
                time spent inside the model, clocked around each call in the same run (a model
                timed alone runs faster, with warm caches, and would inflate every overhead),
                divided by the steps
    mlp         full sampling of a 2-D MLP (3 x 256 hidden, batch 1024), 100 steps
    guidance    one guided Euler step x + h (v_u + w (v_c - v_u)) on an fp32 state with bf16
                model outputs: fastflow's fused pass vs the eager arithmetic and torch.compile
    noise       one step's noise of the stochastic sampler (fp32, batch 64): the fused kernel
                vs the same formulas in PyTorch ops (fastflow.reference.gaussian) and
                torch.compile of them; torch.randn_like, PyTorch's own (not counter-based)
                generator, for scale

Writes benchmarks/results/sampler_{overhead,mlp,guidance,noise}_<device>_<allocator>.csv. On
CUDA the sampler also runs with capture=True (the whole loop as one CUDA graph).
"""
import argparse
import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastflow  # noqa: E402


class Model(torch.nn.Module):
    """Takes t as a 0-d tensor (ODESolver, torchdiffeq, diffusers) or a [B] tensor (fastflow)."""

    def __init__(self, dim, hidden, layers):
        super().__init__()
        sizes = [dim + 1] + [hidden] * layers + [dim]
        mods = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            mods += [torch.nn.Linear(a, b), torch.nn.SiLU()]
        self.net = torch.nn.Sequential(*mods[:-1])

    def forward(self, x, t, **_):
        t = t.reshape(-1).to(x.dtype).expand(x.shape[0])
        return self.net(torch.cat([x, t[:, None]], dim=1))


def _solvers(model, x, steps, method, device):
    """name -> callable sampling x over `steps` steps of `method`, for every library present."""
    grid = torch.linspace(0, 1, steps + 1, device=device)
    method_ff = "rk4_38" if method == "rk4" else method   # torchdiffeq's rk4 is the 3/8 rule
    sampler = fastflow.Sampler(model, time_grid=grid, method=method_ff)
    run = {"fastflow Sampler": lambda: sampler(x),
           # the one-shot call also builds the sampler (its coefficient tables) every time
           "fastflow.sample": lambda: fastflow.sample(model, x, time_grid=grid, method=method_ff)}
    if device.type == "cuda":
        captured = fastflow.Sampler(model, time_grid=grid, method=method_ff, capture=True)
        run["fastflow capture"] = lambda: captured(x)
    try:
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper

        class Wrapped(ModelWrapper):
            def forward(self, x, t, **extras):
                return self.model(x, t)

        solver = ODESolver(velocity_model=Wrapped(model))
        fm_method = {"heun": "heun2"}.get(method, method)
        run["flow_matching ODESolver"] = lambda: solver.sample(x_init=x, step_size=1 / steps,
                                                               method=fm_method,
                                                               time_grid=grid[[0, -1]])
    except ImportError:
        pass
    try:
        import torchdiffeq
        td_method = {"heun": "heun2"}.get(method, method)
        run["torchdiffeq odeint"] = lambda: torchdiffeq.odeint(lambda t, y: model(y, t), x, grid,
                                                               method=td_method)[-1]
    except ImportError:
        pass
    if method == "euler":
        try:
            from diffusers import FlowMatchEulerDiscreteScheduler
            scheduler = FlowMatchEulerDiscreteScheduler()

            def diffusers_loop():
                scheduler.set_timesteps(steps, device=device)
                y = x
                for timestep in scheduler.timesteps:
                    # sigma convention: the model's time is 1 - t, its velocity dx/dsigma.
                    y = scheduler.step(-model(y, 1 - timestep / 1000), timestep, y).prev_sample
                return y

            run["diffusers Euler loop"] = diffusers_loop
        except ImportError:
            pass
    return run


class Clocked:
    """The model, with the wall time spent inside it summed (synchronising CUDA around it). A
    plain callable, so that the clock itself costs every solver the same ~1 us per call."""

    def __init__(self, model, device):
        self.model, self.device, self.seconds = model, device, 0.0

    def __call__(self, x, t, **kwargs):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = self.model(x, t, **kwargs)
        sync()
        self.seconds += time.perf_counter() - start
        return out


def _clocked_runs(solvers, clocked, device, rounds=5, reps=4, warmup=3):
    """name -> (total ms, ms inside the model) per call of each solver: medians of `reps` calls
    in each of `rounds` rounds that interleave the solvers (see common.time_variants)."""
    for fn in solvers.values():
        for _ in range(warmup):
            fn()
    totals = {name: [] for name in solvers}
    inside = {name: [] for name in solvers}
    for _ in range(rounds):
        for name, fn in solvers.items():
            for _ in range(reps):
                clocked.seconds = 0.0
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                totals[name].append((time.perf_counter() - start) * 1e3)
                inside[name].append(clocked.seconds * 1e3)
    return {name: (statistics.median(totals[name]), statistics.median(inside[name]))
            for name in solvers}


def run_overhead(device, steps):
    rows = []
    clocked = Clocked(Model(2, 2, 0).to(device), device)
    x = torch.randn(16, 2, device=device)
    for method in ("euler", "midpoint", "rk4"):
        solvers = {name: fn for name, fn in _solvers(clocked, x, steps, method, device).items()
                   if "capture" not in name}   # a replayed graph never enters the Python model
        measured = _clocked_runs(solvers, clocked, device)
        per_step = {name: (total - inside) / steps * 1e3
                    for name, (total, inside) in measured.items()}
        ref = per_step.get("flow_matching ODESolver")
        for name, (total, inside) in measured.items():
            rows.append({"device": common.device_name(device), **common.versions(),
                         "method": method, "steps": steps, "solver": name, "total ms": total,
                         "model ms": inside, "overhead us/step": per_step[name],
                         "overhead vs ODESolver": per_step[name] / ref if ref else float("nan")})
    return rows


def run_mlp(device, steps):
    rows = []
    model = Model(2, 256, 3).to(device)
    x = torch.randn(1024, 2, device=device)
    for method in ("euler", "heun", "rk4"):
        times = common.time_variants(_solvers(model, x, steps, method, device), device,
                                     rounds=3)
        ref = times.get("flow_matching ODESolver")
        for name, ms in times.items():
            rows.append({"device": common.device_name(device), **common.versions(),
                         "method": method, "steps": steps, "solver": name, "total ms": ms,
                         "speedup vs ODESolver": ref / ms if ref else float("nan")})
    return rows


def eager_guided_step(x, v_u, v_c, h, w):
    return x + h * (v_u.float() + w * (v_c.float() - v_u.float()))


def run_guidance(device, sizes):
    compiled = torch.compile(eager_guided_step)
    rows = []
    for numel in sizes:
        x = torch.randn(64, numel // 64, device=device)
        v_u, v_c = (torch.randn_like(x).bfloat16() for _ in range(2))
        coeffs = torch.tensor([[[1.0, 0.1 * (1 - 4.0), 0.1 * 4.0]]], device=device)

        def fused():
            fastflow._ops.affine_out([x, v_u, v_c], coeffs, [x])

        variants = {"fused": fused, "eager": lambda: eager_guided_step(x, v_u, v_c, 0.1, 4.0),
                    "torch.compile": lambda: compiled(x, v_u, v_c, 0.1, 4.0)}
        moved = 2 * x.nbytes + 2 * v_u.nbytes
        rows += common.measure(device, "fp32 state, bf16 v", numel, variants, moved,
                               common.copy_bandwidth_gbps(device, x.nbytes))
    return rows


def run_noise(device, sizes):
    compiled = torch.compile(fastflow.reference.gaussian)
    ids = torch.arange(64, device=device)
    rows = []
    for numel in sizes:
        out = torch.empty(64, numel // 64, device=device)
        variants = {"fused": lambda: fastflow._noise.gaussian(7, ids, 3, out.shape, out=out),
                    "eager": lambda: fastflow.reference.gaussian(7, ids, 3, out.shape),
                    "torch.compile": lambda: compiled(7, ids, 3, out.shape),
                    "torch.randn_like": lambda: torch.randn_like(out)}
        rows += common.measure(device, "fp32", numel, variants, out.nbytes,
                               common.copy_bandwidth_gbps(device, out.nbytes),
                               for_scale=("torch.randn_like",))
    return rows


def _write(rows, name, device):
    path = os.path.join(common.RESULTS, f"{name}_{common.slug(device.type)}_"
                                        f"{common.slug(common.allocator_setting(device))}.csv")
    os.makedirs(common.RESULTS, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("wrote", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sizes", default="1048576,16777216")
    args = parser.parse_args()
    device = torch.device(args.device)
    with torch.no_grad():
        overhead = run_overhead(device, args.steps)
        print(f"# per-step overhead, tiny model, batch 16, on {common.device_name(device)}")
        common.print_table(overhead, ["method", "solver", "total ms", "model ms",
                                      "overhead us/step", "overhead vs ODESolver"])
        _write(overhead, "sampler_overhead", device)
        mlp = run_mlp(device, args.steps)
        print(f"# 2-D MLP (3 x 256), batch 1024, {args.steps} steps")
        common.print_table(mlp, ["method", "solver", "total ms", "speedup vs ODESolver"])
        _write(mlp, "sampler_mlp", device)
    sizes = [int(n) for n in args.sizes.split(",")]
    guidance = run_guidance(device, sizes)
    common.report(guidance, "sampler_guidance", "guided Euler step", device)
    common.report(run_noise(device, sizes), "sampler_noise", "stochastic sampler's noise", device)


if __name__ == "__main__":
    main()
