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

.PHONY: setup demo test test-slow lint organisms appendix clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,plots,launchers]'
	touch $@

demo: setup
	$(PY) -m experiments.routing

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check routing_suite experiments tests hydra_plugins

organisms: setup
	$(PY) -m experiments.organisms

# The paper appendix: every organism, the 12-cell grid, the tables (outputs/appendix).
appendix: setup
	$(PY) -m experiments.routing experiment=appendix
