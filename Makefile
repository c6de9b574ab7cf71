# boneflow: `make demo` runs the whole round trip, `make test` lint + the whole suite.
# Both create .venv and install what they need (Python packages, and Debian's dcmtk,
# dicom3tools, orthanc and redis-server when run as root).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.boneflow-installed
# The CPU build of PyTorch; a GPU user installs the CUDA build of their choice first.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint format bench system-deps install clean

demo: install system-deps
	$(BIN)/boneflow demo

test: install system-deps lint
	$(BIN)/pytest -m "not gpu" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: install system-deps
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/e2e.py

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

system-deps:
	@scripts/system-deps.sh

clean:
	rm -rf $(VENV) boneflow-data boneflow-demo .pytest_cache .mypy_cache .ruff_cache
