# The two commands of the README: `make bench` runs the benchmarks, `make test` runs the tests.
# Both set up everything first on a fresh machine (pinned torch, the tools, the extension build).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# The build requirements of pyproject.toml (pip install --no-build-isolation uses these), then the
# tools of the tests and benchmarks.
TOOLS = "setuptools>=64" wheel ninja pybind11 triton numpy pytest hypothesis matplotlib
# Libraries the tests and benchmarks compare against (diffusers' schedules, scheduler and
# embeddings; torchdiffeq's fixed-grid solvers; flow_matching's ODESolver; torchcfm, whose own
# tests run against fastflow.compat). Installed --no-deps so that they can never replace the
# torch above; PEER_NEEDS is what they import (none of it pulls torch), with diffusers' own
# bounds, scipy for the beta sigmas, POT for torchcfm's OT plan, tqdm for flow_matching's solvers.
PEERS = diffusers==0.42.1 torchdiffeq==0.2.5 flow_matching==1.0.10 torchcfm==1.0.7
PEER_NEEDS = "huggingface_hub>=1.32,<3" "safetensors>=0.8" importlib_metadata regex requests filelock Pillow scipy pot tqdm

# The GPU machines lent to sessions have no network and their own torch, Triton and Python 3.12:
# .ci/gpu takes the peers it compares with from these wheels (carried in .whl/). torchcfm is left
# out: its OT plan needs POT, a 33 MB wheel, and its drop-in has no GPU-specific path.
GPU_PEERS = diffusers==0.42.1 flow_matching==1.0.10
GPU_PLATFORMS = --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

# The oldest Triton the kernels support, the GPU machines' own: its language differs (3.6 compiles a
# float's -x as 0 - x, say), so the Triton tests run under it too, from a wheel that shadows the
# installed Triton on PYTHONPATH (a venv would not see this environment's torch).
TRITON_OLDEST ?= 3.6.0

.PHONY: install test test-triton-oldest bench gpu-wheels clean

install:
	@# Keep a torch that is already there (GPU machines bring their own CUDA build); otherwise
	@# pin the CPU release, since an unpinned `pip install torch` pulls a multi-GB CUDA build.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q $(TOOLS)
	$(PYTHON) -m pip install -q $(PEER_NEEDS)
	$(PYTHON) -m pip install -q --no-deps $(PEERS)
	$(PYTHON) -m pip install -q --no-build-isolation -e .
	$(PYTHON) -c "import fastflow; [print(s) for s in fastflow.backends().values()]"

test: install
	$(PYTHON) -m pytest tests -q -ra

test-triton-oldest:   # after `make test` (or `make install`), as .ci/run calls it
	$(PYTHON) -m pip install -q --no-deps --upgrade --target .triton-oldest "triton==$(TRITON_OLDEST)"
	PYTHONPATH=.triton-oldest $(PYTHON) -c "import triton; assert triton.__version__ == '$(TRITON_OLDEST)', triton.__version__"
	PYTHONPATH=.triton-oldest $(PYTHON) -m pytest tests -q -ra -k triton

bench: install
	$(PYTHON) benchmarks/run_all.py

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: $(GPU_PLATFORMS) -d .whl $(GPU_PEERS)

clean:
	rm -rf build fastflow/_C*.so *.egg-info .triton-oldest
