"""fastflow.flow_map_loss against the term-by-term reference."""
import pytest
import torch

import fastflow
from fastflow.reference import flow_map_loss as reference_flow_map_loss


class TwoTimeMap(torch.nn.Module):
    """phi(x, s, t) = x + (t - s) * net(x, s, t): the identity at t = s by construction."""

    def __init__(self, dim=5):
        super().__init__()
        self.net = torch.nn.Linear(dim + 2, dim)

    def forward(self, x, s, t, scale=1.0):
        h = torch.cat([x, s[:, None].to(x.dtype), t[:, None].to(x.dtype)], dim=1)
        return x + scale * (t - s)[:, None].to(x.dtype) * self.net(h)


WEIGHTS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.5, 0.25)]


@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
@pytest.mark.parametrize("path", ["cond_ot", "cosine"])
def test_matches_reference_and_its_gradients(backend, path, weights):
    torch.manual_seed(0)
    model = TwoTimeMap().to(backend)
    x0, x1 = torch.randn(6, 5, device=backend), torch.randn(6, 5, device=backend)
    t = torch.rand(6, device=backend)
    s = t * torch.rand(6, device=backend)
    kwargs = dict(s=s, path=path, match_weight=weights[0], consistency_weight=weights[1],
                  identity_weight=weights[2], scale=0.7)
    loss = fastflow.flow_map_loss(model, x0, x1, t, **kwargs)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    want = reference_flow_map_loss(model, x0, x1, t, **kwargs)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_exact_flow_map_has_zero_loss():
    # For CondOT with a single data point x1*, phi(x, s, t) = x + (t - s)/(1 - s) (x1* - x) is the
    # exact flow map: every term vanishes.
    x1 = torch.randn(1, 4).expand(8, 4).contiguous()
    x0 = torch.randn(8, 4)

    def exact(x, s, t):
        return x + ((t - s) / (1 - s))[:, None] * (x1 - x)

    loss = fastflow.flow_map_loss(exact, x0, x1, torch.rand(8) * 0.9, s=torch.rand(8) * 0.05,
                                  reduction="none")
    torch.testing.assert_close(loss, torch.zeros(8), atol=1e-10, rtol=0)


def test_reductions_and_errors():
    model, x0, x1 = TwoTimeMap(), torch.randn(4, 5), torch.randn(4, 5)
    per_sample = fastflow.flow_map_loss(model, x0, x1, 0.5, reduction="none")
    assert per_sample.shape == (4,)
    torch.testing.assert_close(fastflow.flow_map_loss(model, x0, x1, 0.5), per_sample.mean())
    torch.testing.assert_close(fastflow.flow_map_loss(model, x0, x1, 0.5, reduction="sum"),
                               per_sample.sum())
    with pytest.raises(ValueError, match="reduction: expected one of"):
        fastflow.flow_map_loss(model, x0, x1, 0.5, reduction="max")
    with pytest.raises(TypeError, match="path: flow-map matching needs an affine path"):
        fastflow.flow_map_loss(model, x0, x1, 0.5, path="constant_noise")
    with pytest.raises(ValueError, match="model output: expected shape"):
        fastflow.flow_map_loss(lambda x, s, t: x[:, :2], x0, x1, 0.5)
    # Every term checks the map's output, not only the match term: the passes would pair a
    # transposed output's elements by position.
    x0, x1 = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    for weights in (dict(match_weight=0.0), dict(match_weight=0.0, consistency_weight=0.0)):
        with pytest.raises(ValueError, match=r"model output: expected shape \(2, 2, 3\)"):
            fastflow.flow_map_loss(lambda x, s, t: x.transpose(1, 2), x0, x1, 0.5, **weights)
        with pytest.raises(TypeError, match="model output: expected dtype torch.float32"):
            fastflow.flow_map_loss(lambda x, s, t: x.double(), x0, x1, 0.5, **weights)
    with pytest.raises(ValueError, match=r"s: expected a scalar, shape \[2\]"):
        fastflow.flow_map_loss(model, x0, x1, 0.5, s=torch.rand(3))
    with pytest.raises(TypeError, match="u: expected a floating-point tensor"):
        fastflow.flow_map_loss(model, x0, x1, 0.5, u=torch.ones(2, dtype=torch.long))


def test_a_map_that_writes_into_its_times_gets_an_error():
    # A batch of one's s and t are writable views of the cached grid: s.mul_(1000) changed the
    # times of every later call with that grid.
    def scaling_in_place(x, s, t):
        s.mul_(1000)
        return x + (t - s)[:, None]

    x = torch.zeros(1, 2)
    with pytest.raises(RuntimeError, match="model: it modified its s or t in place"):
        fastflow.sample_flow_map(scaling_in_place, x, steps=2)
    out = fastflow.sample_flow_map(lambda x, s, t: x + (t - s)[:, None], x, steps=2)
    assert torch.equal(out, torch.ones(1, 2))


def test_steps_and_a_time_grid_together_are_refused():
    # The grid won and steps was silently ignored; fastflow.sample refuses the pair.
    with pytest.raises(ValueError, match="steps, time_grid: give one of them, got both"):
        fastflow.sample_flow_map(lambda x, s, t: x, torch.zeros(2, 3), steps=3,
                                 time_grid=[0.0, 1.0])


def test_term_weights_are_numbers_or_tensors():
    # A [B] weight raised "Boolean value of Tensor ... is ambiguous"; a string an index error.
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.rand(4, generator=g)
    phi = lambda x, s, t: x * (1 + t - s)[:, None]  # noqa: E731
    w = torch.tensor([0.0, 1.0, 2.0, 3.0])
    per_sample = fastflow.flow_map_loss(phi, x0, x1, t, match_weight=w, reduction="none")
    terms = fastflow.flow_map_loss(phi, x0, x1, t, match_weight=1.0, reduction="none")
    unmatched = fastflow.flow_map_loss(phi, x0, x1, t, match_weight=0.0, reduction="none")
    torch.testing.assert_close(per_sample, unmatched + w * (terms - unmatched))
    torch.testing.assert_close(per_sample, reference_flow_map_loss(
        phi, x0, x1, t, match_weight=w, reduction="none"))   # which truth-tested it
    with pytest.raises(TypeError, match="match_weight must be a number, got str"):
        fastflow.flow_map_loss(phi, x0, x1, t, match_weight="1")
    with pytest.raises(ValueError, match="identity_weight must be finite"):
        fastflow.flow_map_loss(phi, x0, x1, t, identity_weight=float("nan"))
    with pytest.raises(TypeError, match="t: expected a float or a tensor"):
        fastflow.flow_map_loss(phi, x0, x1, None)   # a zeros_like error from inside before
    with pytest.raises(TypeError, match="model: expected a callable"):
        fastflow.flow_map_loss("phi", x0, x1, t)
    # A [B, 1] weight broadcast the [B] terms to [B, B] (its mean the product of the means).
    for shape in ((4, 1), (1, 4), (3,)):
        with pytest.raises(ValueError, match=r"match_weight: expected .* shape \[4\]"):
            fastflow.flow_map_loss(phi, x0, x1, t, match_weight=torch.ones(shape))
    with pytest.raises(TypeError, match="consistency_weight: expected .* floating-point"):
        fastflow.flow_map_loss(phi, x0, x1, t, consistency_weight=torch.ones(4, dtype=torch.long))
    for w in (torch.tensor(2.0), torch.tensor([2.0])):   # one weight for the batch
        torch.testing.assert_close(
            fastflow.flow_map_loss(phi, x0, x1, t, match_weight=w, reduction="none"),
            unmatched + 2 * (terms - unmatched))
