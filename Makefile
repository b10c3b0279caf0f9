# Set-up and the two everyday commands. Everything runs inside ./.venv, created on first use.
#   make run    - the default ELT run (snakemake --cores all on config/config.yaml)
#   make test   - the test suite (what CI runs; tests marked slow are skipped when CI=true)
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: run example test test-all bench clean-venv

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

run: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores all

example: $(BIN)/.installed
	$(BIN)/dpelt example demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test-all: $(BIN)/.installed
	DPELT_RUN_SLOW=1 $(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/water.py

clean-venv:
	rm -rf $(VENV)
