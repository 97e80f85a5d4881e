# Two entry points, each builds/refreshes .venv first:
#   make quickstart   the end-to-end CPU demo on bundled data
#   make test         the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test quickstart clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# The CPU torch wheel first, so no multi-GB CUDA build is pulled in by the ranges below.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,quickstart]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

quickstart: venv
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) build *.egg-info
