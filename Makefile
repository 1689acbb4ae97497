# Sandstream: every target does the set-up it needs and skips work already done.
#   make up      run the whole system on this machine (foreground; Ctrl-C stops it)
#   make test    lint, type-check, then the whole test suite (real NATS, Docker, CLI)
#   make fast    the quick inner loop: unit tests and NATS-only integration tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv image cli up test fast lint schemas chaos bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

image:
	bash .ci/image.sh

cli:
	bash tests/fakes/claude_cli.sh >/dev/null

up: venv image
	$(VENV)/bin/sandstream up

lint: venv
	$(VENV)/bin/ruff check shared services tests bench
	$(VENV)/bin/ruff format --check shared services tests bench
	$(VENV)/bin/mypy

schemas: venv
	$(PY) -m shared.schemas

test: venv image cli lint
	$(PY) -m pytest $(PYTEST_ARGS)

fast: venv
	$(PY) -m pytest -m "not docker and not slow" tests/unit tests/integration $(PYTEST_ARGS)

chaos: venv image
	$(PY) -m tests.chaos

bench: venv
	$(PY) bench/gateway_load.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
