"""Sweeps through Hydra's launcher plugins: submitit (local executor), joblib, and the SLURM preset up to sbatch."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ENV, moebench, result

TINY_SWEEP = ["-m", "experiment=smoke", "router=tokens_choice", "router.group_size=2"]


def statuses(sweep_dir) -> dict[str, str]:
    return {run.name: result(run)["status"] for run in sweep_dir.iterdir() if (run / "result.json").is_file()}


def the_sweep_dir(cwd) -> object:
    """The one sweep dir a command left under its default multirun/DATE/TIME/: the launching
    process resolves it once, and every job and the Pareto callback use that one."""
    sweeps = list(cwd.glob("multirun/*/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


@pytest.mark.slow  # submitit workers
def test_submitit_local_sweep_lands_runs_and_pareto_in_the_sweep_dir(tmp_path):
    proc = moebench("train", *TINY_SWEEP, "k=1,2", "hydra/launcher=submitit_local", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = the_sweep_dir(tmp_path)
    assert sorted(statuses(sweep).values()) == ["completed", "completed"]
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # the jobs really went through submitit
    pareto = json.loads((sweep / "pareto.json").read_text())
    assert len(pareto["runs"]) == 2 and (sweep / "pareto.csv").is_file()


@pytest.mark.slow  # submitit workers
def test_submitit_local_failed_job_is_recorded_and_fails_the_command(tmp_path):
    sweep = tmp_path / "sweep"
    proc = moebench("train", *TINY_SWEEP, "k=1,9", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1  # the job failed in a submitit process, yet the command says so
    assert sorted(statuses(sweep).values()) == ["completed", "failed"]
    assert "failed: k (router.k) must be in [1, experts=4], got 9" in proc.stdout  # the Pareto summary
    job_errors = "".join(log.read_text() for log in sweep.glob(".submitit/*/*_log.err"))
    assert "moebench: error: k (router.k)" in job_errors  # the job's own one-line error, in its submitit log
    assert "Traceback" not in proc.stdout + proc.stderr + job_errors
    assert len(json.loads((sweep / "pareto.json").read_text())["runs"]) == 1


@pytest.mark.slow  # joblib workers
def test_parallel_sweep_caps_threads_and_reports_a_failed_job(tmp_path):
    proc = moebench("train", *TINY_SWEEP, "k=1,9", "hydra/launcher=parallel", cwd=tmp_path)
    assert proc.returncode == 1  # the failure happened in a worker process, yet the command says so
    sweep = the_sweep_dir(tmp_path)
    assert "k (router.k) must be in [1, experts=4], got 9" in proc.stderr
    done = statuses(sweep)
    assert sorted(done.values()) == ["completed", "failed"]
    completed = next(sweep / name for name, status in done.items() if status == "completed")
    cores = len(os.sched_getaffinity(0))
    assert result(completed)["threads"] == max(1, cores // 2)  # n_jobs=2 share the cores
    assert [r["label"] for r in json.loads((sweep / "pareto.json").read_text())["runs"]] == ["tokens_choice E4 k1 C1.0"]


def test_slurm_preset_composes_with_overrides_without_submitting(tmp_path, cli_in_process):
    # in this process: --cfg prints the config and trains nothing (the test below runs the preset in a fresh one)
    code, out, err = cli_in_process("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                    "hydra.launcher.timeout_min=30", "--cfg", "hydra", "--package", "hydra.launcher",
                                    cwd=tmp_path)
    assert code == 0, err[-3000:]
    for line in ("partition: gpu", "timeout_min: 30", "gpus_per_node: 1", "array_parallelism: 32",
                 "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"):
        assert line in out


FAKE_SBATCH = """#!/bin/sh
cp "$1" "$SBATCH_SCRIPT"
echo "fake sbatch: nothing submitted" >&2
exit 1
"""


def test_slurm_preset_becomes_one_sbatch_array_without_submitting(tmp_path):
    """A stand-in `sbatch` keeps the script submitit wrote and refuses it: the preset's keys,
    as SLURM sees them, without a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that srun exists
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sbatch"
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_SCRIPT": str(script)}
    proc = moebench("train", "-m", "experiment=smoke", "router=soft,dense,tokens_choice", "hydra/launcher=slurm",
                    "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                    "hydra.launcher.array_parallelism=2", env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "fake sbatch: nothing submitted" in proc.stderr
    sweep = the_sweep_dir(tmp_path)
    text = script.read_text()
    assert f"{sweep.relative_to(tmp_path)}/.submitit/%j" in text  # the job's paths: the same, resolved dir
    lines = set(text.splitlines())
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --array=0-2%2",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in lines, line
    assert not list(sweep.glob("*/result.json"))  # nothing ran here
