"""The source distribution and the build script: what `pip install fastflow-*.tar.gz` (or a wheel
built from the sdist) needs, and what a build without torch says."""
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")),
                                reason="needs the source tree (setup.py beside tests/)")


def _source_copy(tmp_path):
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "_triton", "build")
    for folder in ("fastflow", "triton_kernels", "csrc", "tests"):
        shutil.copytree(os.path.join(ROOT, folder), source / folder, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), source / name)
    return source


def test_the_sdist_holds_what_the_build_and_the_tests_need(tmp_path):
    # setuptools puts the sources named in setup.py into the sdist, not the headers they include
    # nor the .cu files of a CPU build: a wheel built from the sdist failed at
    # `#include "affine.h"`. Nor tests/conftest.py and its helpers.
    source = _source_copy(tmp_path)
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=source,
        env={**os.environ, "FASTFLOW_SKIP_EXTENSION": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    (sdist,) = (tmp_path / "dist").glob("fastflow-*.tar.gz")
    with tarfile.open(sdist) as archive:
        held = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {os.path.relpath(path, source) for pattern in
              ("csrc/*", "triton_kernels/*.py", "fastflow/**/*.py", "tests/*.py")
              for path in glob.glob(str(source / pattern), recursive=True)}
    wanted |= {"setup.py", "pyproject.toml", "README.md", "LICENSE"}
    assert wanted - held == set()


def test_a_build_without_torch_says_how_to_build(tmp_path):
    # pip's default isolated build (`pip install .`, `pip install fastflow-*.tar.gz`) hides the
    # installed torch: the build must say to use --no-build-isolation, not end in a traceback.
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), "
            "{'__file__': 'setup.py', '__name__': '__main__'})")
    env = {k: v for k, v in os.environ.items() if k != "FASTFLOW_SKIP_EXTENSION"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--no-build-isolation" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def _setup_functions():
    """setup.py's imports and functions, without the build that its last lines run."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    tree.body = [node for node in tree.body
                 if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    namespace = {}
    exec(compile(tree, "setup.py", "exec"), namespace)
    return namespace


def test_a_cuda_build_with_no_gpu_to_compile_for_leaves_the_cuda_kernels_out(tmp_path, monkeypatch):
    # cpp_extension compiles for the GPUs visible at build time unless TORCH_CUDA_ARCH_LIST names
    # some: with a CUDA torch and a toolkit but no GPU (a container build), the automatic build
    # ended in an IndexError inside torch.
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    want_cuda = _setup_functions()["_want_cuda"]
    monkeypatch.setenv("FASTFLOW_BUILD_CUDA", "auto")
    for arch_list in ("", "native", "9.0"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
        if want_cuda("13.2", str(tmp_path), torch.cuda.device_count()):
            assert cpp_extension._get_cuda_arch_flags()   # what the CUDA build will ask torch
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    assert not want_cuda("13.2", str(tmp_path), 0)
    assert want_cuda("13.2", str(tmp_path), 1)
    monkeypatch.setenv("FASTFLOW_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="TORCH_CUDA_ARCH_LIST"):
        want_cuda("13.2", str(tmp_path), 0)


def test_the_readme_install_names_every_build_requirement():
    # `pip install --no-build-isolation` builds with what is installed: a Python 3.12 venv has no
    # setuptools, so the README's install lines must name every [build-system] requirement.
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Install\n+```bash\n(.*?)```", text, re.S).group(1)
    installed = set()
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if words[:2] == ["pip", "install"]:
            installed |= {re.split(r"[<>=!~\[ ]", w.strip("'\""))[0].lower() for w in words[2:]
                          if not w.startswith("-") and w != "."}
    missing = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in requires} - installed
    assert missing == set(), f"README's Install section does not install {sorted(missing)}"


def test_the_wheel_holds_every_module(tmp_path):
    # A plain (not editable) install has only the packages setup.py names: fastflow.compat was
    # missing from them, so `from fastflow.compat.torchcfm import ...` failed after `pip install .`
    source = _source_copy(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheel"), str(source)],
        env={**os.environ, "FASTFLOW_SKIP_EXTENSION": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("fastflow-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    modules = {os.path.join("fastflow", os.path.relpath(path, source / "fastflow"))
               for path in glob.glob(str(source / "fastflow" / "**" / "*.py"), recursive=True)}
    modules |= {os.path.join("fastflow", "_triton", os.path.basename(path))
                for path in glob.glob(str(source / "triton_kernels" / "*.py"))}
    assert modules - held == set()
    # The licence travels in the metadata, in the form this setuptools writes.
    (metadata,) = [name for name in held if name.endswith(".dist-info/METADATA")]
    fields = zipfile.ZipFile(wheel).read(metadata).decode()
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", fields, re.M), fields


def test_the_licence_takes_the_form_the_setuptools_takes():
    # setuptools 77 deprecates the free-text licence (pyproject's table form is refused from
    # 2027-02-18) for an SPDX expression, which setuptools before 77 refuses.
    licence = _setup_functions()["_licence"]
    assert licence("84.2.1") == {"license_expression": "Apache-2.0"}
    assert licence("77.0.0") == {"license_expression": "Apache-2.0"}
    assert licence("70.3.0.post1") == {"license": "Apache-2.0"}
