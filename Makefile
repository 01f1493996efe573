# make test / make demo work on a fresh machine: they create .venv and install the project if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

.PHONY: install test demo docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's local disk (pinned in pyproject.toml).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m demo demo-out

docs: $(STAMP)
	$(PY) -m testing.docs

clean:
	rm -rf demo-out bench-out .pytest_cache
