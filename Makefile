# Two commands set up a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first and pinned, so no install step ever pulls a CUDA build.
# pip is first asked (dry run, nothing installed) what TORCH_SPEC resolves to on the configured index: some
# indexes (this project's CI machine) serve the CPU wheel under the plain version; plain PyPI serves the CUDA
# build, which pulls ~20 nvidia-* packages (several GB). In that case the CPU build comes from TORCH_CPU_INDEX.
# TORCH_PIP_ARGS="--index-url URL" forces an index for torch (e.g. a mirror, or a CUDA index on a GPU host).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.meshd-installed
PYTEST_ARGS ?=

.PHONY: all install torch test lint typecheck unit demo bench clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(MAKE) --no-print-directory torch VENV=$(VENV)
	@echo "meshd: installing meshd and its dependencies into $(VENV) (about a minute)"
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[data,test]" "$(TORCH_SPEC)"
	touch $(STAMP)

# The CPU build of torch into $(VENV) (also for a service venv: make torch VENV=/opt/meshd).
torch: | $(BIN)/python
	@if [ -z "$(TORCH_PIP_ARGS)" ] && $(BIN)/python -m pip install --disable-pip-version-check --dry-run -q \
	    --report - "$(TORCH_SPEC)" 2>/dev/null | grep -q '"name": *"nvidia-'; then \
	  echo "meshd: this index serves the CUDA build of $(TORCH_SPEC); installing the CPU build from $(TORCH_CPU_INDEX)"; \
	  $(BIN)/python -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)" --index-url "$(TORCH_CPU_INDEX)"; \
	else \
	  echo "meshd: installing $(TORCH_SPEC) (CPU build) into $(VENV)"; \
	  $(BIN)/python -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); \
	fi

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
