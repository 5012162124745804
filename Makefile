# Set-up is part of every target: a fresh machine needs only python3 (3.11+) and make.
# torch is pinned here (not in pyproject) because on the project's build machines
# torch==2.13.0 is a CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup run test lint bench clean protos

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/moedist train

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/moe_layer.py --quick

# The control API's Python modules (moedist/control/v1/) from protos/: never edit them by hand.
protos: setup
	$(PY) protos/generate.py

clean:
	rm -rf runs
