# Set-up from nothing: a virtual environment in .venv, torch pinned to the local CPU build when
# no torch is importable, then the package (with test extras). Every target depends on it.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dmquant-installed

.PHONY: demo test test-all lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dmquant demo

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout=600 -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q -x --timeout=600

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
