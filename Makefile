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
	@echo "make check  ruff format --check, ruff check, mypy --strict"
	@echo "Phase 1 (nginx, docs/nginx.md): make warmup | cache-export | cache-copy | cache-import | all"
	@echo "            variables: COMPOSE_PROJECT_NAME CACHE_VOLUME_NAME EXPORT_FILE REMOTE_HOST REMOTE_PATH"
	@echo "            CACHE_DIR=/path uses a host directory instead of the Docker volume"

# The models directory is the repo's (where $(MODEL) is prepared); the store is the default
# one in the per-user data directory (~/.local/share/comeapi/cache.db, docs/cache.md).
run: install $(MODEL)
	$(BIN)/comeapi up --model-dir models

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

# llama-cpp-python compiles llama.cpp from its sdist (about 8 minutes on 2 cores), once per
# version and build flags, into a wheelhouse under ~/.cache/comeapi that every clone shares.
# The default flags make a portable x86-64-v3 build (AVX2, FMA, F16C) rather than a native
# one: a native build on a CPU with Intel AMX crashes in virtual machines that do not enable
# AMX (SIGSEGV at ldtilecfg in ggml_backend_amx_mul_mat, seen on this project's CI kind of
# machine), and a wheel or image built on one machine must run on another. Override for
# speed or a GPU, e.g. LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON" or "-DGGML_CUDA=on" (README, GPU).
LLAMA_CPP        := $(shell sed -n 's/.*"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# pip shows a build backend's output only with -v: the cmake/compiler lines ([ 42%] Building
# ...) are the progress of those 8 minutes.
LLAMA_BUILD_VERBOSITY ?= -v
WHEELHOUSE       ?= $(HOME)/.cache/comeapi/wheels/$(shell printf '%s %s' '$(LLAMA_CPP)' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

$(WHEELHOUSE)/.built: | $(BIN)/python
	@echo "Building $(LLAMA_CPP) with CMAKE_ARGS=\"$(LLAMA_CMAKE_ARGS)\" (about 8 minutes on 2 cores, once)"
	@echo "(the compiler's progress follows; LLAMA_BUILD_VERBOSITY= hides it)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel $(LLAMA_BUILD_VERBOSITY) \
		--no-cache-dir --no-deps --wheel-dir $(WHEELHOUSE) '$(LLAMA_CPP)'
	touch $@

$(VENV)/.installed: pyproject.toml $(WHEELHOUSE)/.built | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall $(WHEELHOUSE)/*.whl
	$(BIN)/python -m pip install --quiet --find-links $(WHEELHOUSE) -e '.[llama]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[llama,dev]'
	touch $@

$(MODEL): | $(VENV)/.installed
	$(BIN)/comeapi models prepare --model-dir models

# nginx (with njs, for the cache key) and wrk from Debian's packages: the nginx deployment
# tests and the benchmarks use them.
NGINX_JS_MODULE ?= /usr/lib/nginx/modules/ngx_http_js_module.so
system-deps:
	@if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null || [ ! -f $(NGINX_JS_MODULE) ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq nginx libnginx-mod-http-js wrk >/dev/null; \
		else echo "missing: sudo apt-get install nginx libnginx-mod-http-js wrk"; exit 1; fi; \
	fi

# --- Phase 1: nginx's cache (docs/nginx.md) ------------------------------------------------
# Docker mode (default): the cache is the named volume $(CACHE_VOLUME_NAME) of the compose
# project in deploy/nginx. Host mode: set CACHE_DIR to nginx's proxy_cache_path directory.
# cache-import runs on REMOTE_HOST when it is set, else on this machine; either way before
# nginx starts on that cache.
COMPOSE_PROJECT_NAME ?= $(shell basename $(CURDIR))
CACHE_VOLUME_NAME    ?= $(COMPOSE_PROJECT_NAME)_nginx_cache_data
EXPORT_FILE          ?= nginx_cache.tar.gz
REMOTE_HOST          ?=
REMOTE_PATH          ?= /tmp/nginx_cache_import
CACHE_DIR            ?=
CACHE_OWNER          ?=
NGINX_PID_FILE       ?=
NGINX_CONF_DIR       ?= /etc/nginx/comeapi
WARMUP_URL           ?= http://127.0.0.1:8001
COMEAPI_PROMPTS      ?=
COMPOSE_CMD          ?= $(shell docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose)
COMPOSE               = $(COMPOSE_CMD) -f deploy/nginx/docker-compose.yml -p $(COMPOSE_PROJECT_NAME)
CACHE_SH             := deploy/nginx/cache.sh
CACHE_WHERE           = $(if $(CACHE_DIR),--dir $(CACHE_DIR),--volume $(CACHE_VOLUME_NAME))
CACHE_FLAGS           = $(CACHE_WHERE) --file $(EXPORT_FILE) $(if $(CACHE_OWNER),--owner $(CACHE_OWNER))
WARMUP_PYTHON        ?= $(if $(CACHE_DIR),$(BIN)/python,$(COMPOSE) exec -T comeapi python)

.PHONY: warmup cache-export cache-copy cache-import all nginx-config

all: warmup cache-export cache-copy cache-import
	@echo "All cache management tasks completed."

warmup: $(if $(CACHE_DIR),install)
	@echo "Warming up nginx's cache through $(WARMUP_URL)..."
	@COMEAPI_PYTHON="$(WARMUP_PYTHON)" COMEAPI_PROMPTS="$(COMEAPI_PROMPTS)" \
		deploy/nginx/warmup.sh --url $(WARMUP_URL)

cache-export:
	@$(CACHE_SH) export $(CACHE_FLAGS)

cache-copy:
	@$(CACHE_SH) copy --file $(EXPORT_FILE) --remote "$(REMOTE_HOST)" --remote-path $(REMOTE_PATH)

cache-import:
	@$(CACHE_SH) $(if $(REMOTE_HOST),remote-import --remote "$(REMOTE_HOST)" --remote-path $(REMOTE_PATH),import $(if $(NGINX_PID_FILE),--pid-file $(NGINX_PID_FILE))) $(CACHE_FLAGS)

# Host mode: render deploy/nginx into NGINX_CONF_DIR (settings from the environment).
nginx-config:
	@deploy/nginx/render.sh $(NGINX_CONF_DIR)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
