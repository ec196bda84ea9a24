# moebench: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow test-all bench bench-processes smoke clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-16s %s\n", $$1, $$2}'

# PyPI's Linux torch wheels pull in ~3 GB of CUDA libraries (a 6 GB venv); on a CPU-only machine
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs the CPU wheels first.
TORCH_INDEX ?=

$(BIN)/moebench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet torch torchvision --index-url $(TORCH_INDEX))
	# conf/ ships as moebench.conf, so setuptools installs through an import hook and says so
	# in an informational warning about editable installs: nothing to act on, so not shown.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -e '.[test]'
	@touch $@
	@# The venv is not activated by make: say how to reach the command, or `moebench` is "not found".
	@echo "moebench is installed in $(VENV)/: run $(BIN)/moebench, or 'source $(BIN)/activate' once per shell"

install: $(BIN)/moebench ## create .venv and install moebench into it (editable, with test tools)

train: install ## the main job: Soft MoE with 128 experts on the bundled digits (~2 min on 2 CPU cores)
	$(BIN)/moebench train router=soft experts=128

smoke: install ## one run of every router on tiny synthetic data (seconds)
	$(BIN)/moebench train -m experiment=smoke router=soft,tokens_choice,experts_choice,dense

test: install ## the default test suite (what CI runs): unit tests and a short end-to-end test of every command
	$(BIN)/python -m pytest

test-slow: install ## the long end-to-end tests left out of `make test` (resume, faults, torchrun, launchers, studies)
	$(BIN)/python -m pytest -m slow

test-all: install ## both
	$(BIN)/python -m pytest -m "slow or not slow"

# The peers' Python is imported: keep them in a dir of your own (never /tmp, where anyone can plant a package);
# moebench bench refuses a peers dir owned by another user or writable by others. Absent: peers skipped.
PEERS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/moebench/peers
bench: install ## router fwd+bwd time vs dense, matmul peak and peers (PEERS=DIR) -> experiments/results/bench_routers.json
	$(BIN)/moebench bench $(if $(wildcard $(PEERS)),--peers $(PEERS)) --out experiments/results/bench_routers.json --markdown experiments/results/bench_routers_tables.md

bench-processes: install ## training images/s, 1 vs 2 processes (torchrun) -> experiments/results/bench_processes.json
	$(BIN)/python experiments/bench_processes.py --out experiments/results/bench_processes.json

clean: ## remove the venv, outputs and caches
	rm -rf $(VENV) outputs multirun wandb .pytest_cache build *.egg-info
