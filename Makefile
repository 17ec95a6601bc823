# The two commands of the README: `make bench` runs the benchmarks, `make test` runs the tests.
# Both set up everything first on a fresh machine (pinned torch, the tools, the extension build).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TOOLS = triton ninja pybind11 numpy pytest hypothesis matplotlib

.PHONY: install test bench clean

install:
	@# Keep a torch that is already there (GPU machines bring their own CUDA build); otherwise
	@# pin the CPU release, since an unpinned `pip install torch` pulls a multi-GB CUDA build.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q $(TOOLS)
	$(PYTHON) -m pip install -q --no-build-isolation -e .
	$(PYTHON) -c "import fastflow; [print(s) for s in fastflow.backends().values()]"

test: install
	$(PYTHON) -m pytest tests -q -ra

bench: install
	$(PYTHON) benchmarks/run_all.py

clean:
	rm -rf build fastflow/_C*.so *.egg-info
