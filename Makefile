# The two set-up commands of the README: `make run` and `make test`.
# Every CBIR_* variable in the environment (or on the make command line) reaches the service.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATASETS := $(abspath ../shared/datasets)

# Read MNIST from the shared datasets folder when there is one; elsewhere it is downloaded.
ifneq ($(wildcard $(SHARED_DATASETS)/mnist),)
export CBIR_DATASETS_DIR ?= $(SHARED_DATASETS)
endif

.PHONY: run serve demo test check lint format clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e .
	touch $@

$(BIN)/.installed-dev: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(BIN)/.installed $@

run: $(BIN)/.installed  ## build the demo collection if missing, then serve on CBIR_HOST:CBIR_PORT
	$(BIN)/cbir demo
	exec $(BIN)/cbir serve

serve: $(BIN)/.installed  ## serve without building the demo
	exec $(BIN)/cbir serve

test: $(BIN)/.installed-dev  ## the whole test suite
	$(BIN)/python -m pytest

lint: $(BIN)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

check: lint test

format: $(BIN)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
