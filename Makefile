# moebench: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow bench bench-processes smoke clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/moebench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# conf/ ships as moebench.conf, so setuptools installs through an import hook and says so
	# in an informational warning about editable installs: nothing to act on, so not shown.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(BIN)/moebench ## create .venv and install moebench into it (editable, with test tools)

train: install ## the main job: Soft MoE with 128 experts on the bundled digits (~2 min on 2 CPU cores)
	$(BIN)/moebench train router=soft experts=128

smoke: install ## one run of every router on tiny synthetic data (seconds)
	$(BIN)/moebench train -m experiment=smoke router=soft,tokens_choice,experts_choice,dense

test: install ## the fast test suite (what CI runs; < 10 min on 2 cores)
	$(BIN)/python -m pytest

test-slow: install ## the slow tests only (long end-to-end runs)
	$(BIN)/python -m pytest -m slow

# The peers' Python is imported: keep them in a dir of your own (never /tmp, where anyone can plant a package);
# moebench bench refuses a peers dir owned by another user or writable by others. Absent: peers skipped.
PEERS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/moebench/peers
bench: install ## router fwd+bwd time vs dense, matmul peak and peers (PEERS=DIR) -> experiments/results/bench_routers.json
	$(BIN)/moebench bench $(if $(wildcard $(PEERS)),--peers $(PEERS)) --out experiments/results/bench_routers.json --markdown experiments/results/bench_routers_tables.md

bench-processes: install ## training images/s, 1 vs 2 processes (torchrun) -> experiments/results/bench_processes.json
	$(BIN)/python experiments/bench_processes.py --out experiments/results/bench_processes.json

clean: ## remove the venv, outputs and caches
	rm -rf $(VENV) outputs multirun wandb .pytest_cache build *.egg-info
