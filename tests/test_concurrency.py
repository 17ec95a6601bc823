"""Caches that several threads of one process share: DeviceCache (embedding frequencies, the
loss's constant rows, flow-map grids) and the sampler's time views."""
import pytest
import torch

import fastflow
from fastflow import _ops, sampling


def test_device_cache_clear_tolerates_an_insertion_meanwhile():
    # A full cache empties itself in get(); another thread's get() may insert while clear()
    # walks the entries (the GIL may pass between bytecodes): that raised
    # "RuntimeError: dictionary changed size during iteration" in the thread that cleared.
    cpu = torch.device("cpu")
    cache = _ops.DeviceCache(maxsize=2)
    inserted = []

    class Entry:   # reading is_cuda is where the other thread gets the GIL, here made certain
        device = cpu

        @property
        def is_cuda(self):
            if not inserted:
                inserted.append("other thread")
                cache.get("other thread", cpu, lambda: torch.ones(1), direct=True)
            return False

    cache.get("a", cpu, Entry, direct=True)
    cache.get("b", cpu, Entry, direct=True)
    value = cache.get("c", cpu, lambda: torch.zeros(1), direct=True)   # full: clear()
    assert inserted and torch.equal(value, torch.zeros(1))
    assert torch.equal(cache.get("c", cpu, lambda: torch.ones(1), direct=True), torch.zeros(1))


def _decay(x, t):
    return -x * t[:, None]


def test_sampler_time_views_are_bounded_over_batch_sizes():
    # The model's times were kept per (batch, dtype) without bound, in the plan that _PLANS
    # shares across samplers: a server sampling batches of every size kept a copy of the
    # table and steps x stages views for each (about 118 KB per size for 50 RK4 steps).
    bound = sampling._TIME_VIEWS_SIZE
    sampler = fastflow.Sampler(_decay, steps=5, method="rk4")
    xs = [torch.randn(batch, 3) for batch in range(1, 3 * bound)]
    want = [sampler(x) for x in xs]
    views = sampler._plans[torch.device("cpu"), torch.float32, True][1].views
    assert len(views) <= bound
    for x, w in zip(xs, want):   # the views dropped are rebuilt, to the same bits
        assert torch.equal(sampler(x), w)
        assert len(views) <= bound


def test_a_run_checks_the_times_it_read_when_another_run_dropped_them():
    # Runs of samplers with equal options share one time table (_TimeViews): one run may drop
    # the cached views while another is inside its loop (the cache full, in another thread).
    # The run then checked the cache's entry, which was gone: KeyError, or a newer entry that
    # hid a write into the times the run had read.
    sampler = fastflow.Sampler(lambda x, t: -x, steps=3)
    x = torch.randn(1, 2)
    want = sampler(x)
    views = sampler._plans[torch.device("cpu"), torch.float32, True][1].views

    def dropping(x, t):
        views.clear()   # as another thread's run does when the cache is full
        return -x

    assert torch.equal(fastflow.Sampler(dropping, steps=3)(x), want)

    def writing(x, t):
        t.mul_(2)
        views.clear()
        sampler(x)      # another run rebuilds the entry meanwhile
        return -x

    with pytest.raises(RuntimeError, match="modified its t in place"):
        fastflow.Sampler(writing, steps=3)(x)


def test_time_views_built_while_capturing_are_not_shared(monkeypatch):
    # A capture that finds its times evicted (another thread's run, after the warm-up) builds
    # them inside the graph: the copy holds the times only once the graph replays, so it must
    # not be handed to other runs from the cache.
    sampler = fastflow.Sampler(_decay, steps=3)
    x = torch.randn(2, 3)
    sampler(x)
    times = sampler._plans[torch.device("cpu"), torch.float32, True][1]
    times.views.clear()
    monkeypatch.setattr(sampling._ops, "capturing", lambda device: True)
    entry = times.entry(2, torch.float32)
    assert (2, torch.float32) not in times.views
    monkeypatch.undo()
    assert times.entry(2, torch.float32) is not entry
