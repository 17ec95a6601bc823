"""Compile fastflow's Triton kernels for a Hopper GPU (sm_90) on a machine that has none.

    python tests/hopper_codegen.py        (without TRITON_INTERPRET)

A compile-only driver tells Triton that the current device is an sm_90 GPU, and every launch
becomes a warm-up (compile, never run). So the real launchers of triton_kernels/ choose grids,
block shapes and specialisations from CPU tensors as they would from CUDA ones, and Triton's whole
pipeline runs, ptxas included. Each case prints one JSON line per kernel it compiled: registers,
stack (spills), the byte widths of its global loads and stores, and its FMA count, read from the
PTX and the cubin. tests/test_triton_codegen.py runs this and checks those figures; the GPU
sessions read the same lines to see what a kernel became.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver
from triton.runtime.jit import JITFunction

HOPPER = GPUTarget("cuda", 90, 32)


class CompileOnlyDriver(DriverBase):
    """An sm_90 device that never runs anything: enough of a driver for Triton to compile."""

    def __init__(self):
        pass

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return HOPPER

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        raise NotImplementedError("compile-only driver")

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("compile-only driver")


_compiled = []
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    _compiled.append((self.fn.__name__, kernel))
    return kernel


# Global accesses in PTX: ld.global[.nc][.v2|.v4].b32 and the like.
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def _access_bytes(ptx):
    """Sorted distinct byte widths of the global loads and of the global stores."""
    widths = {"ld": set(), "st": set()}
    for op, vec, bits in _ACCESS.findall(ptx):
        widths[op].add(int(vec or 1) * int(bits) // 8)
    return sorted(widths["ld"]), sorted(widths["st"])


def _resources(cubin):
    """(registers, stack bytes) from cuobjdump's resource report, or (None, None) without it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", report).groups()
    return int(regs), int(stack)


def _cases():
    """(name, launch) pairs covering every kernel and each branch of its specialisation."""
    from fastflow._triton import affine, conversions, embedding, noise, paths

    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16

    def streams(count, numel, dtypes):
        dtypes = dtypes if isinstance(dtypes, list) else [dtypes] * count
        return [torch.empty(numel, dtype=d) for d in dtypes]

    def run_affine(k, m, dtype, groups, n, out_dtype=None):
        math = f64 if dtype == f64 else f32
        ins = streams(k, groups * n, dtype)
        outs = streams(m, groups * n, out_dtype or ins[0].dtype)
        return lambda: affine.affine(ins, torch.empty(groups, m, k, dtype=math), outs)

    def run_dot(dtype, groups, n):
        return lambda: affine.affine_dot(streams(2, groups * n, dtype),
                                         streams(3, groups * n, dtype), groups)

    def run_sqnorm(dtype, groups, n):
        math = f64 if dtype == f64 else f32
        return lambda: affine.affine_sqnorm(streams(3, groups * n, dtype),
                                            torch.empty(groups, 1, 3, dtype=math))

    def run_sinusoid(dtype, out_dtype, half, dim, cos_first):
        return lambda: embedding.sinusoid(torch.empty(64, dtype=dtype), torch.empty(half, dtype=dtype),
                                          1.0, cos_first, torch.empty(64, dim, dtype=out_dtype))

    def run_sinusoid_backward(dtype, t_grad, freqs_grad):
        return lambda: embedding.sinusoid_backward(
            torch.empty(64, 256, dtype=dtype), torch.empty(64, dtype=dtype),
            torch.empty(128, dtype=dtype), 1.0, False, t_grad, freqs_grad)

    def run_path(path, params, dtype, time_dtype=f64, residual=False):
        return lambda: paths.path_coefficients(torch.empty(1000, dtype=time_dtype), path, params,
                                               dtype, residual)

    def run_conversion(src, dst, dtype):
        return lambda: conversions.conversion_coefficients(torch.empty(1000, 2, 2, dtype=f64), src,
                                                           dst, 1e-6, dtype)

    def run_noise(dtype, batch, n):
        return lambda: noise.gaussian(torch.empty(batch, dtype=torch.int64), 2 ** 40 + 3, 7,
                                      torch.empty(batch, n, dtype=dtype))

    return [
        # Samples of at least a block (images): coefficients once per program.
        ("affine fp32 2->2 tiled", run_affine(2, 2, f32, 4, 4096)),
        ("affine bf16 3->1 tiled", run_affine(3, 1, bf16, 4, 4096)),
        ("affine fp16 5->4 tiled", run_affine(5, 4, f16, 4, 4096)),
        ("affine fp64 2->2 tiled", run_affine(2, 2, f64, 4, 4096)),
        # The sampler's step: fp32 state and bf16 model outputs in, fp32 state out.
        ("affine fp32+bf16 3->1 tiled", lambda: affine.affine(
            streams(3, 8192, [f32, bf16, bf16]), torch.empty(2, 1, 3), streams(1, 8192, f32))),
        # Tiny samples (2-D points): coefficients gathered per element.
        ("affine fp32 2->2 gathered", run_affine(2, 2, f32, 4096, 2)),
        ("affine bf16 4->3 gathered", run_affine(4, 3, bf16, 4096, 2)),
        ("affine fp64 1->1 gathered", run_affine(1, 1, f64, 4096, 2)),
        ("dot fp32 one group per row", run_dot(f32, 4, 4096)),
        ("dot fp32 many groups per row", run_dot(f32, 4096, 2)),
        ("dot bf16 one group per row", run_dot(bf16, 4, 4096)),
        ("dot fp64 many groups per row", run_dot(f64, 4096, 2)),
        ("sqnorm fp32 one group per row", run_sqnorm(f32, 4, 4096)),
        ("sqnorm bf16 many groups per row", run_sqnorm(bf16, 4096, 2)),
        ("sqnorm fp64 one group per row", run_sqnorm(f64, 4, 4096)),
        ("sinusoid fp32 sin first", run_sinusoid(f32, f32, 128, 256, False)),
        ("sinusoid fp32->bf16 cos first, odd dim", run_sinusoid(f32, bf16, 64, 129, True)),
        ("sinusoid fp64", run_sinusoid(f64, f64, 128, 256, False)),
        ("sinusoid backward fp32 t and freqs", run_sinusoid_backward(f32, True, True)),
        ("sinusoid backward fp32 t only", run_sinusoid_backward(f32, True, False)),
        ("sinusoid backward fp64 freqs only", run_sinusoid_backward(f64, False, True)),
        ("path coefficients CondOT fp32", run_path("cond_ot", [0.0], f32)),
        ("path coefficients CondOT fp32 from fp32 times", run_path("cond_ot", [0.0], f32, f32)),
        ("path coefficients CondOT fp32 from bf16 times",
         run_path("cond_ot", [0.0], f32, torch.bfloat16)),
        ("path coefficients constant noise fp64", run_path("constant_noise", [0.5], f64)),
        ("path coefficients Polynomial fp32 (libdevice pow)", run_path("polynomial", [2.0], f32)),
        ("path coefficients Polynomial fp64 (libdevice pow, sqrt)",
         run_path("polynomial", [0.5], f64)),
        ("path coefficients Cosine fp32 (libdevice sin, cos)", run_path("cosine", [], f32)),
        ("path coefficients LinearVP fp64", run_path("linear_vp", [], f64)),
        ("path coefficients VP fp32 (libdevice exp)", run_path("vp", [0.1, 20.0], f32)),
        ("path coefficients Schrodinger bridge fp32", run_path("schrodinger_bridge", [1.0], f32)),
        ("path residual rows CondOT fp32", run_path("cond_ot", [0.0], f32, f32, True)),
        ("path residual rows Schrodinger bridge fp64",
         run_path("schrodinger_bridge", [1.0], f64, f32, True)),
        ("conversion epsilon to velocity fp32", run_conversion("epsilon", "velocity", f32)),
        ("conversion velocity to score fp64", run_conversion("velocity", "score", f64)),
        ("conversion score to data fp32", run_conversion("score", "data", f32)),
        ("noise fp32 image samples", run_noise(f32, 8, 4096)),
        ("noise bf16 2-D points", run_noise(bf16, 4096, 2)),
        ("noise fp64 odd samples", run_noise(f64, 16, 1000)),
    ]


def main():
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = _compile_only
    for case, launch in _cases():
        del _compiled[:]
        launch()
        for kernel_name, kernel in _compiled:
            ptx = kernel.asm["ptx"]
            loads, stores = _access_bytes(ptx)
            regs, stack = _resources(kernel.asm["cubin"])
            print(json.dumps({
                "case": case, "kernel": kernel_name, "triton": triton.__version__,
                "num_warps": kernel.metadata.num_warps, "registers": regs, "stack_bytes": stack,
                "load_bytes": loads, "store_bytes": stores,
                "fma": len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f(?:32|64)\b", ptx)),
                "inexact_div": len(re.findall(r"\bdiv\.(?:approx|full)\.", ptx)),
            }), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("hopper_codegen.py compiles for a GPU: run it without TRITON_INTERPRET=1")
    main()
