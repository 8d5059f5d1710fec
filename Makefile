# The one entry point: `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
BACKEND_PORT ?= 8001

.PHONY: install run test unit lint format typecheck bench bench-fleet bench-workers bench-growth soak real-backend lock lowest clean
.PHONY: install-service uninstall-service

# Dependencies come from the lock files in requirements/ (exact versions and hashes, made by
# `make lock`), so a fresh machine installs what was tested. The package itself is installed
# editable without its own dependency resolution (they are all in the lock already) and without
# build isolation (setuptools, the build backend, is in the lock too).
PIP_LOCKED := $(BIN)/python -m pip install --quiet --require-hashes --no-deps
PIP_SELF   := $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .

$(STAMP): requirements/test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) -r requirements/test.txt
	$(PIP_SELF)
	$(BIN)/python -m pip check
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
	@command -v systemd-analyze >/dev/null || { echo "installing systemd (systemd-analyze checks the unit)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; }
	@# The tests start their own redis-server on a free port; the package's own service (which
	@# apt may start where no policy-rc.d forbids it) is stopped by its pid file, never relied on.
	@command -v redis-server >/dev/null || { echo "installing redis-server (the key store's tests run their own)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  service redis-server stop >/dev/null 2>&1 || true; }
	@# The dashboard and alert rules are tested on a prometheus the tests start on a free port;
	@# the package's own service (and its recommended node exporter, not installed) is stopped
	@# and disabled, never relied on.
	@command -v prometheus >/dev/null || { echo "installing prometheus (the dashboard's tests run their own)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus >/dev/null; \
	  service prometheus stop >/dev/null 2>&1 || true; systemctl disable prometheus >/dev/null 2>&1 || true; }
	@command -v chromium >/dev/null || { echo "installing chromium (a page on another origin streams through the gateway: CORS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	$(BIN)/python -m pytest

## The soak test at full length: 100,000 mixed requests (make test runs 20,000).
soak: install
	SOAK_REQUESTS=100000 $(BIN)/python -m pytest -s tests/integration/test_soak.py -p no:timeout

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

## The benchmark suite: direct vs nginx vs the aiohttp floor vs inference-proxy (~8 minutes;
## installs wrk and nginx if missing).
bench: install
	$(PIP_LOCKED) -r requirements/bench.txt
	bash bench/ensure_tools.sh
	$(BIN)/python -m bench.run

## Issue 12's growth sweeps: body size, stream length, concurrency (~5 minutes), into RESULTS.md.
bench-growth: install
	$(PIP_LOCKED) -r requirements/bench.txt
	bash bench/ensure_tools.sh
	$(BIN)/python -m bench.growth --results-md

## Issue 9's fleet figures: a kill under load, a prefix KV cache, routing's CPU cost (~4 minutes).
bench-fleet: install
	bash bench/ensure_tools.sh
	$(BIN)/python -m bench.fleet

## Issue 10's figures: req/s and p99 through 1 worker against 2, the /metrics scrape (~4 minutes).
bench-workers: install
	bash bench/ensure_tools.sh
	$(BIN)/python -m bench.workers

## Build llama.cpp's llama-server and the Gemma 3 270M model once (a no-op when up to date).
real-backend:
	PYTHON=$(PYTHON) bash tests/real_backend/build.sh

## Refresh the lock files on purpose: every runtime, test and bench dependency, pinned with hashes.
# Resolved against PyPI itself (not this machine's local mirrors) so that each pin carries the
# hashes of every file PyPI has for it; runtime.txt and bench.txt are constrained by test.txt,
# so the three agree on every version they share.
LOCK_VENV := .cache/lock-venv
PIP_COMPILE := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(LOCK_VENV)/bin/pip-compile --quiet \
	--generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --index-url https://pypi.org/simple
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet pip-tools==7.6.2
	$(PIP_COMPILE) $(LOCK_ARGS) --extra test --build-deps-for editable -o requirements/test.txt pyproject.toml
	$(PIP_COMPILE) -c requirements/test.txt -o requirements/runtime.txt pyproject.toml
	$(PIP_COMPILE) -c requirements/test.txt --extra test --extra bench --build-deps-for editable \
	  -o requirements/bench.txt pyproject.toml

## Prove the lower bounds in pyproject.toml: the oldest allowed release of every runtime dependency
# (uv's lowest-direct resolution), with the locked test tools, must pass the suite.
LOWEST := .cache/lowest
lowest:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet pip-tools==7.6.2 uv==0.13.8
	mkdir -p $(LOWEST)
	PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/uv pip compile --quiet --resolution lowest-direct \
	  --index-url https://pypi.org/simple --python-version 3.11 pyproject.toml -o $(LOWEST)/runtime.txt
	grep -E '^(pytest|pytest-aiohttp|pytest-asyncio|pytest-timeout|hypothesis|openai|anthropic|google-genai|mlflow-skinny|py-spy|trustme)==' \
	  requirements/test.txt | cut -d' ' -f1 > $(LOWEST)/tools.txt
	$(LOCK_VENV)/bin/uv venv --quiet --allow-existing -p $(PYTHON) $(LOWEST)/venv
	PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/uv pip install --quiet --python $(LOWEST)/venv/bin/python \
	  --index-url https://pypi.org/simple -r $(LOWEST)/runtime.txt -r $(LOWEST)/tools.txt
	$(LOCK_VENV)/bin/uv pip install --quiet --python $(LOWEST)/venv/bin/python --no-deps -e .
	INFERENCE_PROXY_SKIP_REAL_BACKEND=1 $(LOWEST)/venv/bin/python -m pytest -q -m "not real_backend" \
	  --ignore=tests/integration/test_soak.py

## The gateway as a systemd service, as root: README "Running it as a service" lists each step.
# DESTDIR=DIR installs into a scratch tree instead (no user, no ownership, no systemctl).
install-service: install
	DESTDIR="$(DESTDIR)" PYTHON="$(PYTHON)" BUILD_PYTHON="$(CURDIR)/$(BIN)/python" bash systemd/install.sh install

## Stop and remove the service and /opt/inference-proxy; keeps /etc/inference-proxy and the user.
uninstall-service:
	DESTDIR="$(DESTDIR)" bash systemd/install.sh uninstall

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
