"""Index math past 2**31 elements: offsets and group indices must be 64-bit in every kernel.

Needs about 9 GB (two fp16 tensors of 2**31 + 2048 elements); skipped where less memory is free.
The Triton kernels are checked here on a GPU only: the interpreter would take hours.
"""
import pytest
import torch

import fastflow  # noqa: F401  (registers the ops)
from fastflow import _backends

NUMEL = 2**31 + 2048
NEEDED_BYTES = 2 * NUMEL * 2 + (1 << 30)


def _free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


@pytest.mark.large
def test_offsets_past_two_to_the_31(backend):
    if backend.type == "cpu" and _backends.select(backend) in ("triton", "reference"):
        pytest.skip("the large-index check runs on compiled kernels only")
    if _free_bytes(backend) < NEEDED_BYTES:
        pytest.skip(f"needs {NEEDED_BYTES / 2**30:.1f} GiB free")
    x = torch.ones(NUMEL, dtype=torch.float16, device=backend)
    # Two groups: the second starts past 2**30 and ends past 2**31.
    coeffs = torch.tensor([[[2.0]], [[3.0]]], device=backend)
    (out,) = torch.ops.fastflow.affine([x], coeffs)
    del x
    half = NUMEL // 2
    assert out[:half].eq(2).all().item()
    assert out[half:].eq(3).all().item()
