"""Pareto frontiers: the math on hand-made points, the files, the callback and `moebench pareto`."""

from __future__ import annotations

import json

import pytest
from pathlib import Path

from moebench.pareto import ParetoError, aggregate, plot, human_flops, human_mb, human_percent, pareto_mask, si
from moebench.stats import ci95_half_width, paired_ci95, t_quantile, welch_ci95
from moebench.tracking import atomic_write_json

from conftest import moebench


def test_pareto_mask_on_hand_made_points():
    costs = [1.0, 2.0, 3.0, 2.0, 4.0]
    quality = [0.5, 0.7, 0.6, 0.7, 0.9]
    # (3, .6) is beaten by (2, .7); the two (2, .7) duplicates are both kept; (4, .9) is the best.
    assert pareto_mask(costs, quality) == [True, True, False, True, True]


def test_equal_cost_keeps_only_the_better_and_equal_quality_only_the_cheaper():
    assert pareto_mask([1.0, 1.0], [0.5, 0.6]) == [False, True]
    assert pareto_mask([1.0, 2.0], [0.6, 0.6]) == [True, False]
    assert pareto_mask([], []) == []


def fake_run(root: Path, name: str, router: str, top1: float, gflops: float, status: str = "completed", *,
             seed: int = 0, lr: float = 0.003, router_extra: dict | None = None, cost_extra: dict | None = None,
             loss: float = 1.0, measured: dict | None = None) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    if status == "unfinished":
        return run
    record = {
        "status": status,
        "config": {"router": {"name": router, "num_experts": 8, "k": 1, "capacity_factor": 1.0, "bpr": True,
                              "slots_per_expert": 1, "dispatch": "soft", "combine": "soft", **(router_extra or {})},
                   "model": {"name": "tiny", "dim": 64}, "data": {"name": "digits", "root": f"/data/{name}"},
                   "train": {"lr": lr, "epochs": 3, "log_every": 20}, "seed": seed,
                   "wandb": {"name": name}, "experts": 8},
        "cost": {"gflops_per_image": gflops, "infer_ms_per_image": gflops * 10, "params_total": 1000,
                 "params_active": 500, "train_images_per_s": 100.0 / gflops, **(cost_extra or {})},
        "quality": {"top1": top1, "top1_best": top1, "loss": loss},
    } if status == "completed" else {"status": status, "error": "boom", "config": {}}
    if measured:
        record["cost_measured"] = measured
    atomic_write_json(run / "result.json", record)
    return run


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
    assert (sweep / "pareto_arms.csv").read_text().splitlines()[0].startswith("label,setup,router,seeds")
    aggregate([sweep], sweep, show=False)
    assert {name: (sweep / name).read_bytes() for name in files} == files  # same files again


def test_sweep_callback_and_command_with_a_failing_job(tmp_path, cli_in_process):
    sweep = tmp_path / "sweep"
    proc = moebench("train", "-m", "experiment=smoke", "router=tokens_choice", "router.group_size=2", "k=1,2,9",
                    "wandb.mode=offline", f"hydra.sweep.dir={sweep}")
    assert proc.returncode != 0  # one job failed...
    assert "Traceback" not in proc.stdout + proc.stderr
    tail = proc.stdout[proc.stdout.rindex("arms (mean over seeds"):]  # the sweep ends with the frontier table
    assert "tokens_choice E4 k2 C1.0" in tail and "%" in tail
    for name in ("pareto.csv", "pareto_arms.csv", "pareto.json", "pareto.png"):
        assert f"  {(sweep / name).resolve()}\n" in tail  # whole paths, one per line
    data = json.loads((sweep / "pareto.json").read_text())  # ...and the callback aggregated the others
    assert len(data["runs"]) == 2 and [s["status"] for s in data["skipped"]] == ["failed"]
    assert (sweep / "pareto.png").stat().st_size > 0 and (sweep / "pareto.csv").exists()
    pareto_runs = [p for p in (sweep / "wandb").glob("offline-run-*")]
    assert len(pareto_runs) == 1 and list(pareto_runs[0].rglob("*.table.json"))

    # the command on the sweep, in this process (test_faults.py runs `moebench pareto` in a fresh one)
    out = tmp_path / "again"
    code, stdout, err = cli_in_process("pareto", str(sweep), "--out", str(out), "--wandb-mode", "disabled",
                                       cwd=tmp_path)
    assert code == 0, err
    assert (out / "pareto.csv").read_text() == (sweep / "pareto.csv").read_text()
    assert "left out: " in stdout and "k (router.k)" in stdout


def test_pareto_command_on_a_missing_path_is_one_line(tmp_path, cli_in_process):
    code, _, err = cli_in_process("pareto", str(tmp_path / "nope"), cwd=tmp_path)
    assert code == 2 and "no such run or sweep directory" in err and len(err.strip().splitlines()) == 1


def test_t_quantiles_match_the_tables():
    for df, expected in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)):
        assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-3), df
    assert t_quantile(0.99, 5) == pytest.approx(4.032, abs=1e-3)
    assert ci95_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.3027 / 3**0.5, rel=1e-4)  # std 1, n 3
    assert ci95_half_width([0.5]) is None
    # Welch: equal variances and sizes give df = 2(n-1) = 4; unequal ones fewer (here 1.03, rounded down to 1).
    assert welch_ci95([0.80, 0.82, 0.84], [0.60, 0.62, 0.64]) == pytest.approx(2.7764 * (2 * 0.0004 / 3) ** 0.5, rel=1e-4)
    assert welch_ci95([0.80, 0.82, 0.84], [0.70, 0.90]) == pytest.approx(12.706 * (0.0004 / 3 + 0.02 / 2) ** 0.5, rel=1e-4)
    assert welch_ci95([0.5], [0.6, 0.7]) is None
    # Paired: only the shared seeds count; diffs 0.10, 0.12, 0.14 (std 0.02, n 3).
    mean, half, n = paired_ci95({0: 0.80, 1: 0.82, 2: 0.84, 7: 0.5}, {0: 0.70, 1: 0.70, 2: 0.70})
    assert (mean, n) == (pytest.approx(0.12), 3) and half == pytest.approx(4.3027 * 0.02 / 3**0.5, rel=1e-4)
    assert paired_ci95({0: 0.8}, {1: 0.7})[1:] == (None, 0)


def test_numbers_for_humans():
    assert [si(1_000_000), si(207_946), si(12), si(2.5e9)] == ["1M", "208k", "12", "2.5G"]
    assert human_flops(0.0297) == "29.7 MFLOPs" and human_flops(1.5) == "1.5 GFLOPs" and human_flops(4e-7) == "400 FLOPs"
    assert human_mb(12.345) == "12.3 MB" and human_mb(3072) == "3 GB"
    assert human_percent(0.94171) == "94.17%" and human_percent(0.5, 0.0123) == "50.00 ± 1.23%"


def test_seeds_of_one_config_form_an_arm_with_a_t_interval(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, top1 in enumerate((0.80, 0.82, 0.84)):  # soft: mean 0.82, std 0.02
        fake_run(sweep, f"soft{seed}", "soft", top1, 1.0 + 0.01 * seed, seed=seed)
    for seed, top1 in enumerate((0.70, 0.90)):  # dense: one lucky seed beats every soft run...
        fake_run(sweep, f"dense{seed}", "dense", top1, 1.0, seed=seed)
    fake_run(sweep, "tc0", "tokens_choice", 0.5, 3.0)
    fake_run(sweep, "nan", "soft", 0.1, 0.5, loss=float("nan"), seed=7)  # diverged: never on a frontier
    summary = aggregate([sweep], sweep, show=False)
    arms = {arm["label"]: arm for arm in summary["arms"]}
    assert set(arms) == {"soft E8 p1", "dense", "tokens_choice E8 k1 C1.0"}
    soft, dense, tc = arms["soft E8 p1"], arms["dense"], arms["tokens_choice E8 k1 C1.0"]
    assert soft["seeds"] == 3 and soft["seed_values"] == [0, 1, 2] and len(soft["runs"]) == 3
    assert soft["top1_mean"] == pytest.approx(0.82) and soft["top1_std"] == pytest.approx(0.02)
    assert soft["top1_ci95"] == pytest.approx(4.3027 * 0.02 / 3**0.5, rel=1e-4)
    assert soft["gflops_per_image_mean"] == pytest.approx(1.01)
    assert dense["top1_mean"] == pytest.approx(0.80) and dense["top1_ci95"] == pytest.approx(12.706 * 0.1414 / 2**0.5, rel=1e-3)
    assert tc["seeds"] == 1 and tc["top1_std"] is None and tc["top1_ci95"] is None
    # ...but over the means soft (0.82) is better than dense (0.80), so both are on the arm frontier
    # (dense is cheaper) and tokens_choice (worse and dearer) is not.
    assert (soft["frontier_gflops_per_image"], dense["frontier_gflops_per_image"], tc["frontier_gflops_per_image"]) \
        == (True, True, False)
    runs = {row["run"]: row for row in summary["runs"]}
    assert runs["dense1"]["frontier_gflops_per_image"]
    assert not any(runs[f"soft{seed}"]["frontier_gflops_per_image"] for seed in range(3))  # per run: all beaten
    assert "nan" not in runs and [(s["run"], s["status"]) for s in summary["skipped"]] == [(str((sweep / "nan").resolve()), "diverged")]
    gaps = {(c["better"], c["worse"]): c for c in summary["comparisons"]}
    assert len(gaps) == 3 and gaps[("soft E8 p1", "dense")]["separated"] is False  # 0.82 vs 0.80: seed noise
    assert gaps[("soft E8 p1", "dense")]["top1_difference"] == pytest.approx(0.02)
    assert gaps[("dense", "tokens_choice E8 k1 C1.0")]["separated"] is None  # one seed: no interval
    arms_csv = (sweep / "pareto_arms.csv").read_text().splitlines()
    assert len(arms_csv) == 4 and "top1_ci95" in arms_csv[0].split(",")
    on_disk = json.loads((sweep / "pareto.json").read_text())
    assert on_disk["arms"] == json.loads(json.dumps(summary["arms"]))


def test_runs_repeating_a_seed_are_one_sample_not_seed_noise(tmp_path, capsys):
    # A search may propose one configuration twice: same config, same seed, same result.
    # Counted as two seeds that would give a spread of 0 and a "separated" gap of any size.
    sweep = tmp_path / "sweep"
    fake_run(sweep, "soft_a", "soft", 0.52, 1.0, seed=0)
    fake_run(sweep, "soft_b", "soft", 0.52, 1.0, seed=0)
    fake_run(sweep, "dense_a", "dense", 0.51, 1.0, seed=0)
    fake_run(sweep, "dense_b", "dense", 0.51, 1.0, seed=0)
    fake_run(sweep, "dense_c", "dense", 0.55, 1.0, seed=1)
    summary = aggregate([sweep], sweep, show=False)
    arms = {arm["label"]: arm for arm in summary["arms"]}
    soft, dense = arms["soft E8 p1"], arms["dense"]
    assert soft["seeds"] == 1 and soft["top1_ci95"] is None and len(soft["runs"]) == 2
    assert dense["seeds"] == 2 and dense["seed_values"] == [0, 1]
    assert dense["top1_mean"] == pytest.approx(0.53)  # seeds weigh equally: (0.51 + 0.55) / 2
    gap = summary["comparisons"][0]
    assert gap["separated"] is None and gap["top1_difference_ci95"] is None  # one sample of soft: no interval
    aggregate([sweep], sweep)  # and the terminal says so
    assert "dense: 3 runs of 2 seed(s) with one config; runs that repeat a seed count once" in capsys.readouterr().out


def test_a_key_added_later_with_a_null_default_keeps_older_runs_in_their_arm(tmp_path):
    """Runs made before a config key existed pool with later runs where that key is null (off),
    but not with runs where it is set."""
    for seed in range(2):
        fake_run(tmp_path, f"old{seed}", "soft", 0.8, 1.0, seed=seed)
        fake_run(tmp_path, f"new{seed}", "soft", 0.8, 1.0, seed=seed + 2, router_extra={"new_knob": None})
    fake_run(tmp_path, "on", "soft", 0.9, 1.0, router_extra={"new_knob": 4})
    arms = {arm["label"]: arm["seeds"] for arm in aggregate([tmp_path], tmp_path, show=False)["arms"]}
    assert sorted(arms.values()) == [1, 4] and len(arms) == 2


def test_arms_that_share_a_router_label_are_told_apart_by_the_key_that_differs(tmp_path):
    fake_run(tmp_path, "a", "experts_choice", 0.8, 1.0, router_extra={"group_size": 1})
    fake_run(tmp_path, "b", "experts_choice", 0.7, 1.0, router_extra={"group_size": 8})
    labels = sorted(arm["label"] for arm in aggregate([tmp_path], tmp_path, show=False)["arms"])
    assert labels == ["experts_choice E8 C1.0 router.group_size=1", "experts_choice E8 C1.0 router.group_size=8"]
    controls = tmp_path / "controls"  # the recipes' control arms are named even when alone
    fake_run(controls, "wide", "dense", 0.8, 1.0, router_extra={"mlp_mult": 4})
    fake_run(controls, "scale", "soft", 0.8, 1.0, router_extra={"scale_init": 8.0, "identical_init": False})
    labels = sorted(arm["label"] for arm in aggregate([controls], controls, show=False)["arms"])
    assert labels == ["dense MLPx4", "soft E8 p1 scale8 indep-init"]


def test_different_setups_are_refused_naming_the_key_or_split_when_allowed(tmp_path, cli_in_process):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "a", "soft", 0.8, 1.0, lr=0.003)
    fake_run(sweep, "b", "soft", 0.6, 1.0, lr=0.001)
    fake_run(sweep, "c", "dense", 0.7, 2.0, lr=0.001)
    with pytest.raises(ParetoError, match=r"runs differ in train\.lr \(0\.003 in a, 0\.001 in b\).*--allow-mixed"):
        aggregate([sweep], sweep, show=False)
    assert not (sweep / "pareto.json").exists()  # nothing half-written
    summary = aggregate([sweep], sweep, show=False, allow_mixed=True)
    assert [s["name"] for s in summary["setups"]] == ["train.lr=0.003", "train.lr=0.001"]
    flags = {row["run"]: row["frontier_gflops_per_image"] for row in summary["runs"]}
    assert flags == {"a": True, "b": True, "c": True}  # b is worse than a, but on another frontier
    assert (sweep / "pareto.png").stat().st_size > 0

    code, _, err = cli_in_process("pareto", str(sweep), "--wandb-mode", "disabled", cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train.lr" in err


def test_quiet_re_timings_replace_the_training_ones_and_memory_joins_the_axes(tmp_path):
    memory = {"train_peak_mb": 10.0, "infer_peak_mb": 2.0}
    fake_run(tmp_path, "a", "soft", 0.8, 1.0, cost_extra=memory,
             measured={"infer_ms_per_image": 0.25, "latency_ms": 1.5, "date": "2026-11-25", "rounds": 5})
    fake_run(tmp_path, "b", "dense", 0.7, 0.5, cost_extra={"train_peak_mb": 4.0, "infer_peak_mb": 1.0})
    summary = aggregate([tmp_path], tmp_path, show=False)
    rows = {row["run"]: row for row in summary["runs"]}
    assert rows["a"]["infer_ms_per_image"] == 0.25 and rows["a"]["timing"] == "measured inference"
    assert rows["a"]["train_ms_per_image"] == 10.0  # measured without --train: the training-time figure
    assert rows["b"]["infer_ms_per_image"] == 5.0 and rows["b"]["timing"] == "training"
    assert summary["timing"] == {"measured": 1, "training": 1, "train_step_measured": 0}
    assert {"train_peak_mb", "infer_peak_mb"} <= set(summary["cost_axes"])
    assert rows["b"]["frontier_train_peak_mb"] and rows["a"]["frontier_train_peak_mb"]
    fake_run(tmp_path / "old", "c", "dense", 0.7, 0.5)  # an older record without memory: the axis is left out
    assert "train_peak_mb" not in aggregate([tmp_path], tmp_path / "out", show=False)["cost_axes"]


def test_the_plot_explains_every_mark_in_human_units(tmp_path):
    rows, arms = [], []
    for label, router, gflops, params in (("soft E8 p1", "soft", 0.031, 4_000_000), ("dense", "dense", 0.030, 200_000)):
        arms.append({"label": label, "setup": "", "router": router, "top1_mean": 0.5, "top1_ci95": 0.01,
                     "gflops_per_image_mean": gflops, "params_total_mean": params,
                     "frontier_gflops_per_image": True, "frontier_params_total": True})
        rows += [{"label": label, "setup": "", "router": router, "top1": 0.5 + d, "gflops_per_image": gflops,
                  "params_total": params} for d in (-0.01, 0.01)]
    drawn = plot(rows, arms, ["gflops_per_image", "params_total"], "top1", tmp_path / "p.png", "t")
    assert {"soft E8 p1", "dense"} <= set(drawn["legend"])  # a colour per arm...
    assert any("single run" in entry for entry in drawn["legend"])  # ...and every other kind of mark
    assert any("95%" in entry for entry in drawn["legend"]) and any("frontier" in entry for entry in drawn["legend"])
    flops, params = drawn["panels"][("", "gflops_per_image")], drawn["panels"][("", "params_total")]
    assert flops["xscale"] == "linear" and params["xscale"] == "log"  # 30-31 MFLOPs is narrow; 0.2M-4M is not
    assert all(tick.endswith("M") for tick in flops["xticks"])  # 30M, not 0.03 or 3e-2
    assert {"200k", "1M"} <= set(params["xticks"]) and flops["ylabel"] == "test top-1 (%)"


def test_the_end_line_counts_arms_on_no_frontier_apart_from_runs_left_out(tmp_path, capsys):
    from moebench.pareto import print_files
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", "soft", 0.8, 1.0)
    fake_run(sweep, "1", "dense", 0.7, 2.0)  # dearer and worse on every axis: on no frontier
    fake_run(sweep, "2", "tokens_choice", 0.9, 3.0)
    fake_run(sweep, "3", "soft", 0.0, 0.0, status="failed")
    print_files(aggregate([sweep], sweep, show=False))
    assert capsys.readouterr().out.splitlines()[0] == \
        "3 runs in 3 arms, 1 of them on no frontier; 1 run left out (not completed or diverged) ->"


def test_bars_stay_in_0_100_arms_under_3_seeds_are_hollow_and_the_title_names_the_setup(tmp_path):
    from moebench.pareto import plot_title
    from moebench.pareto.records import find_runs
    for seed, top1 in enumerate((0.05, 0.95)):  # 2 seeds far apart: a t-interval of +-571 points
        fake_run(tmp_path, f"soft{seed}", "soft", top1, 1.0, seed=seed)
    summary = aggregate([tmp_path], tmp_path, show=False)
    arm = summary["arms"][0]
    assert arm["seeds"] == 2 and 100 * arm["top1_ci95"] > 500
    drawn = plot(summary["runs"], summary["arms"], ["gflops_per_image"], "top1", tmp_path / "p.png",
                 plot_title(find_runs([tmp_path]), summary["arms"]))
    assert drawn["bars"][("", "gflops_per_image", arm["label"])] == (0.0, 100.0)
    assert any(entry.startswith("hollow: fewer than 3 seeds") for entry in drawn["legend"])
    assert drawn["title"] == "digits, model tiny, 3 epochs: 1 arm, 2 seeds each"


def test_every_pareto_call_on_one_dir_logs_to_one_w_and_b_run(tmp_path):
    # Each `moebench pareto` call used to add another pareto run to the W&B group; wandb.init
    # resumes this id instead (checked by hand offline: both calls write run-<this id>).
    from moebench.pareto.wandb_run import pareto_run_id
    cfg = {"project": "moebench", "entity": None}
    assert pareto_run_id(tmp_path / "s", cfg) == pareto_run_id(tmp_path / "x" / ".." / "s", cfg)
    assert pareto_run_id(tmp_path / "s", cfg) != pareto_run_id(tmp_path / "t", cfg)
    assert pareto_run_id(tmp_path / "s", cfg) != pareto_run_id(tmp_path / "s", {**cfg, "project": "other"})
