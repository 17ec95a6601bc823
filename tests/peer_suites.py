"""Run a peer library's own test files against fastflow's drop-in modules.

The peer's source distribution is fetched from PyPI at test time (``pip download --no-binary
:all: --no-deps``) and unpacked into a cache (``$FASTFLOW_PEER_CACHE``, default
``~/.cache/fastflow/peers``); none of its code is committed here. Its test files then run
unmodified, in a fresh pytest process, with a plugin that puts fastflow's module in
``sys.modules`` under the peer's module name before anything imports it, and prints a marker
line that proves the redirection happened.
"""
import os
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("FASTFLOW_PEER_CACHE", Path.home() / ".cache" / "fastflow" / "peers"))
MARKER = "fastflow redirect active:"


@dataclass
class SuiteResult:
    passed: int
    failed: int
    errors: int
    skipped: int
    output: str


def fetch(package, version):
    """The unpacked sdist of package==version; skips the test when it cannot be downloaded."""
    root = CACHE / f"{package}-{version}"
    if not root.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               "--no-binary", ":all:", "-d", str(CACHE), f"{package}=={version}"],
                              capture_output=True, text=True)
        archives = sorted(CACHE.glob(f"{package.replace('-', '_')}-{version}.tar.gz")) + sorted(
            CACHE.glob(f"{package}-{version}.tar.gz"))
        if done.returncode != 0 or not archives:
            pytest.skip(f"cannot download the {package}=={version} sdist: {done.stderr[-300:]}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(CACHE, filter="data")
        unpacked = CACHE / archives[0].name[:-len(".tar.gz")]
        if unpacked != root:
            unpacked.rename(root)
    return root


def run(test_files, redirects, tmp_path, extra_args=()):
    """Run the given test files with `redirects` ({peer module: fastflow module}) in place."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "_fastflow_redirect.py").write_text(textwrap.dedent(f"""
        import importlib
        import sys

        REDIRECTS = {dict(redirects)!r}
        for name, target in REDIRECTS.items():
            sys.modules[name] = importlib.import_module(target)
        for name, target in REDIRECTS.items():
            assert importlib.import_module(name).__name__ == target, name
        print({MARKER!r}, sorted(REDIRECTS), flush=True)
    """))
    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "_fastflow_redirect", "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}", "--rootdir", str(tmp_path), *extra_args,
         *[str(f) for f in test_files]],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert MARKER in output, f"the redirection plugin did not run:\n{output[-3000:]}"
    if not report.exists():
        raise AssertionError(f"the peer suite did not run:\n{output[-3000:]}")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return SuiteResult(passed=counts["tests"] - counts["failures"] - counts["errors"]
                       - counts["skipped"], failed=counts["failures"], errors=counts["errors"],
                       skipped=counts["skipped"], output=output)
