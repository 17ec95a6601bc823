"""Counter-based Gaussian noise: each value is a pure function of (seed, sample id, step,
element index), so a sample's noise does not depend on the batch it is drawn in, its position
there, the device count or the order of the calls (DESIGN.md section 6). No host generator, no
synchronisation: it can be captured in a CUDA graph.

The definition, for sample b with id `ids[b]` and element i (row-major within the sample):

    k0, k1 = chain(C0), chain(C1)                              two 32-bit keys, `sample_keys`
    chain(h) : h = mix32(h ^ w) for the words w = seed_lo, seed_hi, id_lo, id_hi, step
    u1    = uniform(mix32(k0 ^ mix32((2 i) ^ k1)))             top 24 bits, (k + 0.5) / 2^24
    u2    = uniform(mix32(k0 ^ mix32((2 i + 1) ^ k1)))
    z     = sqrt(-2 ln u1) cos(2 pi u2)                        Box-Muller, in float32

Two chains from different constants make a 64-bit key: two (sample, step) pairs draw the same
noise only if both keys agree, about 2^-64 for a pair. With one 32-bit key, a run of 4096
samples and 64 steps already held 14 pairs of identical noise tensors, and two seeds differed
only by a relabelling of the ids.

mix32 is Wellons' lowbias32 integer hash; ln and cos are fastflow's own branch-free
polynomials (Cephes'), written out in fastflow/reference/_noise.py. Everything is integer
operations and single fp32 adds, multiplies and square roots, never contracted, so every
backend gives the same bits: the C++ kernel on CPU (baseline and AVX2), the Triton kernel on a
GPU or under its interpreter, and the reference. Uniforms carry 24 bits, so |z| < 5.9: no tail
beyond that, which re-noising does not miss.
"""
import torch

from . import _ops

_MASK = 0xFFFFFFFF


def gaussian(seed, ids, step, shape, dtype=torch.float32, out=None):
    """Standard normal noise of `shape` ([B, ...]) in `dtype` on ids' device, sample b a
    function of (seed, ids[b], step); written into `out` (contiguous, of that shape) if given.

    Args:
        seed: a Python int in [-2**63, 2**64) (a negative seed is its 64-bit two's complement).
        ids: [B] integer tensor, the global index of each sample (its identity across batches).
        step: a Python int (the sampler step).
    """
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=ids.device)
    seed = int(seed)
    _ops.gaussian_out(ids.to(torch.int64), seed - 2**64 if seed >= 2**63 else seed, int(step), out)
    return out


def mix32(x):
    """Wellons' lowbias32 of 32-bit values held in int64 tensors or Python ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x, c):
    """(x * c) mod 2^32 for x in [0, 2^32), in int64 without overflow: c split in 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


# The chains' starting values: the first 32 bits of the fractional parts of sqrt(2) and sqrt(3).
CHAIN_STARTS = (0x6A09E667, 0xBB67AE85)


def sample_keys(seed, ids, step):
    """The two 32-bit keys (k0, k1) of each sample from the seed, the sample ids [B] (int64) and
    the step. The seed and the step are hashed as Python ints (the same arithmetic): a host
    value copied to the device would make every step wait on the host, and break CUDA graph
    capture."""
    keys = []
    for start in CHAIN_STARTS:
        h = mix32(mix32(start ^ (seed & _MASK)) ^ ((seed >> 32) & _MASK))
        h = mix32(mix32((ids & _MASK) ^ h) ^ ((ids >> 32) & _MASK))
        keys.append(mix32(h ^ (step & _MASK)))
    return tuple(keys)
