"""The README's code runs as written: its API tour and its drop-in imports, with small stand-ins
for the objects the README leaves to the reader (a model, a flow map, labels, a pipeline)."""
import re
import types
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(heading):
    """The first ```python block after the line `heading`."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def _time_column(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def model(x, t, y=None):
    """A velocity field of x's shape: any model fastflow calls as model(x, t, **kwargs)."""
    out = 0.5 * x + _time_column(t, x)
    return out if y is None else out + _time_column(y.to(x.dtype), x)


def phi(x, s, t):
    """A two-time flow map phi(x, s, t)."""
    return x + _time_column(t - s, x)


def test_api_tour_runs():
    labels = torch.arange(16) % 3
    namespace = {"model": model, "phi": phi, "eps_hat": torch.randn(64, 3, 32, 32),
                 "W": torch.randn(8), "noise": torch.randn(16, 2), "labels": labels,
                 "null": torch.full_like(labels, 3)}
    exec(compile(_block_after("## API tour"), "README.md (API tour)", "exec"), namespace)
    assert namespace["x"].shape == (16, 2)
    assert namespace["t_grid"].shape == (29,)


def test_drop_in_imports_run():
    diffusers = pytest.importorskip("diffusers")
    pipe = types.SimpleNamespace(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    namespace = {"pipe": pipe}
    exec(compile(_block_after("## Switch one import"), "README.md (drop-ins)", "exec"), namespace)
    from fastflow.compat.diffusers import FlowMatchEulerDiscreteScheduler
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0
