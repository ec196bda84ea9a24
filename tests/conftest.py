"""Shared test helpers and fixtures: one way to compose a config, one way to run the CLI, one tiny run.

Import the helpers with ``from conftest import ...`` (pytest puts tests/ on the path); the
fixtures (``tiny_run``, ``cli_in_process``, ``float64_and_seed``) need no import. Helpers for
torch.distributed, which spawned processes import again, are in ``helpers.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from moebench.build import conf_dir

REPO = Path(__file__).resolve().parents[1]
# A model and data small enough for a few seconds per run on 2 CPU cores.
TINY = ["experiment=smoke"]  # conf/experiment/smoke.yaml: a whole run in seconds
SPARSE = {"tokens_choice": ["router.group_size=2"], "experts_choice": ["router.group_size=2"]}
ENV = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}


def compose_cfg(*overrides: str):
    """The train config as conf/ composes it with ``overrides`` (no Hydra keys, nothing resolved)."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def moebench(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``moebench ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "moebench", *args], capture_output=True, text=True, cwd=cwd,
        env=env or ENV, timeout=600,
    )


def train(tmp_path: Path, *overrides: str, name: str = "run") -> tuple[subprocess.CompletedProcess, Path]:
    """A tiny ``moebench train`` run in ``tmp_path/name``."""
    run_dir = tmp_path / name
    proc = moebench("train", *TINY, *overrides, f"hydra.run.dir={run_dir}")
    return proc, run_dir


def refusal_line(cwd: Path, *args: str) -> str:
    """The one line of a ``moebench ARGS`` refused in a fresh process run in the empty folder ``cwd``: exit
    code 2, no traceback, a single line on stderr, nothing written into ``cwd``."""
    proc = moebench(*args, cwd=cwd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    return lines[0]


def result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One completed tiny Soft MoE run (seed 3), trained once per session: for tests that only read it."""
    proc, run_dir = train(tmp_path_factory.mktemp("tiny"), "router=soft", "seed=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


# Digits at 8x8 in 2x2 patches: a 4x4 grid of 16 tokens, 4 experts (the smoke model, 1 epoch).
DIGITS = ["experiment=smoke", "data=digits", "data.num_test=64", "model.patch_size=2"]


class RouterRuns(dict):
    """One completed ``DIGITS`` run per router, trained when a test first asks for it (a selection of
    tests trains only the routers it uses), for tests that read them. ``"soft_wandb"`` is a Soft MoE
    run that logs to W&B (offline), for the one test of W&B logging (slow: W&B's service start)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        router, wandb = ("soft", "wandb.mode=offline") if name == "soft_wandb" else (name, "wandb.mode=disabled")
        proc = moebench("train", *DIGITS, f"router={router}", *SPARSE.get(router, []), wandb,
                        f"hydra.run.dir={self.root / name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        self[name] = self.root / name
        return self[name]


@pytest.fixture(scope="session")
def router_runs(tmp_path_factory) -> RouterRuns:
    """``router_runs[router]``: the run dir of that router's ``DIGITS`` run, trained once per session."""
    return RouterRuns(tmp_path_factory.mktemp("routers"))


@pytest.fixture(scope="session")
def bf16_run(tmp_path_factory) -> Path:
    """One completed tiny Tokens Choice run under bf16 autocast, trained once per session: for tests that only
    read it."""
    proc, run_dir = train(tmp_path_factory.mktemp("bf16"), "router=tokens_choice", "router.group_size=2",
                          "precision=bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def cli_in_process(monkeypatch, capsys):
    """``moebench ARGS`` called in this process: returns (exit code, stdout, stderr).

    For refusals, which end before any run starts, and for commands that train nothing (``--cfg``,
    ``pareto``, ``inspect``, ``probe``) once a test has run the command in a fresh process elsewhere:
    a fresh process spends seconds importing torch for each call, the refusal itself a fraction of
    one. What the CLI changes process-wide (malloc tuning, OMP_WAIT_POLICY, sys.argv) is kept from
    the test process or restored after it. A ``train`` that is not refused would train here: the
    callers assert exit code 2 (or the ``--cfg`` output). ``measure --threads`` sets torch's threads:
    not here.
    """
    from moebench import cli

    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: False)
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", list(sys.argv))

    def run(*args: str, cwd: Path) -> tuple[int, str, str]:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def float64_and_seed():
    """float64 as torch's default dtype and seed 0 for one test, the default dtype restored after it. The router
    modules take it for every test (``pytestmark = pytest.mark.usefixtures("float64_and_seed")``): their slow
    references accumulate in another order, which float64 keeps far below the tolerances."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
