# The two commands of the README:
#   make demo   install into .venv and run the main job on the built-in default
#   make test   install into .venv and run the fast test tier
# Everything is installed here; a fresh clone needs nothing but Python >= 3.10.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: a bare `torch` requirement on a machine without it pulls
# several GB of CUDA packages. Override for a GPU machine, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow test-remote lint organisms clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,plots]'
	touch $@

demo: setup
	$(PY) -m experiments.routing

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# Against a real NDIF server on 127.0.0.1 (installed into .venv-ndif, started and stopped by the tests).
test-remote: setup
	bash scripts/ndif/local_server.sh install
	$(PY) -m pytest -q -m remote

lint: setup
	$(VENV)/bin/ruff check routing_suite experiments tests

organisms: setup
	$(PY) -m experiments.organisms
