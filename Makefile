# Two commands on a fresh machine: `make run` (pre-train on the built-in data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run test lint bench clean

$(BIN)/advpt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

run: $(BIN)/advpt
	$(BIN)/advpt pretrain $(ARGS)

test: $(BIN)/advpt
	$(BIN)/python -m pytest -q

lint: $(BIN)/advpt
	$(BIN)/ruff check advpt tests benchmarks
	$(BIN)/ruff format --check advpt tests benchmarks

bench: $(BIN)/advpt
	$(BIN)/python benchmarks/step_cost.py

clean:
	rm -rf outputs multirun
