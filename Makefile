# Two commands on a fresh machine: `make demo` (set up .venv, run `preftune demo`: SFT, sampling, DPO
# and evaluation of a small model, a few minutes on CPU) and `make test` (set up .venv with test
# dependencies, run the suite). .ci/run calls `make test`. The quick DPO-only demo: `preftune train`;
# DPO on a tiny vision-language model: `make demo-vision` (preftune demo --vision, about a minute).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo demo-vision test test-fast bench clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e .
	touch $@

# The browser test of `preftune label` (tests/test_label.py) drives the system's headless Chromium:
# installed here when missing and we are root (CI on a clean machine); otherwise that test fails
# and says how to install it.
$(VENV)/.test: $(VENV)/.base
	$(PIP) -c constraints.txt --no-build-isolation deepspeed
	$(PIP) -c constraints.txt -e ".[test]"
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium chromium-driver (apt) for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "note: the browser test needs Chromium: sudo apt-get install chromium chromium-driver"; \
	  fi; \
	fi
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/preftune demo

demo-vision: $(VENV)/.base
	$(VENV)/bin/preftune demo --vision

# two workers (pytest-xdist), the multi-process tests on one of them (tests/conftest.py); serially, one
# worker: `.venv/bin/python -m pytest -q`
test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=25

test-fast: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

bench: $(VENV)/.test
	$(PY) benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) output
