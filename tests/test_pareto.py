"""Pareto frontiers: the math on hand-made points, the files, the callback and `moebench pareto`."""

from __future__ import annotations

import json

import pytest
from pathlib import Path

from moebench.pareto import aggregate, pareto_mask
from moebench.tracking import atomic_write_json

from test_cli import moebench


def test_pareto_mask_on_hand_made_points():
    costs = [1.0, 2.0, 3.0, 2.0, 4.0]
    quality = [0.5, 0.7, 0.6, 0.7, 0.9]
    # (3, .6) is beaten by (2, .7); the two (2, .7) duplicates are both kept; (4, .9) is the best.
    assert pareto_mask(costs, quality) == [True, True, False, True, True]


def test_equal_cost_keeps_only_the_better_and_equal_quality_only_the_cheaper():
    assert pareto_mask([1.0, 1.0], [0.5, 0.6]) == [False, True]
    assert pareto_mask([1.0, 2.0], [0.6, 0.6]) == [True, False]
    assert pareto_mask([], []) == []


def fake_run(root: Path, name: str, router: str, top1: float, gflops: float, status: str = "completed") -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    if status == "unfinished":
        return
    atomic_write_json(run / "result.json", {
        "status": status,
        "config": {"router": {"name": router, "num_experts": 8, "k": 1, "capacity_factor": 1.0, "bpr": True,
                              "slots_per_expert": 1, "dispatch": "soft", "combine": "soft"},
                   "model": {"name": "tiny"}, "data": {"name": "digits"}, "seed": 0},
        "cost": {"gflops_per_image": gflops, "infer_ms_per_image": gflops * 10, "params_total": 1000,
                 "params_active": 500, "train_images_per_s": 100.0 / gflops},
        "quality": {"top1": top1, "top1_best": top1, "loss": 1.0},
    } if status == "completed" else {"status": status, "error": "boom", "config": {}})


def test_aggregate_marks_frontiers_skips_unfinished_and_is_repeatable(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", "soft", 0.8, 1.0)
    fake_run(sweep, "1", "dense", 0.7, 2.0)  # dearer and worse: off the all-router frontier
    fake_run(sweep, "2", "tokens_choice", 0.9, 3.0)
    fake_run(sweep, "3", "soft", 0.0, 0.0, status="failed")
    fake_run(sweep, "4", "soft", 0.0, 0.0, status="unfinished")
    summary = aggregate([sweep], sweep, show=False)
    rows = {row["run"]: row for row in summary["runs"]}
    assert set(rows) == {"0", "1", "2"}
    assert [rows[r]["frontier_gflops_per_image"] for r in "012"] == [True, False, True]
    assert rows["1"]["router_frontier_gflops_per_image"]  # alone in its router, it is its own frontier
    assert rows["0"]["params_total"] == 1000 and rows["2"]["train_ms_per_image"] == pytest.approx(30.0)
    assert sorted((s["status"] for s in summary["skipped"])) == ["failed", "unfinished"]
    files = {name: (sweep / name).read_bytes() for name in ("pareto.csv", "pareto.json", "pareto.png")}
    assert files["pareto.csv"].decode().splitlines()[0].startswith("run,label,router,experts")
    aggregate([sweep], sweep, show=False)
    assert {name: (sweep / name).read_bytes() for name in files} == files  # same files again


def test_sweep_callback_and_command_with_a_failing_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = moebench("train", "-m", "experiment=smoke", "router=tokens_choice", "router.group_size=2", "k=1,2,9",
                    "wandb.mode=offline", f"hydra.sweep.dir={sweep}")
    assert proc.returncode != 0  # one job failed...
    assert "Traceback" not in proc.stdout + proc.stderr
    data = json.loads((sweep / "pareto.json").read_text())  # ...and the callback aggregated the others
    assert len(data["runs"]) == 2 and [s["status"] for s in data["skipped"]] == ["failed"]
    assert (sweep / "pareto.png").stat().st_size > 0 and (sweep / "pareto.csv").exists()
    pareto_runs = [p for p in (sweep / "wandb").glob("offline-run-*")]
    assert len(pareto_runs) == 1 and list(pareto_runs[0].rglob("*.table.json"))

    out = tmp_path / "again"
    proc = moebench("pareto", str(sweep), "--out", str(out), "--wandb-mode", "disabled")
    assert proc.returncode == 0, proc.stderr
    assert (out / "pareto.csv").read_text() == (sweep / "pareto.csv").read_text()
    assert "skipped" in proc.stdout and "k (router.k)" in proc.stdout


def test_pareto_command_on_a_missing_path_is_one_line(tmp_path):
    proc = moebench("pareto", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "no such run or sweep directory" in proc.stderr and "Traceback" not in proc.stderr
