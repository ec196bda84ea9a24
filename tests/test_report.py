"""W&B naming and the sweep report: what can be checked without W&B online."""

from __future__ import annotations

from pathlib import Path

import pytest

from moebench import report
from moebench.tracking import atomic_write_json, run_name, runs_wandb_mode, sweep_group


def fake_run(sweep: Path, name: str, router: str, *, params: int, wandb_mode: str = "offline",
             wandb_id: str | None = None) -> Path:
    """A finished run's records as `moebench train` leaves them (result.json, .hydra/, W&B's run dir)."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    if wandb_id:
        (run / "wandb" / f"offline-run-20261125_152032-{wandb_id}").mkdir(parents=True)
        (run / "wandb" / "latest-run").symlink_to(f"offline-run-20261125_152032-{wandb_id}")
    atomic_write_json(run / "result.json", {
        "status": "completed",
        "config": {"router": {"name": router, "num_experts": 8}, "model": {"name": "tiny"},
                   "data": {"name": "digits"}, "train": {"lr": 0.003}, "seed": 0,
                   "wandb": {"mode": wandb_mode, "project": "proj", "entity": None}},
        "cost": {"gflops_per_image": 0.0341, "infer_ms_per_image": 0.2, "params_total": params,
                 "params_active": params // 2, "train_images_per_s": 900.0},
        "quality": {"top1": 0.9, "loss": 0.3},
        "run_dir": str(run),
    })
    return run


def test_sweep_group_carries_the_date_of_a_clock_time_dir():
    assert sweep_group("multirun/2026-11-25/15-20-32") == "2026-11-25_15-20-32"
    assert sweep_group("multirun/2026-11-26/15-20-32") != sweep_group("multirun/2026-11-25/15-20-32")
    assert sweep_group("sweeps/recipe1_cifar10") == "recipe1_cifar10"  # a chosen name stays as it is


def test_run_name_is_the_users_overrides_without_logging_and_launcher_noise():
    overrides = ["experiment=smoke", "wandb.mode=offline", "router=soft", "hydra.launcher.n_jobs=2",
                 "hydra/launcher=parallel", "data.root=/data/cifar10", "+wandb.tags=[a]", "experts=8"]
    assert run_name(overrides, exclude_keys=["data.root", "resume"]) == "experiment=smoke,router=soft,experts=8"
    assert run_name(["wandb.mode=online"]) == "default"


def test_pareto_w_and_b_mode_follows_the_runs_unless_given(tmp_path):
    assert runs_wandb_mode([{"wandb": {"mode": "disabled"}}, {}]) == "disabled"
    assert runs_wandb_mode([{"wandb": {"mode": "online"}}] * 2) == "online"
    assert runs_wandb_mode([{"wandb": {"mode": "online"}}, {"wandb": {"mode": "offline"}}]) == "offline"
    sweep = tmp_path / "2026-11-25" / "15-20-32"
    fake_run(sweep, "0", "soft", params=1000, wandb_mode="disabled")
    cfg = report.pareto_wandb_cfg([sweep], sweep)
    assert cfg == {"mode": "disabled", "project": "proj", "entity": None, "group": "2026-11-25_15-20-32"}
    assert report.pareto_wandb_cfg([sweep], sweep, mode="offline", group="g")["mode"] == "offline"


def test_pareto_over_runs_without_w_and_b_creates_no_w_and_b_run(tmp_path, cli_in_process):
    sweep = tmp_path / "sweep"
    for i, router in enumerate(("soft", "dense")):
        fake_run(sweep, str(i), router, params=1000 * (i + 1), wandb_mode="disabled")
    code, _, err = cli_in_process("pareto", str(sweep), "--wandb-report", cwd=tmp_path)  # the CLI, in this process
    assert code == 0, err[-2000:]
    assert (sweep / "pareto.csv").is_file()
    assert not list(sweep.rglob("wandb"))  # no W&B run, offline or not
    notes = [line for line in err.splitlines() if "--wandb-report" in line]
    assert len(notes) == 1 and "needs W&B online" in notes[0]


def test_report_spec_has_a_scatter_per_cost_axis_over_the_sweeps_w_and_b_runs(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", "soft", params=1_000, wandb_id="aaa111")
    fake_run(sweep, "1", "soft", params=50_000, wandb_id="bbb222")
    fake_run(sweep, "2", "dense", params=3_000, wandb_id="ccc333")
    fake_run(sweep, "3", "dense", params=3_000, wandb_mode="disabled")  # not in W&B: not in the report
    spec = report.report_spec(report.read_records([sweep]), entity="team", project="proj", title="t",
                              source=str(sweep))
    assert spec["run_ids"] == ["aaa111", "bbb222", "ccc333"]
    assert spec["group_by"] == "config.router.name"
    assert [p["x"] for p in spec["panels"]] == list(report.COST_METRICS)
    assert all(p["y"] == "quality/top1" for p in spec["panels"])
    log_x = {p["x"]: p["log_x"] for p in spec["panels"]}
    assert log_x["cost/params_total"] and not log_x["cost/gflops_per_image"]  # 50x span vs one value
    assert "dense 1, soft 2" in spec["description"]


def test_report_needs_runs_that_were_logged_to_w_and_b(tmp_path):
    fake_run(tmp_path / "sweep", "0", "soft", params=1000, wandb_mode="disabled")
    with pytest.raises(report.ReportError, match="logged to W&B"):
        report.report_spec(report.read_records([tmp_path / "sweep"]), entity=None, project="p", title="t",
                           source="sweep")


def test_report_spec_becomes_a_wandb_workspaces_report(tmp_path):
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    fake_run(tmp_path / "sweep", "0", "soft", params=1000, wandb_id="aaa111")
    spec = report.report_spec(report.read_records([tmp_path / "sweep"]), entity="team", project="proj",
                              title="moebench pareto: s", source="sweep", pareto_run_id="ppp999")
    built = report.build_report(spec)  # not saved: that needs W&B online
    assert isinstance(built, wr.Report) and (built.entity, built.project) == ("team", "proj")
    scatter, plot = [block for block in built.blocks if isinstance(block, wr.PanelGrid)]
    assert scatter.runsets[0].groupby == ["config.router.name"] and "aaa111" in scatter.runsets[0].filters
    assert [panel.x.name for panel in scatter.panels] == list(report.COST_METRICS)
    assert "ppp999" in plot.runsets[0].filters and plot.panels[0].media_keys == ["pareto/plot"]
