# One command each: `make demo` runs the demo, `make test` runs the suite. Both set up .venv first.
# TORCH pins the torch wheel; override for your CUDA build, e.g. `make test TORCH="torch==2.11.0"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup test lint demo bench-cpu toy

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow"
	$(PY) -m pytest -m slow

demo: setup
	$(PY) -m fvfunc.demo

lint: setup
	$(PY) -m ruff check .

toy: setup
	$(PY) bench/toy.py --grid bench/toy_grid.png

bench-cpu: setup
	$(PY) bench/cpu_apply.py
	$(PY) bench/loader.py
