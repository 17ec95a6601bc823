"""A training step's fastflow ops on CUDA: no host syncs once warm, and capturable as a CUDA graph
(interpolation, time embedding, loss forward and backward, conversion).

Skipped without CUDA; .ci/gpu selects these tests (-k "cuda or capture").
"""
import pytest
import torch

import fastflow

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Net(torch.nn.Module):
    def __init__(self, dim=8, width=16):
        super().__init__()
        self.body = torch.nn.Linear(dim + width, dim)
        self.width = width

    def forward(self, x, t):
        return self.body(torch.cat([x, fastflow.timestep_embedding(t, self.width)], dim=1))


def _step(model, x0, x1, t):
    """Gradients accumulate into model's .grad; returns the loss and a data estimate."""
    x_t, _ = fastflow.interpolate(x0, x1, t)
    pred = model(x_t, t)
    loss = fastflow.flow_matching_loss(pred, x0, x1, t, weight=1 + t)
    loss.backward()
    return loss.detach(), fastflow.convert(pred.detach(), x_t, t, src="velocity", dst="data")


def _inputs(seed, batch=64, dim=8):
    g = torch.Generator("cuda").manual_seed(seed)
    return (torch.randn(batch, dim, device="cuda", generator=g),
            torch.randn(batch, dim, device="cuda", generator=g),
            torch.rand(batch, device="cuda", generator=g))


def test_training_step_has_no_host_syncs_on_cuda():
    model = Net().cuda()
    _step(model, *_inputs(0))   # warm: caches filled, kernels compiled
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, *_inputs(1))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("caches", ["warm", "cold"])
def test_training_step_capture_replays_on_cuda(caches):
    # "cold": the device caches (loss rows, embedding frequencies) emptied after the warm-up,
    # which compiled the kernels. A capture neither reads nor fills them (_ops.capturing): the
    # graph records the ops that build their values.
    model = Net().cuda()
    static = _inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            _step(model, *static)
    torch.cuda.current_stream().wait_stream(side)
    if caches == "cold":
        fastflow.losses._constant_rows.clear()
        fastflow.embeddings._frequencies.clear()
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        captured = _step(model, *static)
    if caches == "cold":
        assert not fastflow.losses._constant_rows
        assert not fastflow.embeddings._frequencies
    for seed in (1, 2):
        fresh = _inputs(seed)
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        model.zero_grad(set_to_none=False)
        graph.replay()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=False)
        want = _step(model, *fresh)
        for got, expected in zip(captured, want):
            torch.testing.assert_close(got, expected)
        for got, p in zip(grads, model.parameters()):
            torch.testing.assert_close(got, p.grad)
