# Set-up and the two everyday commands. Everything runs inside ./.venv, created on first use.
#   make run    - the default ELT run (snakemake --cores all on config/config.yaml)
#   make test   - the test suite (what CI runs; tests marked slow are skipped when CI=true)
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# DeePMD-kit (PyTorch backend) in a venv of its own, for the equality tests of tests/test_interop.py:
# kept outside the clone so clones and CI runs share it. `make test` with CI=true builds it; without
# CI, those tests run if it exists (else they skip, naming `make deepmd-venv`).
DEEPMD_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dpelt/deepmd-pt-venv
DPELT_DEEPMD_PYTHON ?= $(DEEPMD_VENV)/bin/python
export DPELT_DEEPMD_PYTHON
CI_TRUE = $(filter true 1 yes,$(CI))

.PHONY: run example test test-all bench clean-venv deepmd-venv

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

test: $(BIN)/.installed $(if $(CI_TRUE),deepmd-venv)
	$(BIN)/python -m pytest -q

# idempotent: the script checks an existing venv (seconds) and builds only what is missing; the
# stamp skips even that check until the script changes
deepmd-venv: $(DEEPMD_VENV)/.dpelt-ready

$(DEEPMD_VENV)/.dpelt-ready: bench/deepmd/setup_venv.sh
	bash bench/deepmd/setup_venv.sh $(DEEPMD_VENV)
	touch $@

test-all: $(BIN)/.installed
	DPELT_RUN_SLOW=1 $(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/water.py

clean-venv:
	rm -rf $(VENV)
