"""Sweeps through Hydra's launcher plugins: submitit (local executor) and joblib."""

from __future__ import annotations

import json
import os

from test_cli import moebench, result

TINY_SWEEP = ["-m", "experiment=smoke", "router=tokens_choice", "router.group_size=2"]


def statuses(sweep_dir) -> dict[str, str]:
    return {run.name: result(run)["status"] for run in sweep_dir.iterdir() if (run / "result.json").is_file()}


def test_submitit_local_sweep_lands_runs_and_pareto_in_the_sweep_dir(tmp_path):
    sweep = tmp_path / "sweep"
    proc = moebench("train", *TINY_SWEEP, "k=1,2", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(statuses(sweep).values()) == ["completed", "completed"]
    assert list(sweep.glob(".submitit/*"))  # the jobs really went through submitit
    pareto = json.loads((sweep / "pareto.json").read_text())
    assert len(pareto["runs"]) == 2 and (sweep / "pareto.csv").is_file()


def test_parallel_sweep_caps_threads_and_reports_a_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = moebench("train", *TINY_SWEEP, "k=1,9", "hydra/launcher=parallel", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1  # the failure happened in a worker process, yet the command says so
    assert "k (router.k) must be in [1, experts=4], got 9" in proc.stderr
    done = statuses(sweep)
    assert sorted(done.values()) == ["completed", "failed"]
    completed = next(sweep / name for name, status in done.items() if status == "completed")
    cores = len(os.sched_getaffinity(0))
    assert result(completed)["threads"] == max(1, cores // 2)  # n_jobs=2 share the cores
    assert [r["label"] for r in json.loads((sweep / "pareto.json").read_text())["runs"]] == ["tokens_choice E4 k1 C1.0"]


def test_slurm_preset_composes_with_overrides_without_submitting(tmp_path):
    proc = moebench("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                    "hydra.launcher.timeout_min=30", "--cfg", "hydra", "--package", "hydra.launcher")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("partition: gpu", "timeout_min: 30", "gpus_per_node: 1", "array_parallelism: 32",
                 "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"):
        assert line in proc.stdout
