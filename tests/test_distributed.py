"""2 CPU processes with gloo: FlowMatcher under DistributedDataParallel trains exactly as one
process on the global batch, and sample_distributed samples exactly as one process."""
import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fastflow

WORLD, BATCH, DIM, STEPS = 2, 8, 6, 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM + 1, 16), torch.nn.SiLU(), torch.nn.Linear(16, DIM))


class _TimeConditioned(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g),
            torch.rand(BATCH, generator=g))


def _train(model, rows):
    """STEPS of SGD on the samples `rows` of each global batch; returns the first gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for step in range(STEPS):
        x1, x0, t = (v[rows] for v in _data(step))
        fm = fastflow.FlowMatcher(path="cosine", time_sampler=lambda b, d, g, t=t: t)
        opt.zero_grad()
        fm.loss(model, x1, x0=x0).backward()
        if first is None:
            first = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return first


def _join(rank, rendezvous):
    """Join the gloo group through a file, not a TCP port: a free port picked beforehand can be
    taken by another process (a second test run on the machine) before the ranks bind it."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))


def _leave():
    """Leave the group and end the worker at once, its results saved. A gloo worker of this
    torch (2.13, CPU) crashes now and then while the interpreter shuts down, after its work is
    done ("terminate called without an active exception", then SIGSEGV): 7 runs in 25 of a
    plain DDP step with F.mse_loss and no fastflow at all did. mp.spawn would report that as a
    failure. An exception before this point still reaches the test as usual."""
    dist.destroy_process_group()
    os._exit(0)


def _worker(rank, rendezvous, out_path, job):
    """Run job(rank) in the group and save what it returns as <out_path>.<rank>."""
    _join(rank, rendezvous)
    try:
        torch.save(job(rank), f"{out_path}.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave()


def _run_ranks(tmp_path, job):
    """job's results on each rank of a WORLD-process gloo group."""
    out_path = tmp_path / "result.pt"
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(out_path), job), nprocs=WORLD,
             join=True)
    return [torch.load(f"{out_path}.{rank}") for rank in range(WORLD)]


def _ddp_job(rank):
    model = DistributedDataParallel(_TimeConditioned(_model()))
    grads = _train(model, slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD))
    return {"grads": grads, "params": [p.detach() for p in model.parameters()]}


def test_ddp_matches_one_process(tmp_path):
    distributed = _run_ranks(tmp_path, _ddp_job)[0]
    model = _TimeConditioned(_model())
    grads = _train(model, slice(None))
    for got, want in zip(distributed["grads"], grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(distributed["params"], model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


SAMPLE_BATCH = 7   # shards of 3 and 4 samples
SAMPLE_OPTIONS = dict(steps=6, method="euler", stochastic=True, noise_seed=11)
# A per-sample guidance scale in each form the sampler takes; each is cut to the rank's shard.
SCALES = {"tensor": torch.linspace(1, 3, SAMPLE_BATCH),
          "list": torch.linspace(1, 3, SAMPLE_BATCH).tolist(),
          "callable": lambda t: (1 + t) * torch.linspace(1, 3, SAMPLE_BATCH)}


def _sampling_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(SAMPLE_BATCH, DIM, generator=g), torch.randn(SAMPLE_BATCH, DIM, generator=g)


class _Conditioned(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, y=None):
        out = self.net(torch.cat([x, t[:, None]], dim=1))
        return out if y is None else out + y


def _sample_job(rank):
    x0, y = _sampling_inputs()
    with torch.no_grad():
        return {form: fastflow.sample_distributed(
            _Conditioned(_model()), x0, model_kwargs={"y": y}, uncond_kwargs={},
            guidance_scale=scale, **SAMPLE_OPTIONS) for form, scale in SCALES.items()}


def test_sample_distributed_matches_one_process(tmp_path):
    results = _run_ranks(tmp_path, _sample_job)
    x0, y = _sampling_inputs()
    for form, scale in SCALES.items():
        with torch.no_grad():
            want = fastflow.sample(_Conditioned(_model()), x0, model_kwargs={"y": y},
                                   uncond_kwargs={}, guidance_scale=scale, **SAMPLE_OPTIONS)
        for got in results:
            torch.testing.assert_close(got[form], want, rtol=1e-6, atol=1e-6)


def _failing_on_rank_one(x, t):
    if dist.get_rank() == 1:
        raise ValueError("rank 1's model failed")
    return -x


def _edge_job(rank):
    x0, y = _sampling_inputs()
    model, out = _Conditioned(_model()), {}
    with torch.no_grad():
        # One sample over two ranks: rank 0's shard of the per-sample scales was empty, it
        # raised, and rank 1 waited for its shard until the group's timeout.
        out["one sample"] = fastflow.sample_distributed(
            model, x0[:1], model_kwargs={"y": y[:1]}, uncond_kwargs={},
            guidance_scale=torch.tensor([2.0]), **SAMPLE_OPTIONS)
        out["ids"] = fastflow.sample_distributed(
            model, x0, sample_ids=torch.arange(100, 100 + SAMPLE_BATCH), **SAMPLE_OPTIONS)
        # In the layout fastflow.sample gives (the concatenation of the shards was contiguous).
        out["channels_last"], out["intermediates"] = fastflow.sample_distributed(
            _decay, _images(), steps=2, return_intermediates=True)
        try:
            fastflow.sample_distributed(_failing_on_rank_one, x0, steps=2)
        except Exception as err:
            out["error"] = f"{type(err).__name__}: {err}"
    return out


def _decay(x, t):
    return -x * t.view(-1, *[1] * (x.dim() - 1))


def _images():
    return torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(7)).contiguous(
        memory_format=torch.channels_last)


def test_sample_distributed_edges(tmp_path):
    results = _run_ranks(tmp_path, _edge_job)
    x0, y = _sampling_inputs()
    model = _Conditioned(_model())
    with torch.no_grad():
        want = {"one sample": fastflow.sample(model, x0[:1], model_kwargs={"y": y[:1]},
                                              uncond_kwargs={}, guidance_scale=torch.tensor([2.0]),
                                              **SAMPLE_OPTIONS),
                "ids": fastflow.sample(model, x0, sample_ids=torch.arange(100, 100 + SAMPLE_BATCH),
                                       **SAMPLE_OPTIONS),
                "channels_last": fastflow.sample(_decay, _images(), steps=2)}
        _, want["intermediates"] = fastflow.sample(_decay, _images(), steps=2,
                                                   return_intermediates=True)
    errors = ["RuntimeError: sample_distributed: 1 other rank(s) of the group failed (their "
              "errors say why); rank 0 had no error", "ValueError: rank 1's model failed"]
    for rank, got in enumerate(results):
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6)
            assert got[name].stride() == value.stride(), name
        assert got["error"] == errors[rank]
