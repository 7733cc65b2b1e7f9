# The README's two commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# examples/faces holds 48x48 crops (taken whole), examples/photos photos (faces detected); the
# job skips the notes beside them and ends with a summary of what it found.
demo: $(VENV)/.installed
	$(PY) -m jobs.score --input examples --output out/demo --overwrite

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/inference.py
