"""The committed results still aggregate as committed (experiments/check_pareto_records.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_pareto_records", ROOT / "experiments" / "check_pareto_records.py")
check_pareto_records = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_pareto_records)


def test_every_committed_pareto_json_aggregates_as_committed(capsys):
    assert check_pareto_records.main([]) == 0, capsys.readouterr().out


def test_the_check_sees_a_changed_number_and_a_changed_label(tmp_path):
    committed = json.loads((ROOT / "experiments/results/cifar10_routers/pareto.json").read_text())
    changed = json.loads(json.dumps(committed))
    changed["runs"][0]["top1"] += 0.01  # one seed's accuracy: its arm's mean, std and interval move
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "pareto.json").write_text(json.dumps(changed))
    found = check_pareto_records.check(tmp_path / "a" / "pareto.json")
    assert any("top1_mean" in line for line in found) and any("top1_ci95" in line for line in found)
    relabelled = json.loads(json.dumps(committed))
    relabelled["runs"][1]["experts"] = 99
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pareto.json").write_text(json.dumps(relabelled))
    assert any("E99" in line for line in check_pareto_records.check(tmp_path / "b" / "pareto.json"))


def test_a_csv_of_rows_with_different_keys_keeps_every_column(tmp_path):
    # pooled records of different ages: a newer run records a cost an older one lacks
    import csv

    from moebench.pareto import write_csv

    write_csv([{"label": "old", "top1": 0.5}, {"label": "new", "top1": 0.6, "train_gflops_total": 12.0}],
              tmp_path / "rows.csv")
    rows = list(csv.DictReader((tmp_path / "rows.csv").open()))
    assert rows == [{"label": "old", "top1": "0.5", "train_gflops_total": ""},
                    {"label": "new", "top1": "0.6", "train_gflops_total": "12.0"}]
