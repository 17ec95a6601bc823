"""Build fastflow: the pure-Python package plus the compiled extension fastflow._C.

Environment switches:
  FASTFLOW_SKIP_EXTENSION=1     install the pure-Python package only (reference on CPU, Triton on GPU)
  FASTFLOW_BUILD_CUDA=auto|0|1  compile csrc/*.cu; auto builds them when torch has CUDA, a CUDA
                                toolkit is found and there are GPUs to compile for (visible ones,
                                or TORCH_CUDA_ARCH_LIST), 1 insists (and fails without them), 0
                                never does

Install torch first, then: pip install --no-build-isolation -e .
"""
import glob
import os
import re
import subprocess

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Every package under fastflow/, plus the Triton kernels, installed as fastflow._triton.
PACKAGES = find_packages(include=["fastflow", "fastflow.*"]) + ["fastflow._triton"]
PACKAGE_DIR = {"fastflow._triton": "triton_kernels"}


def _nvcc_release(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found[1]}.{found[2]}" if found else None


def _want_cuda(torch_cuda_version, cuda_home, visible_gpus):
    mode = os.environ.get("FASTFLOW_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTFLOW_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problem = None
    if torch_cuda_version is None or cuda_home is None:
        problem = ("torch has no CUDA or no CUDA toolkit was found "
                   f"(torch.version.cuda={torch_cuda_version}, CUDA_HOME={cuda_home})")
    else:
        # torch refuses to build extensions with a toolkit of another CUDA major version.
        release = _nvcc_release(cuda_home)
        if release is None or release.split(".")[0] != torch_cuda_version.split(".")[0]:
            problem = (f"the CUDA toolkit at {cuda_home} (nvcc {release}) does not match the CUDA "
                       f"{torch_cuda_version} that torch was built with")
        elif not visible_gpus and os.environ.get("TORCH_CUDA_ARCH_LIST", "") in ("", "native"):
            # Without a list, cpp_extension compiles for the GPUs visible here; with none (a
            # container build, a CPU machine with the toolkit) it fails with an IndexError.
            problem = ("no GPU is visible to compile for: set TORCH_CUDA_ARCH_LIST to the GPUs' "
                       "compute capabilities (9.0, say)")
    if problem is None:
        return True
    if mode == "1":
        raise SystemExit(f"FASTFLOW_BUILD_CUDA=1 but {problem}")
    if torch_cuda_version is not None:
        print(f"fastflow: building without the CUDA kernels: {problem}")
    return False


def _extensions():
    if os.environ.get("FASTFLOW_SKIP_EXTENSION", "0") == "1":
        return [], {}
    try:
        import torch
    except ImportError as exc:
        # pip's default build runs in an isolated environment without the installed torch.
        raise SystemExit(
            f"fastflow: the extension fastflow._C compiles against the installed torch, which this "
            f"build cannot import ({exc}). Install torch first, then build without pip's build "
            f"isolation: pip install --no-build-isolation . (or set FASTFLOW_SKIP_EXTENSION=1 for "
            f"the pure-Python package).") from None
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # -ffp-contract=off: no fused multiply-add, so CPU results equal eager PyTorch bit for bit.
    # No -march flags: the wheel must run on any x86-64 or aarch64 machine. No -std flag either:
    # unless one is given, cpp_extension adds (to g++ and nvcc) the standard that the installed
    # torch's headers are written for; C++20 in recent releases, where C++17 warns or fails.
    # -g0: Python's default -g makes the many kernel instantiations slow to build and 30 MB big.
    # -fno-math-errno: sqrt may then be one instruction, so loops that take square roots
    # vectorise (no branch to set errno on negative arguments); the values are the same.
    cxx = ["-O3", "-g0", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]
    extra = {"cxx": cxx}
    sources = list(cpu_sources)
    ext_type = cpp_extension.CppExtension
    if cuda_sources and _want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME,
                                   torch.cuda.device_count()):
        sources += cuda_sources
        ext_type = cpp_extension.CUDAExtension
        cxx.append("-DFASTFLOW_WITH_CUDA")
        # Target GPUs come from TORCH_CUDA_ARCH_LIST, else from the GPUs visible at build time.
        extra["nvcc"] = ["-O3", "-DFASTFLOW_WITH_CUDA", "--expt-relaxed-constexpr"]
    ext = ext_type("fastflow._C", sources, extra_compile_args=extra,
                   extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


def _licence(setuptools_version):
    """The licence in the form this setuptools takes: an SPDX expression from setuptools 77 (which
    deprecates the older free-text field and, from 2027-02-18, refuses pyproject's table form of
    it), the free-text field before (which refuses the expression). Builds without isolation use
    whatever setuptools the machine has."""
    major = int(re.match(r"\d+", setuptools_version).group())
    return {"license_expression" if major >= 77 else "license": "Apache-2.0"}


ext_modules, cmdclass = _extensions()
setup(
    **_licence(setuptools.__version__),
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
