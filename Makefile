# raylane's contract with users, CI and our checks.
#   make setup       .venv with the CPU or GPU stack (idempotent)
#   make quickstart  setup + the end-to-end quickstart on a local Ray cluster
#   make test        setup + the whole test suite (slow end-to-end tests included)
#   make bench       setup + benchmarks (results go into the README by hand)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test test-fast bench clean

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/raylane quickstart

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .raylane
