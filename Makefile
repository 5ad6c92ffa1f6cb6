# Two commands set up a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first and pinned, so no install step ever pulls a CUDA build.
# Where the default index does not serve the CPU wheel, pass e.g. TORCH_PIP_ARGS="--index-url <cpu wheel index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.meshd-installed
PYTEST_ARGS ?=

.PHONY: all install test lint typecheck unit demo bench clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[data,test]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check meshd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy meshd

unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

demo: $(STAMP)
	$(BIN)/meshd demo

bench: $(STAMP)
	$(BIN)/python bench/wire.py
	$(BIN)/python bench/consensus.py
	$(BIN)/python bench/learning.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
