# QuoteWatch developer commands. `make test` is what CI (.ci/run) runs on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 9092

.DEFAULT_GOAL := help
.PHONY: help setup system-deps browser-deps test test-unit lint format bench faults soak quality broker-up broker-down demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# setup.py builds the compiled order book (src/quotewatch/domain/market/_orderbook.pyx): a change to it reinstalls.
$(STAMP): pyproject.toml setup.py src/quotewatch/domain/market/_orderbook.pyx
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (QuoteWatch needs Python 3.11)"; exit 1; }
	@if ! command -v g++ >/dev/null; then \
		echo "installing g++ with apt (the order book is compiled C++)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq g++ >/dev/null; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install quotewatch (editable) with the dev extras

system-deps:  ## check java 17+ and mvn (the local Kafka broker needs them)
	@command -v java >/dev/null || { echo "error: java not found: install a JDK 17+ (apt install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "error: mvn not found: install Maven (apt install maven)"; exit 1; }

browser-deps:  ## Debian chromium + chromium-driver for the browser tests (apt, when missing)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing chromium and chromium-driver with apt"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

test: setup system-deps browser-deps  ## the whole suite; starts a local Kafka (and MLflow) unless KAFKA_BOOTSTRAP_SERVERS is given
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: setup  ## the unit tier only (no broker)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: setup  ## ruff + mypy (disallow_untyped_defs) + import-linter (the layer rules in pyproject.toml)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy -p quotewatch
	$(BIN)/mypy tests
	$(BIN)/python -m tests.notebook_types
	$(BIN)/lint-imports

format: setup  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

bench: setup system-deps browser-deps  ## benchmarks side by side in one run -> docs/benchmarks.md
	$(BIN)/python -m tests.benchmarks $(BENCH_ARGS)

faults: setup system-deps  ## the whole fault suite (a subset runs in make test); table -> docs/faults.md
	QUOTEWATCH_FAULTS=full $(BIN)/python -m pytest tests/faults -m faults $(PYTEST_ARGS)

soak: setup system-deps  ## SOAK_MINUTES (30) of the synthetic market at SOAK_RATE (5000 upd/s), a random fault a minute -> docs/faults.md
	$(BIN)/python -m tests.faults.soak

quality: setup  ## every real capture in ../shared/data + the synthetic market, walk-forward with intervals -> docs/model-quality.md
	$(BIN)/quotewatch quality --data ../shared/data --output docs/model-quality.md $(QUALITY_ARGS)

broker-up: setup system-deps  ## start the local Kafka broker on 127.0.0.1:$(PORT) and create the topics
	$(BIN)/quotewatch broker start --port $(PORT)
	KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$(PORT) $(BIN)/quotewatch topics create

broker-down: setup  ## stop the local Kafka broker
	$(BIN)/quotewatch broker stop

demo: setup system-deps  ## the whole system locally until Ctrl-C; dashboard on http://127.0.0.1:8050
	$(BIN)/quotewatch demo $(DEMO_ARGS)

clean:  ## remove the venv and build artefacts (not the broker's data)
	rm -rf $(VENV) .build build *.egg-info .mypy_cache .ruff_cache src/quotewatch/domain/market/_orderbook.cpp src/quotewatch/domain/market/_orderbook.*.so
