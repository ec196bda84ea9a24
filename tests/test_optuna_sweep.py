"""hydra/sweeper=optuna: NSGA-II over the routers and their knobs, two objectives, end to end.

One 4-trial smoke study (one trial made to fail) runs in a subprocess that also notes
every trial the sweeper tells Optuna (``Study.tell``: number, state, values); the tests
read that, optimization_results.yaml (the study's Pareto set), the run records and the
frontier `moebench pareto` draws over the same sweep dir.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ENV, moebench, result

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
yaml = pytest.importorskip("yaml")

STUDY = ["-m", "hydra/sweeper=optuna", "experiment=smoke", "hydra.sweeper.n_trials=4"]
# Smoke runs train 3 steps each and the jobs share one process: the 5th step is trial 1's second.
FAULT = "raise:step:5"
OBJECTIVES = ["val_top1_best", "gflops_per_image"]

# `moebench ...` with optuna's Study.tell noted in a JSON file (argv[1]): what the study was told.
SPY = """
import json, sys
import optuna
path, told, tell = sys.argv[1], [], optuna.study.Study.tell  # (moebench rewrites sys.argv)
def spy(self, trial, values=None, state=optuna.trial.TrialState.COMPLETE):
    told.append({"number": trial if isinstance(trial, int) else trial.number, "state": state.name, "values": values})
    with open(path, "w") as f:
        json.dump(told, f)
    return tell(self, trial, values=values, state=state)
optuna.study.Study.tell = spy
from moebench.cli import main
sys.exit(main(sys.argv[2:]))
"""


def trial_params(run_dir) -> dict:
    """A run's values of the keys the preset searches, as Optuna names them."""
    config = result(run_dir)["config"]
    return {"router": config["router"]["name"], **{key: config[key] for key in ("experts", "slots", "k")},
            "capacity_factor": config["capacity_factor"], "train.lr": config["train"]["lr"]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("optuna")
    sweep, told = root / "sweep", root / "told.json"
    proc = subprocess.run([sys.executable, "-c", SPY, str(told), "train", *STUDY, f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, env={**ENV, "MOEBENCH_FAULT": FAULT}, timeout=900)
    assert sweep.is_dir() and told.is_file(), proc.stderr[-3000:]
    runs = {int(path.name.split("_", 1)[0]): path for path in sweep.iterdir() if path.is_dir()}
    return {"proc": proc, "sweep": sweep, "root": root, "runs": runs, "told": json.loads(told.read_text())}


@pytest.mark.slow  # a study of several trials
def test_a_failed_trial_is_told_as_failed_and_the_study_completes(study):
    proc = study["proc"]
    assert proc.returncode == 1, proc.stderr[-3000:]  # as any sweep with a failed job: recorded, exit 1
    told = study["told"]
    assert [(t["number"], t["state"]) for t in told] == [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE"), (3, "COMPLETE")]
    statuses = {n: result(path)["status"] for n, path in study["runs"].items()}
    assert statuses == {0: "completed", 1: "failed", 2: "completed", 3: "completed"}
    assert "injected fault at step #5" in result(study["runs"][1])["error"]
    assert "Failed experiment: run " in proc.stdout + proc.stderr  # the sweeper's account of it
    assert (study["sweep"] / "optimization_results.yaml").is_file()  # written at the study's end
    for t in told:  # what the study was told is what the run's record holds
        if t["state"] == "COMPLETE":
            res = result(study["runs"][t["number"]])
            assert t["values"] == [res["quality"]["val_top1_best"], res["cost"]["gflops_per_image"]]
            assert res["search"]["values"] == t["values"] and res["search"]["objectives"] == OBJECTIVES
            assert {"router", "experts", "slots", "k", "capacity_factor", "train.lr"} <= set(res["search"]["searched"])
    routers = {trial_params(path)["router"] for path in study["runs"].values()}
    assert routers <= {"soft", "tokens_choice", "experts_choice", "dense"} and len(study["runs"]) == 4


@pytest.mark.slow  # a study of several trials
def test_the_study_pareto_set_is_the_moebench_pareto_frontier(study):
    solutions = yaml.safe_load((study["sweep"] / "optimization_results.yaml").read_text())["solutions"]
    assert solutions
    out = study["root"] / "frontier"
    proc = moebench("pareto", str(study["sweep"]), "--quality", "val_top1_best", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["setups"] == [{"name": "", "runs": 3}]  # the searched lr does not split the runs into setups
    assert [s["status"] for s in summary["skipped"]] == ["failed"]
    frontier = {int(row["run"].split("_", 1)[0]): row for row in summary["runs"] if row["frontier_gflops_per_image"]}
    matched = {}
    for solution in solutions:  # each solution is one run: the one with its params
        numbers = [n for n, path in study["runs"].items() if trial_params(path) == solution["params"]]
        assert len(numbers) == 1, solution
        matched[numbers[0]] = solution["values"]
    assert set(matched) == set(frontier)  # the same runs...
    for number, values in matched.items():  # ...with the same values
        assert math.isclose(values[0], frontier[number]["val_top1_best"])
        assert math.isclose(values[1], frontier[number]["gflops_per_image"])
    callback = json.loads((study["sweep"] / "pareto.json").read_text())  # the sweep's own Pareto files
    assert callback["setups"] == [{"name": "", "runs": 3}]


@pytest.mark.parametrize("override, message", [
    ("search.objectives=[val_top1_best,flops]",
     "moebench: error: search.objectives: 'flops' is unknown; allowed: val_top1_best, top1, top1_at_best_val, "
     "gflops_per_image"),
    ("search.objectives=[gflops_per_image,val_top1_best]",
     "moebench: error: hydra.sweeper.direction=[maximize,minimize] does not fit "
     "search.objectives=[gflops_per_image,val_top1_best]; set hydra.sweeper.direction=[minimize,maximize]"),
])
def test_bad_objectives_are_refused_before_any_work(tmp_path, override, message, cli_in_process):
    code, _, err = cli_in_process("train", *STUDY, override, cwd=tmp_path)
    assert code == 2
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err[-2000:]
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_running_the_study_again_into_its_sweep_dir_replays_it(tmp_path):
    """The sampler's seed fixes the trials: a second run skips every completed one."""
    sweep = tmp_path / "sweep"
    first = moebench("train", *STUDY, f"hydra.sweep.dir={sweep}")
    assert first.returncode == 0, first.stderr[-3000:]
    records = {path.name: (path / "result.json").stat().st_mtime_ns for path in sweep.iterdir() if path.is_dir()}
    front = (sweep / "optimization_results.yaml").read_text()
    again = moebench("train", *STUDY, f"hydra.sweep.dir={sweep}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(records) == 4  # the same 4 run dirs, none trained again (records untouched)...
    assert {path.name: (path / "result.json").stat().st_mtime_ns for path in sweep.iterdir() if path.is_dir()} == records
    assert (sweep / "optimization_results.yaml").read_text() == front  # ...and the same Pareto set
