# Every target installs what it needs into .venv first (from PyPI, pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export AIRFLOW_HOME ?= $(CURDIR)/.airflow

.PHONY: install test test-fast test-slow test-compat compat-constraints dist lint demo bench sandbox constraints \
	openapi-subset mutation docs clean faketime

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e ".[test,docs]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check cliniko_provider dags_examples tests docs
	$(BIN)/ruff format --check cliniko_provider dags_examples tests docs
	$(BIN)/mypy cliniko_provider dags_examples

## make test: lint, type-check, then the test suite (the slow fault scenarios run with test-slow)
test: lint
	$(BIN)/pytest -q

test-slow: install faketime
	$(BIN)/pytest -q -m slow || [ $$? -eq 5 ]

## make faketime: libfaketime for the clock-skew tests (Debian's faketime, installed when missing and root)
FAKETIME_LIB := /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
faketime:
	@if [ ! -e $(FAKETIME_LIB) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q faketime || (apt-get update -q && apt-get install -y -q faketime); \
	fi
	@[ -e $(FAKETIME_LIB) ] || echo "No $(FAKETIME_LIB): the clock-skew tests will be skipped (apt-get install faketime)"

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

## make docs: the API reference in docs/_build/html, from the docstrings; fails on any warning (a broken reference to a public name, nitpicky), including a
## public class, function or parameter without documentation (docs/conf.py)
docs: install
	$(BIN)/sphinx-build -E -n -W --keep-going -q -b html docs docs/_build/html
	@echo "API reference: docs/_build/html/index.html"

sandbox: install
	$(BIN)/cliniko-sandbox --seed-example-patients

## A wheel and an sdist in dist/ (PEP 517, isolated), checked as PyPI checks them
dist: install
	rm -rf dist
	$(BIN)/uv build -q --out-dir dist
	$(BIN)/uv tool run -q --from twine==7.0.0 twine check --strict dist/*

## The oldest pairing the package claims and the newest, each in its own venv pinned by
## .ci/constraints-<pairing>.txt: the fast suite, then one real upload with a deferred wait (and its lineage).
PYTHON310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
PYTHON313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
PYTHON_py310-af31 = $(PYTHON310)
PYTHON_py313-newest = $(PYTHON313)
COMPAT ?= py310-af31 py313-newest

.venv-%/.installed: .ci/constraints-%.txt pyproject.toml | $(VENV)/.installed
	$(BIN)/uv venv -q --allow-existing --python $(PYTHON_$*) .venv-$*
	$(BIN)/uv pip install -q --python .venv-$*/bin/python -c $< -e ".[test]"
	touch $@

test-compat: $(COMPAT:%=test-compat-%)

.PRECIOUS: .venv-%/.installed  # keep the compat venvs' stamps: make would delete them as intermediates

test-compat-%: .venv-%/.installed
	.venv-$*/bin/python -c 'import sys, airflow; print("$*: Python", sys.version.split()[0], "Airflow", airflow.__version__)'
	.venv-$*/bin/pytest -q -p no:cacheprovider
	.venv-$*/bin/pytest -q -p no:cacheprovider -m slow tests/test_lineage_dag.py

## Re-pin the compat pairings: the lowest versions pyproject.toml claims on the oldest Python (with the
## structlog and universal-pathlib of Airflow 3.1's own constraints: newer ones break 3.1.0's imports and
## ObjectStoragePath), the newest of everything on the newest Python. Both keep constraints.txt's celery
## (the celery provider imports celery.backends.database.retry, gone in 5.7).
PINNED ?= celery==5.6.3
LOWEST ?= apache-airflow==3.1.8 apache-airflow-providers-common-compat==1.15.0 \
	apache-airflow-providers-openlineage==2.5.0 structlog==25.4.0 universal-pathlib==0.2.6
compat-constraints: install
	printf '%s\n' $(LOWEST) $(PINNED) | $(BIN)/uv pip compile -q --python $(PYTHON310) --extra test \
		-c /dev/stdin -o .ci/constraints-py310-af31.txt pyproject.toml
	printf '%s\n' $(PINNED) | $(BIN)/uv pip compile -q --python $(PYTHON313) --extra test \
		-c /dev/stdin -o .ci/constraints-py313-newest.txt pyproject.toml

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
