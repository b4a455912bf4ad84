# The two commands of the README:  `make quickstart`  and  `make test`.
# CI (.ci/run) runs `make lint test`; `make test-fast` is the developer's loop (unit + e2e, minutes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-fast lint
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

# No real Ray training (tests/integration) and no real cluster (tests/e2e_cluster): the spec,
# builders, handlers, and the operator against the in-process API server.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check trainer operator tests bench
	$(BIN)/mypy  # what it checks, and how strictly: [tool.mypy] in pyproject.toml
