# Two entry points (see README): `make train` and `make test`.
# Each creates .venv from the requirements files when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: train test lint format clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

train: $(VENV)/.installed
	$(PY) train.py --nam --epochs 300 $(ARGS)

# Two processes (pytest-xdist); the JAX run of the model-side tests is one of the tests.
test: $(VENV)/.installed lint
	$(PY) -m pytest -q -n 2 tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean-venv:
	rm -rf $(VENV)
