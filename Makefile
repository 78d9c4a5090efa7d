# modelkiln — the two commands: `make demo` and `make test`.
# Both create .venv when missing and install what they need; a second run
# only re-installs when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from local disk here. GPU users: install a CUDA torch into .venv
# first and run with TORCH_SPEC= (empty) so the Makefile leaves torch alone.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,train,onnx,serve,monitor,security,deploy,ray,bench
STAMP := $(VENV)/.modelkiln-installed
PYTEST_ARGS ?=
LINT_PATHS := $(wildcard src tests benchmarks examples)

# Nothing here may reach a model or dataset hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: help install demo test test-all bench lint audit format clean

help:
	@echo "make demo    set up .venv and run the quickstart end to end"
	@echo "make test    set up .venv and run the test suite"
	@echo "make bench   run the benchmarks and update docs/BENCHMARKS.md"
	@echo "make lint    ruff + mypy + make audit"
	@echo "make audit   bandit + pip-audit (CI runs it)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln quickstart

# pytest exits 5 when it collects no test: that is a failure of the suite here.
test: $(STAMP)
	@bash scripts/ensure-test-services.sh
	@$(BIN)/python -m pytest -m "not gpu and not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is empty or mis-configured" >&2; fi; \
	exit $$rc

test-all: $(STAMP)
	@bash scripts/ensure-test-services.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP) audit
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# Security checks CI runs too: bandit (no high-severity finding) and pip-audit
# (skipped with a message when the vulnerability service is unreachable).
audit: $(STAMP)
	$(BIN)/bandit -q -r src -lll
	$(BIN)/python scripts/pip_audit_or_skip.py

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
