# genrobust: `make quickstart` runs the embedded study, `make test` runs the tests.
# Both create or reuse .venv and install the pinned dependencies first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.genrobust-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install quickstart test test-slow bench clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/genrobust quickstart --out runs/quickstart

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) bench/bench_quickstart.py

clean:
	rm -rf runs .pytest_cache
