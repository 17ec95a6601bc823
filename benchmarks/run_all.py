"""Run every benchmark of the package: `make bench`.

Each script runs in its own process so environment settings apply to it alone. On CPU every
script runs twice, with the default allocator and with THP_MEM_ALLOC_ENABLE=1, because
fresh-output figures there depend on page faults (DESIGN.md section 9). It takes no options:
run a script alone to narrow it (--device, --sizes, --dtypes).
"""
import argparse
import glob
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    allocators = [{}] if torch.cuda.is_available() else [{}, {"THP_MEM_ALLOC_ENABLE": "1"}]
    failed = []
    for script in scripts:
        for extra_env in allocators:
            label = " ".join([os.path.basename(script)] + [f"{k}={v}" for k, v in extra_env.items()])
            print(f"\n=== {label}", flush=True)
            if subprocess.call([sys.executable, script], env={**os.environ, **extra_env}) != 0:
                failed.append(label)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
