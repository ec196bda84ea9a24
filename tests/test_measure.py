"""`moebench measure`: quiet re-timing of finished runs, written into result.json, preferred by pareto."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from moebench import cost
from moebench.measure import Subject, record, time_rounds
from moebench.measure import main as measure_main

from conftest import moebench


def test_rounds_rotate_the_order_and_the_record_keeps_medians_over_rounds(monkeypatch):
    monkeypatch.setattr(cost, "WARMUP_MAX_S", 0.01)  # no-op calls may never settle
    order = []
    subjects = [Subject(Path(name), name, {"precision": "bf16"},
                        {"infer": (lambda name=name: order.append(name), 4), "latency": (lambda: None, 1)})
                for name in "abc"]
    time_rounds(subjects, rounds=3, repeats=2, device=torch.device("cpu"), warmup_s=0.0)
    timed = [name for name in order[-18:]]  # after the warm-up: 3 rounds x 3 runs x 2 calls
    assert timed[::2] == list("abc" "bca" "cab")
    subject = subjects[0]
    subject.rounds = {"infer": [0.004, 0.100, 0.008], "latency": [0.001, 0.002, 0.003]}  # one disturbed round
    out = record(subject, rounds=3, repeats=2, threads=1, device=torch.device("cpu"), together=3)
    assert out["infer_ms_per_image"] == pytest.approx(1e3 * 0.008 / 4) and out["latency_ms"] == pytest.approx(2.0)
    assert out["infer_images_per_s"] == pytest.approx(4 / 0.008) and "train_images_per_s" not in out
    assert out["precision"] == "bf16" and out["rounds"] == 3 and out["round_ms"]["infer"][1] == pytest.approx(100)
    assert {"date", "threads", "machine", "device", "runs_measured_together"} <= set(out) and out["machine"]["cpu"]


def test_measure_rewrites_only_cost_measured_and_pareto_prefers_it(tmp_path, tiny_run, bf16_run, cli_in_process):
    sweep = tmp_path / "sweep"  # conftest's session runs (fp32 Soft MoE, bf16 Tokens Choice) as two jobs of a sweep
    shutil.copytree(tiny_run, sweep / "0_fp32")
    shutil.copytree(bf16_run, sweep / "1_bf16")
    failed = sweep / "9_failed"
    failed.mkdir()
    (failed / "result.json").write_text(json.dumps({"status": "failed", "error": "boom", "config": {}}))
    (sweep / "8_running" / ".hydra").mkdir(parents=True)
    runs = sorted(p.parent for p in sweep.glob("*/last.pt"))
    assert len(runs) == 2
    before = {run: json.loads((run / "result.json").read_text()) for run in runs}

    proc = moebench("measure", str(sweep), "--rounds", "2", "--repeats", "1", "--train", "--threads", "1",
                    "--warmup-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped {failed.resolve()} (status failed)" in proc.stdout
    assert f"skipped {(sweep / '8_running').resolve()} (status unfinished)" in proc.stdout
    for run in runs:
        after = json.loads((run / "result.json").read_text())
        measured = after.pop("cost_measured")
        assert after == before[run]  # every other key kept as it was
        assert len(measured["round_ms"]["infer"]) == 2 and measured["threads"] == 1
        assert measured["runs_measured_together"] == 2 and measured["batch_size"] == 8
        for key in ("infer_ms_per_image", "latency_ms", "train_images_per_s"):
            assert measured[key] > 0, key
        assert measured["precision"] == after["config"]["precision"] and measured["compile"] is False
        for key in ("train_peak_mb", "infer_peak_mb"):  # deterministic: the same as measured after training
            assert measured[key] == after["cost"][key] > 0, key
        assert measured["infer_ms_per_image"] == pytest.approx(statistics.median(measured["round_ms"]["infer"]) / 8)
    assert {json.loads((run / "result.json").read_text())["cost_measured"]["precision"] for run in runs} == {"fp32", "bf16"}
    assert json.loads((failed / "result.json").read_text()) == {"status": "failed", "error": "boom", "config": {}}

    # in this process (test_pareto.py runs the command in a fresh one); fp32 and bf16: two setups
    code, out, err = cli_in_process("pareto", str(sweep), "--wandb-mode", "disabled", "--allow-mixed", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "timings from `moebench measure` (cost_measured) for 2 of 2 runs" in out
    rows = json.loads((sweep / "pareto.json").read_text())["runs"]
    for row in rows:
        measured = json.loads((sweep / row["run"] / "result.json").read_text())["cost_measured"]
        assert row["timing"] == "measured" and row["infer_ms_per_image"] == measured["infer_ms_per_image"]
        assert row["train_ms_per_image"] == pytest.approx(measured["train_ms_per_image"])


def test_measure_errors_are_one_line(tmp_path, capsys, cli_in_process):
    # through the CLI in this process (the test above runs `moebench measure` in a fresh one): exit code, one line
    code, _, err = cli_in_process("measure", str(tmp_path / "nope"), cwd=tmp_path)
    assert code == 2 and err.strip() == f"moebench: error: {tmp_path / 'nope'}: no such run or sweep directory"
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "completed", "config": {}}))
    (run / "last.pt").write_bytes(b"not a checkpoint")
    assert measure_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {run / 'last.pt'}" in err and "no completed run with a checkpoint to measure" in err
    assert len(err.strip().splitlines()) == 2
    assert measure_main([str(tmp_path), "--rounds", "0"]) == 2
    assert capsys.readouterr().err == ("moebench: error: argument --rounds: must be >= 1, got 0; "
                                       "see `moebench measure --help`\n")
