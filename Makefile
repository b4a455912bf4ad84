# The two commands of the README:  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test lint
setup: $(STAMP)

$(STAMP): pyproject.toml requirements-examples.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first and pinned: on these machines 2.13.0 is a CPU build on local disk; any other
	@# order lets pip resolve a multi-GB CUDA build for Ray/DeepSpeed/transformers' sake.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[trainer,dev]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-examples.txt
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/finetune run examples/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check trainer operator tests bench
