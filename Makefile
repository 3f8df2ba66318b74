# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
# The torch requirement; a GPU user overrides it, e.g. make test TORCH='torch==2.13.0+cu128'.
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'a-zA-Z0-9.\n' '_')

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check '$(TORCH)'
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,train]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/dacc demo

# Two workers (CI has two cores), each test file on one worker so module fixtures are built once.
# `make test` (CI) leaves out the few end-to-end runs marked slow; `make test-all` runs everything.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

# Side-by-side with diffusers' cache hooks and cache-dit (peers come from the `bench` extra).
bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,train,bench]'
	$(PY) bench/compare.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
