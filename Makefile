# Two commands on a fresh machine: `make demo` (set up .venv, run the embedded default) and
# `make test` (set up .venv with test dependencies, run the suite). .ci/run calls `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test test-fast bench clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -c constraints.txt -e ".[test]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/preftune train

test: $(VENV)/.test
	$(PY) -m pytest -q

test-fast: $(VENV)/.test
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.test
	$(PY) benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) output
