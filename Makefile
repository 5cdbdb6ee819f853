# Two entry points for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first and pinned, so no dependency can pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: install system-deps quickstart test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/lmforge quickstart --out_dir runs/quickstart

# The real components the serving tests drive (a Redis server for the response cache, a headless browser for the
# web chat page), from Debian when apt is there and we may use it; without them those tests skip and say why.
system-deps:
	@if command -v redis-server >/dev/null && command -v chromium >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		  --no-install-recommends redis-server chromium >/dev/null 2>&1; } || \
		echo "make: could not install redis-server and chromium with apt-get; their tests will skip"; \
	else echo "make: no apt-get as root here: the redis-server and chromium tests will skip"; fi

test: install system-deps
	$(PY) -m pytest -q --timeout 900

clean:
	rm -rf $(VENV) runs .pytest_cache
