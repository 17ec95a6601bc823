"""The drop-ins of fastflow.compat against the originals, on the same inputs.

    python benchmarks/bench_compat.py [--device cpu|cuda] [--sizes 1048576,16777216]

    torchcfm        sample_location_and_conditional_flow of ConditionalFlowMatcher (I-CFM,
                    sigma 0.1), TargetConditionalFlowMatcher, VariancePreserving... and
                    SchrodingerBridge... (its OT plan excluded: ot_method stays the original's,
                    so the batch is small and the plan cost the same for both)
    flow_matching   AffineProbPath(CondOTScheduler()).sample, and ODESolver.sample (Euler,
                    100 steps, tiny model, batch 16)
    diffusers       a 28-step FlowMatchEulerDiscreteScheduler loop (fp32 and bf16 latents, a
                    model that returns its input)

Reports ms and the speedup of the drop-in; writes benchmarks/results/compat_<device>_<allocator>.csv.
"""
import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BATCH = 64


def _pair(original, drop_in):
    """(original module, fastflow's), or None when the original is not installed."""
    try:
        return importlib.import_module(original), importlib.import_module(drop_in)
    except ImportError as exc:
        print(f"skipping {original}: {exc}")
        return None


def _row(device, library, case, numel, ms_original, ms_fastflow):
    return {"device": common.device_name(device), "allocator": common.allocator_setting(device),
            **common.versions(), "library": library, "case": case, "numel": numel,
            "original ms": ms_original, "fastflow ms": ms_fastflow,
            "speedup": ms_original / ms_fastflow}


def _timed_pair(device, library, case, numel, make, run):
    """Time run(obj) for the original's and fastflow's objects from make(module), same seed."""
    original, ours = (make(module) for module in _MODULES[library])
    ms = common.time_variants({"original": lambda: run(original),
                               "fastflow": lambda: run(ours)}, device)
    return _row(device, library, case, numel, ms["original"], ms["fastflow"])


def run_torchcfm(device, sizes):
    rows = []
    for numel in sizes:
        x0 = torch.randn(BATCH, numel // BATCH, device=device)
        x1 = torch.randn_like(x0)
        for name, kwargs in (("ConditionalFlowMatcher", {"sigma": 0.1}),
                             ("TargetConditionalFlowMatcher", {"sigma": 0.1}),
                             ("VariancePreservingConditionalFlowMatcher", {"sigma": 0.1}),
                             ("SchrodingerBridgeConditionalFlowMatcher", {"sigma": 0.5})):
            t = torch.rand(BATCH, device=device)
            if name.startswith("Schrodinger"):
                def run(m, t=t):
                    # The conditional path only (the OT plan is the original's in both).
                    m.sample_location_and_conditional_flow(x0, x1, t)
                make = lambda mod, name=name, kwargs=kwargs: _no_plan(getattr(mod, name)(**kwargs))
            else:
                run = lambda m, t=t: m.sample_location_and_conditional_flow(x0, x1, t)  # noqa: E731
                make = lambda mod, name=name, kwargs=kwargs: getattr(mod, name)(**kwargs)  # noqa: E731
            rows.append(_timed_pair(device, "torchcfm", name, numel, make, run))
    return rows


def _no_plan(matcher):
    """A Schrodinger-bridge matcher whose OT coupling is the identity (timing the path alone)."""
    matcher.ot_sampler.sample_plan = lambda x0, x1, replace=True: (x0, x1)
    return matcher


def run_flow_matching(device, sizes):
    rows = []
    for numel in sizes:
        x0 = torch.randn(BATCH, numel // BATCH, device=device)
        x1, t = torch.randn_like(x0), torch.rand(BATCH, device=device)
        rows.append(_timed_pair(
            device, "flow_matching", "AffineProbPath(CondOT).sample", numel,
            lambda mod: mod[0].AffineProbPath(scheduler=mod[0].scheduler.CondOTScheduler()),
            lambda path: path.sample(x_0=x0, x_1=x1, t=t)))
    net = torch.nn.Linear(3, 2).to(device)

    def velocity(x, t, **_):
        return net(torch.cat([x, t.reshape(-1).expand(x.shape[0])[:, None]], dim=1))

    x = torch.randn(16, 2, device=device)
    rows.append(_timed_pair(
        device, "flow_matching", "ODESolver euler, 100 steps, tiny model", x.numel(),
        lambda mod: mod[1].ODESolver(velocity_model=_Wrapper(velocity)),
        lambda solver: solver.sample(x_init=x, step_size=0.01, method="euler")))
    return rows


class _Wrapper(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, **extras):
        return self.fn(x, t, **extras)


def run_diffusers(device, sizes):
    rows = []
    for numel in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            latents = torch.randn(BATCH, numel // BATCH, device=device, dtype=dtype)

            def loop(scheduler):
                scheduler.set_timesteps(28, device=device)
                x = latents
                for t in scheduler.timesteps:
                    x = scheduler.step(x, t, x, return_dict=False)[0]
                return x

            rows.append(_timed_pair(device, "diffusers", f"28-step Euler loop, {dtype}".replace(
                "torch.", ""), numel, lambda mod: mod.FlowMatchEulerDiscreteScheduler(shift=3.0),
                loop))
    return rows


_MODULES = {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="1048576,16777216")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [int(n) for n in args.sizes.split(",")]
    rows = []
    peers = {
        "torchcfm": (("torchcfm.conditional_flow_matching", "fastflow.compat.torchcfm"),
                     run_torchcfm),
        "flow_matching": ((None, None), run_flow_matching),
        "diffusers": (("diffusers.schedulers.scheduling_flow_match_euler_discrete",
                       "fastflow.compat.diffusers"), run_diffusers),
    }
    for library, ((original, drop_in), runner) in peers.items():
        if library == "flow_matching":
            path, solver = (_pair("flow_matching.path", "fastflow.compat.flow_matching.path"),
                            _pair("flow_matching.solver", "fastflow.compat.flow_matching.solver"))
            if path is None or solver is None:
                continue
            _MODULES[library] = [(path[0], solver[0]), (path[1], solver[1])]
        else:
            pair = _pair(original, drop_in)
            if pair is None:
                continue
            _MODULES[library] = list(pair)
        with torch.no_grad():
            rows += runner(device, sizes)
    print(f"# fastflow.compat against the originals on {common.device_name(device)}, allocator "
          f"{common.allocator_setting(device)}")
    common.print_table(rows, ["library", "case", "numel", "original ms", "fastflow ms", "speedup"])
    print("wrote", common.write_csv(f"compat_{common.slug(device.type)}_"
                                    f"{common.slug(common.allocator_setting(device))}", rows))


if __name__ == "__main__":
    main()
