"""The sampler's counter-based Gaussian noise (fastflow/_noise.py): the same bits on every
backend as the reference's operations, a pure function of (seed, sample id, step, element)."""
import pytest
import torch

import fastflow
from conftest import RecordOps, bits_equal
from fastflow import _backends, _noise, reference

IDS = [0, 3, 2 ** 40, -5, 7]
SEEDS_AND_STEPS = [(7, 11), (2 ** 64 - 1, 0), (-3, 2 ** 40), (2 ** 40 + 5, 2 ** 31)]


@pytest.mark.parametrize("shape", [(5,), (5, 1), (5, 3, 7), (5, 1000), (5, 2, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_backend_gives_the_reference_bits(backend, shape, dtype):
    ids = torch.tensor(IDS, device=backend)
    # The Triton interpreter narrows to bf16 by truncation (compiled Triton rounds to nearest
    # even, as the others do): there, one bf16 ulp.
    truncating = (dtype == torch.bfloat16 and backend.type == "cpu"
                  and _backends.select(backend) == "triton")
    for seed, step in SEEDS_AND_STEPS:
        want = reference.gaussian(seed, ids, step, shape)
        got = _noise.gaussian(seed, ids, step, shape, dtype)
        if truncating:
            torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=0)
        else:
            assert bits_equal(got, want.to(dtype))


def test_a_sample_does_not_depend_on_its_batch(backend):
    ids = torch.arange(64, device=backend)
    z = _noise.gaussian(0, ids, 5, (64, 300))
    for rows in ([10, 11, 12], [63, 0], [7]):
        alone = _noise.gaussian(0, ids[rows], 5, (len(rows), 300))
        assert bits_equal(alone, z[rows])


def test_standard_normal_and_decorrelated():
    ids = torch.arange(64)
    z = _noise.gaussian(0, ids, 0, (64, 4096))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z ** 4).mean().item() - 3) < 0.1                       # Gaussian kurtosis
    assert z.abs().max() < 5.9
    for other in (_noise.gaussian(0, ids, 1, (64, 4096)), _noise.gaussian(1, ids, 0, (64, 4096)),
                  _noise.gaussian(0, ids + 64, 0, (64, 4096))):
        assert abs(torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1]) < 0.01


def test_a_negative_seed_is_its_twos_complement():
    ids = torch.tensor(IDS)
    assert bits_equal(_noise.gaussian(-3, ids, 2, (5, 9)), _noise.gaussian(2 ** 64 - 3, ids, 2, (5, 9)))


def test_made_on_the_device_in_one_op_and_pinned():
    # No value travels from the host (it would wait on the host every step and break capture).
    ids = torch.tensor([0, 3, 2 ** 40])
    with RecordOps() as recorder:
        z = _noise.gaussian(7, ids, 11, (3, 2))
    assert recorder.names() == {"empty", "gaussian_out"}
    # The bits are part of the contract: a seed reproduces its samples across releases and
    # devices (fastflow's own ln and cos; before 0.1.0 the noise took PyTorch's, and a 32-bit
    # key, which repeated whole noise tensors in long runs).
    want = [[-0.284210741519928, -0.9649503827095032], [2.401322841644287, 1.2486151456832886],
            [1.937009334564209, -0.6472592949867249]]
    assert z.tolist() == want


def test_any_layout_of_out_holds_the_row_major_values(backend):
    ids = torch.arange(4, device=backend)
    want = _noise.gaussian(9, ids, 1, (4, 3, 5, 6))
    out = torch.empty(4, 3, 5, 6, device=backend).to(memory_format=torch.channels_last)
    version = out._version
    fastflow._ops.gaussian_out(ids, 9, 1, out)
    assert out.is_contiguous(memory_format=torch.channels_last) and bits_equal(out, want)
    assert out._version > version   # written in place, as autograd must know


def test_opcheck_and_compile():
    ids, out = torch.tensor(IDS), torch.empty(5, 4, 3)
    torch.library.opcheck(torch.ops.fastflow.gaussian_out.default, (ids, 5, 2, out))

    def noise(ids):
        return _noise.gaussian(5, ids, 2, (5, 4, 3))

    assert bits_equal(torch.compile(noise, fullgraph=True)(ids), noise(ids))


def test_bad_input():
    out = torch.empty(3, 4)
    with pytest.raises(ValueError, match="ids must be a 1-D int64 tensor"):
        fastflow._ops.gaussian_out(torch.zeros(3), 0, 0, out)
    with pytest.raises(ValueError, match="ids must be a 1-D int64 tensor"):
        fastflow._ops.gaussian_out(torch.zeros(3, 1, dtype=torch.int64), 0, 0, out)
    with pytest.raises(ValueError, match=r"out must be a floating \[B, \.\.\.\] tensor with B = 2"):
        fastflow._ops.gaussian_out(torch.zeros(2, dtype=torch.int64), 0, 0, out)
    with pytest.raises(ValueError, match="out must be a floating"):
        fastflow._ops.gaussian_out(torch.zeros(3, dtype=torch.int64), 0, 0, out.int())
    from conftest import compiled_extension   # float8 reached the CPU kernel's dtype dispatch
    with pytest.raises(ValueError, match="out must be a floating"):
        compiled_extension().gaussian_cpu(torch.zeros(3, dtype=torch.int64), 0, 0,
                                          out.to(torch.float8_e4m3fn))
    for seed in (2 ** 63, -2 ** 63 - 1):   # _noise.gaussian maps [2**63, 2**64) to negatives
        with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*63\)"):
            fastflow._ops.gaussian_out(torch.zeros(3, dtype=torch.int64), seed, 0, out)


def test_no_two_samples_or_steps_draw_the_same_noise():
    # With one 32-bit key per (seed, id, step), 4096 ids over 64 steps held 14 pairs of
    # bit-identical noise tensors (sample 2613 at step 11 was sample 2788 at step 60), and a
    # seed was a relabelling of another's ids. The key has 64 bits now: the first elements of
    # 2^18 draws are all distinct (32-bit values would repeat about 8 times).
    ids = torch.arange(4096)
    first = torch.cat([_noise.gaussian(0, ids, step, (4096, 2)) for step in range(64)])
    assert torch.unique(first, dim=0).shape[0] == first.shape[0]
    for seed in (1, 2):   # and across seeds
        other = torch.cat([_noise.gaussian(seed, ids, step, (4096, 2)) for step in range(64)])
        assert torch.unique(torch.cat([first, other]), dim=0).shape[0] == 2 * first.shape[0]
