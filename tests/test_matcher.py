"""FlowMatcher: draws, the training loss, and reproducibility."""
import pytest
import torch

import fastflow
from fastflow import paths
from fastflow.reference import flow_matching_loss as reference_loss
from fastflow.reference import interpolate as reference_interpolate


class Tiny(torch.nn.Module):
    def __init__(self, dim=6):
        super().__init__()
        self.net = torch.nn.Linear(dim + 1, dim)

    def forward(self, x, t, scale=1.0):
        return scale * self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


@pytest.mark.parametrize("path,prediction", [("cond_ot", "velocity"), ("cosine", "epsilon"),
                                             ("vp", "data"), ("linear_vp", "score"),
                                             (paths.SchrodingerBridge(0.5), "velocity")])
def test_loss_equals_the_reference_on_the_same_draws(backend, path, prediction):
    torch.manual_seed(0)
    model = Tiny().to(backend)
    x1 = torch.randn(8, 6, device=backend)
    fm = fastflow.FlowMatcher(path=path, prediction=prediction, time_sampler="logit_normal")
    loss = fm.loss(model, x1, generator=torch.Generator(backend).manual_seed(3), scale=0.5)
    # The same draws, in the documented order: x0, t, then the path's noise.
    g = torch.Generator(backend).manual_seed(3)
    x0 = torch.randn(x1.shape, device=backend, generator=g)
    t = torch.sigmoid(torch.randn(8, device=backend, generator=g))
    noise = torch.randn(x1.shape, device=backend, generator=g) if fm.path.uses_noise else None
    x_t, _ = reference_interpolate(x0, x1, t, fm.path, noise)
    want = reference_loss(model(x_t, t, scale=0.5), x0, x1, t, fm.path, prediction, noise=noise)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_reproducible_with_a_generator():
    model, x1 = Tiny(), torch.randn(5, 6)
    fm = fastflow.FlowMatcher()
    first = fm.loss(model, x1, generator=torch.Generator().manual_seed(7))
    again = fm.loss(model, x1, generator=torch.Generator().manual_seed(7))
    other = fm.loss(model, x1, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_loss_with_the_callers_times():
    model, x1 = Tiny(), torch.randn(6, 6)
    x0, t = torch.randn_like(x1), torch.linspace(0.1, 0.9, 6)
    fm = fastflow.FlowMatcher(path="cosine", prediction="epsilon")
    x_t, _ = reference_interpolate(x0, x1, t, fm.path)
    want = reference_loss(model(x_t, t), x0, x1, t, fm.path, "epsilon")
    torch.testing.assert_close(fm.loss(model, x1, x0=x0, t=t), want, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_model():
    model, x1 = Tiny(), torch.randn(16, 6)
    x0 = torch.randn_like(x1)
    torch.manual_seed(1)
    fastflow.FlowMatcher().loss(model, x1, x0=x0).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    t = torch.rand(16)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    torch.nn.functional.mse_loss(model(x_t, t), x1 - x0).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_loss_under_autocast(backend):
    # The model returns bf16 beside fp32 data: the loss and its gradients are F.mse_loss's.
    model, x1 = Tiny().to(backend), torch.randn(16, 6, device=backend)
    x0 = torch.randn_like(x1)
    runs = []
    for fused in (True, False):
        model.zero_grad()
        g = torch.Generator(backend).manual_seed(4)
        with torch.autocast(backend.type, dtype=torch.bfloat16):
            if fused:
                loss = fastflow.FlowMatcher().loss(model, x1, x0=x0, generator=g)
            else:  # the same draw of t, the same x_t
                t = torch.rand(16, device=backend, generator=g)
                x_t, _ = fastflow.interpolate(x0, x1, t)
                loss = torch.nn.functional.mse_loss(model(x_t, t), x1 - x0)
        loss.backward()
        runs.append((loss, [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (want, want_grads) = runs
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("prediction", ["velocity", "epsilon", "data", "score"])
def test_sample_location_and_target(backend, prediction):
    x0, x1 = torch.randn(4, 3, 5, device=backend), torch.randn(4, 3, 5, device=backend)
    t = torch.rand(4, device=backend) * 0.8 + 0.1
    fm = fastflow.FlowMatcher(path="cosine", prediction=prediction)
    sample = fm.sample_location_and_target(x0, x1, t)
    x_t, u_t = reference_interpolate(x0, x1, t, "cosine")
    sigma = paths.Cosine()(t)[1].view(4, 1, 1)
    target = {"velocity": u_t, "epsilon": x0, "data": x1, "score": -x0 / sigma}[prediction]
    torch.testing.assert_close(sample.x_t, x_t)
    torch.testing.assert_close(sample.target, target, rtol=1e-5, atol=1e-6)
    assert sample.t is t and sample.noise is None


def test_time_samplers():
    fm = fastflow.FlowMatcher(time_sampler="logit_normal", logit_mean=1.0, logit_std=0.5)
    t = fm.sample_t(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    torch.testing.assert_close(torch.logit(t).mean(), torch.tensor(1.0), atol=0.02, rtol=0)
    calls = []
    custom = fastflow.FlowMatcher(time_sampler=lambda b, d, g: calls.append(b) or torch.full((b,), 0.5))
    custom.loss(Tiny(), torch.randn(3, 6))
    assert calls == [3]


def test_sigma_selects_the_noisy_path():
    assert isinstance(fastflow.FlowMatcher(sigma=0.1).path, paths.ConstantNoise)
    assert fastflow.FlowMatcher("schrodinger_bridge", sigma=0.3).path.sigma == 0.3
    assert isinstance(fastflow.FlowMatcher("target_cfm", sigma=0.2).path, paths.TargetCFM)
    with pytest.raises(ValueError, match="sigma: path 'cosine' has no noise level"):
        fastflow.FlowMatcher("cosine", sigma=0.1)
    with pytest.raises(ValueError, match="sigma: give the noise level to the Path"):
        fastflow.FlowMatcher(paths.CondOT(), sigma=0.1)
    # An explicit 0 is a noise level, not the default: cond_ot stays CondOT, the others take it.
    assert type(fastflow.FlowMatcher(sigma=0.0).path) is paths.CondOT
    assert fastflow.FlowMatcher("schrodinger_bridge").path.sigma == 1.0    # the path's default
    assert fastflow.FlowMatcher("target_cfm", sigma=0).path.sigma_min == 0.0
    assert fastflow.FlowMatcher("target_cfm", sigma=1.0).path.sigma_min == 1.0   # torchcfm's too
    assert type(fastflow.FlowMatcher("cosine", sigma=0.0).path) is paths.Cosine
    with pytest.raises(ValueError, match="sigma"):   # was SchrodingerBridge(1.0), silently
        fastflow.FlowMatcher("schrodinger_bridge", sigma=0.0)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"sigma": "abc"}, TypeError, "sigma must be a number, got str"),
    ({"sigma": True}, TypeError, "sigma must be a number, got bool"),    # was 1.0
    ({"logit_std": "1"}, TypeError, "logit_std must be a number, got str"),
    ({"logit_std": float("inf")}, ValueError, "logit_std must be finite"),
    ({"logit_mean": float("nan")}, ValueError, "logit_mean must be finite"),   # a NaN loss
])
def test_the_matcher_checks_its_numbers(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastflow.FlowMatcher(time_sampler="logit_normal", **kwargs)


def test_compiled_training_step():
    model, x1 = Tiny(), torch.randn(8, 6)
    fm = fastflow.FlowMatcher(path="cosine")
    step = torch.compile(lambda x1, x0: fm.loss(model, x1, x0=x0), fullgraph=True)
    step(x1, torch.randn_like(x1)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="time_sampler: expected one of"):
        fastflow.FlowMatcher(time_sampler="beta")
    with pytest.raises(ValueError, match="prediction: expected one of"):
        fastflow.FlowMatcher(prediction="x0")
    with pytest.raises(ValueError, match="logit_std: must be positive"):
        fastflow.FlowMatcher(logit_std=0.0)
    with pytest.raises(TypeError, match="model: expected a callable"):
        fastflow.FlowMatcher().loss(None, torch.randn(3, 6))
    for path, sigma in (("schrodinger_bridge", None), ("cond_ot", 0.1)):   # at construction,
        with pytest.raises(TypeError, match="'score' needs an affine path"):   # not the first step
            fastflow.FlowMatcher(path, prediction="score", sigma=sigma)
    with pytest.raises(ValueError, match="x0: expected shape"):
        fastflow.FlowMatcher().loss(Tiny(), torch.randn(3, 6), x0=torch.randn(3, 5))
