# The two commands of the README: `make demo` (set up, run the default scenario) and `make test`
# (set up, run the whole suite). Set-up pins the CPU build of torch through constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/burnin run smoke

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/recovery.py

clean:
	rm -rf $(VENV) runs .pytest_cache
