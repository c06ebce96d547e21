# Quick start on a fresh machine with Python 3.11+: `make run`, then `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: install
	$(PY) scripts/run

test: install
	$(PY) -m pytest

demo: install
	$(PY) scripts/demo --base-url http://$${HOST:-127.0.0.1}:$${PORT:-8000}

bench: install
	$(PY) scripts/bench_match --workers 12000

clean:
	rm -rf $(VENV) var .pytest_cache
