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

# `make test` runs the suite on SQLite, then again on the PostgreSQL database at CBIR_TEST_PG_URL
# when one answers there: every test that reaches the database again, each in a fresh schema (the
# others ran identically on SQLite; tests/conftest.py). CBIR_TEST_PG_REQUIRED=1 (CI) makes an
# unreachable PostgreSQL a failure instead of a skipped run. Each pass runs on TEST_WORKERS pytest-xdist
# workers (the tests sharing the demo build on one of them) and ends with its ten slowest tests.
# PYTEST_ARGS go to both runs.
export CBIR_TEST_PG_URL ?= postgresql+psycopg://cbir:cbir@127.0.0.1:5432/cbir_test
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=10

.PHONY: run serve demo test check lint format clean

# The Dockerfile runs these same two pip commands.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[postgres,milvus]'
	touch $@

$(BIN)/.installed-dev: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(BIN)/.installed $@

run: $(BIN)/.installed  ## build the demo collection if missing, then serve on CBIR_HOST:CBIR_PORT
	# glibc: keep freed training buffers instead of returning them to the OS every step
	# (about a third of CDAE training time went to page faults without it).
	MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 $(BIN)/cbir demo
	exec $(BIN)/cbir serve

serve: $(BIN)/.installed  ## serve without building the demo
	exec $(BIN)/cbir serve

test: $(BIN)/.installed-dev  ## the whole test suite on SQLite, then on PostgreSQL when reachable
	@sqlite=passed; postgres=passed; \
	echo "== tests on SQLite =="; \
	CBIR_TEST_DATABASE_URL= $(PYTEST) $(PYTEST_ARGS) || sqlite=FAILED; \
	if where=$$($(BIN)/python -m tests.postgres probe "$$CBIR_TEST_PG_URL"); then \
	  echo "== tests on PostgreSQL ($$where) =="; \
	  CBIR_TEST_DATABASE_URL="$$CBIR_TEST_PG_URL" $(PYTEST) $(PYTEST_ARGS) || postgres=FAILED; \
	elif [ -n "$${CBIR_TEST_PG_REQUIRED:-}" ]; then \
	  postgres="FAILED (not reachable)"; \
	else \
	  postgres="skipped (point CBIR_TEST_PG_URL at a PostgreSQL database to run it)"; \
	fi; \
	echo "== SQLite: $$sqlite; PostgreSQL: $$postgres =="; \
	[ "$$sqlite" = passed ] && case "$$postgres" in passed|skipped*) true;; *) false;; esac

lint: $(BIN)/.installed-dev  ## ruff, mypy, and the architecture contracts (import-linter, pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app models index
	$(BIN)/lint-imports

check: lint test

format: $(BIN)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
