"""Counter-based Gaussian noise: each value is a pure function of (seed, sample id, step,
element index), so a sample's noise does not depend on the batch it is drawn in, its position
there, the device count or the order of the calls (DESIGN.md section 6). Integer hashing
(Wellons' lowbias32, in 32-bit lanes of int64 tensors) then Box-Muller, all as tensor ops on the
device: no host generator, no synchronisation, and it can be captured in a CUDA graph.

Uniforms carry 24 bits, so |z| < 5.9: no tail beyond that, which re-noising does not miss.
"""
import math

import torch

_MASK = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2^32 for x in [0, 2^32), in int64 without overflow: c split in 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed, ids, step):
    """A 32-bit key per sample from the seed, the sample ids [B] (int64) and the step. The seed
    and the step are hashed as Python ints (the same arithmetic): a host value copied to the
    device would make every step wait on the host, and break CUDA graph capture."""
    seed_lo, seed_hi = _mix32(seed & _MASK), _mix32((seed >> 32) & _MASK)
    key = _mix32((ids & _MASK) ^ seed_lo)
    key = _mix32(key ^ _mix32((ids >> 32) & _MASK) ^ seed_hi)
    return _mix32(key ^ _mix32(step & _MASK))


def gaussian(seed, ids, step, shape, dtype=torch.float32):
    """Standard normal noise of `shape` ([B, ...]), sample b a function of (seed, ids[b], step).

    Args:
        seed: a Python int.
        ids: [B] int64 tensor, the global index of each sample (its identity across batches).
        step: a Python int (the sampler step).
    """
    batch, n = shape[0], math.prod(shape[1:])
    key = _key(int(seed), ids.to(torch.int64), int(step))[:, None]        # [B, 1]
    index = torch.arange(n, dtype=torch.int64, device=ids.device)
    u1 = _uniform(_mix32(key ^ _mix32(2 * index)))
    u2 = _uniform(_mix32(key ^ _mix32(2 * index + 1)))
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
    return z.reshape(batch, *shape[1:]).to(dtype)


def _uniform(bits):
    """The top 24 bits as a float32 in (0, 1)."""
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
