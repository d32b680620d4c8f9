# comeapi: `make run` starts the service, `make test` runs every check. Both install what is
# missing first (virtualenv, package, bundled model, system packages), so a fresh clone needs
# nothing else.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := models/gemma-3-270m-q4_k_m.gguf

.DEFAULT_GOAL := help
.PHONY: help run test check lint typecheck unit install install-dev model system-deps clean

help:
	@echo "make run    install what is missing, prepare the model and cache, start comeapi"
	@echo "make test   install test dependencies, run ruff, mypy and the whole test suite"

run: install $(MODEL)
	$(BIN)/comeapi up

test: install-dev $(MODEL) system-deps check unit

check: install-dev
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

unit: install-dev $(MODEL)
	$(BIN)/python -m pytest

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# llama-cpp-python compiles llama.cpp (about 8 minutes on 2 cores); pip caches the wheel.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[llama]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[llama,dev]'
	touch $@

$(MODEL): | $(VENV)/.installed
	$(BIN)/comeapi models prepare --model-dir models

# nginx and wrk from Debian's packages: the nginx deployment tests and the benchmarks use them.
system-deps:
	@if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq nginx wrk >/dev/null; \
		else echo "nginx and wrk are missing: sudo apt-get install nginx wrk"; exit 1; fi; \
	fi

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
