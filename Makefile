# Two commands on a fresh machine: `make run` (pre-train on the built-in data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run test test-quick lint bench clean

$(BIN)/advpt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

run: $(BIN)/advpt
	$(BIN)/advpt pretrain $(ARGS)

# One pytest worker per core; the multi-process runs share one worker (tests marked xdist_group).
test: $(BIN)/advpt
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

# The inner loop: every test but the slow end-to-end runs of the CLI (CI runs them all).
test-quick: $(BIN)/advpt
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m "not slow"

lint: $(BIN)/advpt
	$(BIN)/ruff check advpt tests benchmarks
	$(BIN)/ruff format --check advpt tests benchmarks

# Installs the bench extra (lightly, the peer it is timed against) into the venv first.
bench: $(BIN)/advpt
	$(BIN)/python -c "import lightly" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/step_cost.py $(ARGS)

clean:
	rm -rf outputs multirun runs
