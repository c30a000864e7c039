# Two entry points (see README): `make train` and `make test`.
# Each creates .venv from the requirements files when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: train test clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

train: $(VENV)/.installed
	$(PY) train.py --nam --epochs 300 $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
