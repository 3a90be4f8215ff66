# mim_agg: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A stamp: the environment was made from this pyproject.toml (`make test` on a fresh clone makes it).
INSTALLED := $(VENV)/.installed

.PHONY: help install quickstart test test-fast lint clean clean-outputs wandb-sync

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(INSTALLED)  ## create .venv and install mim_agg with its dev tools (once)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $@

quickstart: $(INSTALLED)  ## random ViT-Ti on scikit-learn digits, CPU, offline, about a minute
	$(BIN)/python run.py experiment=quickstart

test: $(INSTALLED)  ## the whole test suite (CPU, offline), on two processes (pytest-xdist)
	$(BIN)/python -m pytest -n 2 --dist worksteal

test-fast: $(INSTALLED)  ## the tests without subprocess runs and real-data runs
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not slow and not data"

lint: $(INSTALLED)  ## ruff
	$(BIN)/ruff check mim_agg tests scripts run.py

# Where runs, caches, weights and data live: $MIM_AGG_ROOT, as for run.py.
ROOT := $(or $(MIM_AGG_ROOT),.)

clean:  ## remove Python and tool caches (never runs, token caches, weights or data)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +

clean-outputs:  ## remove every run and sweep folder under $MIM_AGG_ROOT/outputs (results too!)
	rm -rf $(ROOT)/outputs/runs $(ROOT)/outputs/multirun

wandb-sync:  ## upload the offline W&B runs under $MIM_AGG_ROOT/outputs (resumed attempts join their run)
	$(BIN)/wandb sync --include-offline $(wildcard $(ROOT)/outputs/runs/*/wandb/offline-run-*)
