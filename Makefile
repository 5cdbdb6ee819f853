# Two entry points for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first and pinned, so no dependency can pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: install quickstart test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/lmforge quickstart --out_dir runs/quickstart

test: install
	$(PY) -m pytest -q --timeout 900

clean:
	rm -rf $(VENV) runs .pytest_cache
