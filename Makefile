# Every target installs what it needs into .venv first (from PyPI, pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export AIRFLOW_HOME ?= $(CURDIR)/.airflow

.PHONY: install test test-fast test-slow lint demo bench sandbox constraints openapi-subset mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check cliniko_provider dags_examples tests
	$(BIN)/ruff format --check cliniko_provider dags_examples tests
	$(BIN)/mypy cliniko_provider dags_examples

## make test: lint, type-check, then the test suite (the slow fault scenarios run with test-slow)
test: lint
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow || [ $$? -eq 5 ]

## make mutation: mutmut over the request plane (retry, budget, settings, validation, s3_form) and the
## trigger and its poller, against their fast tests; prints the score per module. Minutes on two cores
## (MUTANTS="cliniko_provider.triggers*" runs one part); not part of CI.
mutation: install
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2 $(MUTANTS) || true
	$(BIN)/python -m tests.mutation_score

demo: install
	$(BIN)/python -m dags_examples.demo

bench: install
	$(BIN)/python -m tests.bench

sandbox: install
	$(BIN)/cliniko-sandbox --api-key sandbox-key-au1

## Re-pin: resolve the newest compatible set and write it to constraints.txt
constraints: | $(BIN)/python
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile -q --python $(BIN)/python --extra test -o constraints.txt pyproject.toml

## Re-extract the schemas the sandbox tests use from Cliniko's official OpenAPI description:
## make openapi-subset OPENAPI=/path/to/cliniko-openapi.yaml
openapi-subset: install
	@test -n "$(OPENAPI)" || { echo "usage: make openapi-subset OPENAPI=/path/to/cliniko-openapi.yaml"; exit 2; }
	$(BIN)/python -m tests.data.extract_openapi "$(OPENAPI)"

clean:
	rm -rf $(VENV) .airflow .mypy_cache .ruff_cache .pytest_cache
