# The one entry point: `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
BACKEND_PORT ?= 8001

.PHONY: install run test unit lint format typecheck bench real-backend clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Start the bundled simulated backend and the gateway in front of it (Ctrl-C stops both).
run: install
	$(BIN)/python -m bench.demo --port $(PORT) --backend-port $(BACKEND_PORT)

## Lint, type-check, then every test (the real llama.cpp server is built first if needed).
# INFERENCE_PROXY_SKIP_REAL_BACKEND=1 skips that build and its tests on a developer machine;
# with CI set it is always built and run.
ifeq ($(INFERENCE_PROXY_SKIP_REAL_BACKEND)$(CI),1)
test: install lint typecheck
else
test: install lint typecheck real-backend
endif
	@command -v curl >/dev/null || { echo "installing curl (the README's examples are tested with it)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
	$(BIN)/python -m pytest

unit: install
	$(BIN)/python -m pytest tests/unit

lint: install
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench

format: install
	$(BIN)/ruff format proxy tests bench
	$(BIN)/ruff check --fix proxy tests bench

typecheck: install
	$(BIN)/mypy

## The benchmark suite: direct vs nginx vs inference-proxy (installs wrk and nginx if missing).
bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	bash bench/ensure_tools.sh
	$(BIN)/python -m bench.run

## Build llama.cpp's llama-server and the Gemma 3 270M model once (a no-op when up to date).
real-backend:
	PYTHON=$(PYTHON) bash tests/real_backend/build.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
