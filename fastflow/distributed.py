"""Sampling a batch across torch.distributed ranks, with the result of one process.

Each rank integrates a contiguous shard of the global batch and the shards are gathered in
order. Samples are independent and the stochastic sampler's noise depends only on (seed, sample
id, step), with the global index as the id, so the gathered result equals sampling the whole
batch in one process (bit for bit where the model's output for a sample does not depend on the
batch it is in).
"""
import numbers

import torch
import torch.distributed as dist

from .sampling import Sampler, _Layout


def sample_distributed(model, x_init, *, group=None, model_kwargs=None, uncond_kwargs=None,
                       sample_ids=None, **options):
    """``fastflow.sample`` over the ranks of `group`: every rank passes the same global batch
    x_init [B, ...] and gets the whole result back.

    Tensors among model_kwargs and uncond_kwargs whose first dimension is B, and a per-sample
    guidance_scale (a tensor, list or array of B scales, or a callable giving them) are sharded
    with the batch (2B for a doubled batch: both halves are), as are sample_ids, the global ids
    that name the samples for the stochastic sampler's noise (default 0, ..., B - 1). Other
    arguments go to every rank as they are. A rank that fails raises its error, and the others
    raise one that says so, instead of waiting for its shard.

    Example (under torchrun)::

        >>> dist.init_process_group("nccl")
        >>> images = fastflow.sample_distributed(model, noise, steps=50, method="heun",
        ...                                      model_kwargs={"y": labels})
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    batch = x_init.shape[0]
    bounds = [batch * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]

    def shard(value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        if value.shape[0] == batch:
            return value[lo:hi]
        if value.shape[0] == 2 * batch and options.get("doubled_batch"):
            return torch.cat([value[lo:hi], value[batch + lo:batch + hi]])
        return value

    def shard_scale(scale):
        """A per-sample guidance scale in any form the Sampler takes (a tensor, list or array,
        or a callable giving one per step) cut to this rank's samples."""
        if callable(scale):
            return lambda t: shard_scale(scale(t))
        if scale is not None and not isinstance(scale, (torch.Tensor, numbers.Real)):
            scale = torch.as_tensor(scale, dtype=torch.float64)
        return shard(scale)

    if sample_ids is None:
        sample_ids = torch.arange(batch, device=x_init.device)
    elif not isinstance(sample_ids, torch.Tensor):
        sample_ids = torch.as_tensor(sample_ids, device=x_init.device)
    try:
        options = {k: shard_scale(v) if k == "guidance_scale" else v for k, v in options.items()}
        local = Sampler(model, **options)(
            x_init[lo:hi], uncond_kwargs=None if uncond_kwargs is None else
            {k: shard(v) for k, v in uncond_kwargs.items()},
            sample_ids=shard(sample_ids), **{k: shard(v) for k, v in (model_kwargs or {}).items()})
        error = None
    except Exception as err:   # the other ranks would wait for this one's shard forever
        local, error = None, err
    failed = torch.tensor([error is not None], dtype=torch.int32, device=x_init.device)
    dist.all_reduce(failed, group=group)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"sample_distributed: {failed.item()} other rank(s) of the group "
                           f"failed (their errors say why); rank {rank} had no error")
    if isinstance(local, tuple):   # (final, intermediates [steps + 1, b, ...])
        final, trail = local
        return (_as_sampled(_gather(final, bounds, group), x_init),
                _gather(trail, bounds, group, dim=1))
    return _as_sampled(_gather(local, bounds, group), x_init)


def _as_sampled(final, x_init):
    """The gathered final state in the layout fastflow.sample gives it (channels_last, say),
    which the concatenation does not keep."""
    layout = _Layout(x_init)
    return final if layout.order is None else layout.empty(final.shape, final.dtype).copy_(final)


def _gather(local, bounds, group, dim=0):
    """Concatenate the ranks' shards along their batch dimension `dim`, in rank order (shards
    may differ in size by one): contiguous, as fastflow.sample returns intermediates."""
    largest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    shape = list(local.shape)
    shape[dim] = largest
    padded = local.new_zeros(shape)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in range(len(bounds) - 1)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, b - a) for p, a, b in zip(parts, bounds[:-1], bounds[1:])],
                     dim=dim)
