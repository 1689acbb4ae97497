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
# uv itself lives in its own small venv, installed from hashes (.ci/uv.lock.txt); it then keeps
# .venv exactly at requirements.lock. `make lock` re-resolves after a pyproject.toml change.
UV_VENV := .cache/uv
UV := $(UV_VENV)/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_NO_CONFIG := 1

.PHONY: venv lock image cli up test fast coverage lint schemas chaos mutants bench clean

$(UV): .ci/uv.lock.txt
	test -x $(UV_VENV)/bin/python || $(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r .ci/uv.lock.txt
	touch $@

venv: $(STAMP)
$(STAMP): requirements.lock pyproject.toml $(UV)
	test -x $(PY) || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --python $(PY) --require-hashes --compile-bytecode requirements.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $@

lock: $(UV)
	$(UV) pip compile --quiet pyproject.toml --extra test --generate-hashes --universal \
		--python-version 3.11 -o requirements.lock $(LOCK_ARGS)

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
	$(PY) -m services.schemas

# A skip in `make test` is a failure: everything a test needs was installed above.
test: venv image cli lint
	SANDSTREAM_NO_SKIPS=1 $(PY) -m pytest $(PYTEST_ARGS)

fast: venv
	$(PY) -m pytest -m "not docker and not slow" tests/unit tests/integration $(PYTEST_ARGS)

# What `make fast` covers of the services (in-process code only; subprocesses are not counted).
coverage: venv
	$(PY) -m coverage run --branch --source=shared,services -m pytest -q -m "not docker and not slow" \
		tests/unit tests/integration $(PYTEST_ARGS)
	$(PY) -m coverage report --skip-covered --sort=cover $(COVERAGE_ARGS)

chaos: venv image
	$(PY) -m tests.chaos

# Mutation testing of the state fold and the outcome (about half a minute); lists the survivors.
mutants: venv
	$(VENV)/bin/mutmut run; $(VENV)/bin/mutmut results

# The hot path's figures next to their bare baselines (issue: warm pool and a lean hot path).
bench: venv image
	$(PY) bench/task_latency.py --tasks 9
	$(PY) bench/gateway_load.py
	$(PY) bench/replay.py
	$(PY) bench/drain.py --tasks 1000

clean:
	rm -rf $(VENV) $(UV_VENV) .pytest_cache .mypy_cache .ruff_cache mutants
