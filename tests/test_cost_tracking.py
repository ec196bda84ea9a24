"""Cost measurement and run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from moebench.allocator import tune_cpu_allocator
from moebench.cost import Throughput, flops_per_image, measure_inference, peak_memory_mb, reset_peak_memory
from moebench.tracking import RunRecorder, atomic_write_json, read_metrics


def test_flops_per_image_counts_matmuls_per_image_and_restores_mode():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).train()
    assert flops_per_image(model, torch.randn(5, 16)) == 2 * 16 * 32 + 2 * 32 * 4
    assert model.training


def test_cpu_attention_is_counted():
    q = torch.randn(1, 2, 6, 8)
    attention = type("A", (nn.Module,), {"forward": lambda self, x: nn.functional.scaled_dot_product_attention(x, x, x)})
    assert flops_per_image(attention(), q) == 2 * 2 * (2 * 6 * 6 * 8)  # heads x (QK^T + AV)


def test_measure_inference_gives_consistent_positive_figures():
    out = measure_inference(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, repeats=3)
    assert out["infer_images_per_s"] > 0
    assert out["infer_ms_per_image"] == pytest.approx(1e3 / out["infer_images_per_s"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_is_per_run_after_a_reset():
    tune_cpu_allocator()  # as the CLI does: freed memory stays in the process until the reset
    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB resident
    with_big = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < with_big - 32  # the earlier peak is forgotten


def test_throughput_skips_warmup_steps_and_survives_a_resume():
    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 22.0])  # step times: 5 (skipped), 1, 2
    t = Throughput(skip=1, clock=lambda: next(ticks))
    for images in (100, 10, 30):
        t.start()
        t.stop(images)
    assert t.images_per_s == pytest.approx(40 / 3)
    resumed = Throughput(skip=1)
    resumed.load_state_dict(t.state_dict())
    assert resumed.images_per_s == t.images_per_s


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"status": "completed"})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_metrics_lines_and_resume_truncation(tmp_path):
    with RunRecorder(tmp_path, {"a": 1}) as rec:
        for step in (1, 2, 3):
            rec.log({"loss": torch.tensor(1.0 / step)}, step=step)
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    with RunRecorder(tmp_path, {"a": 1}, resume_step=2) as rec:  # checkpoint was at step 2
        rec.log({"loss": 0.1}, step=3)
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_wandb_offline_runs_are_separate_and_carry_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for name in ("a", "b"):
        rec = RunRecorder(tmp_path / name, {"x": 1}, wandb_cfg={"mode": "offline", "project": "t", "name": name})
        rec.log({"loss": 1.0}, step=1)
        rec.write_result({"status": "completed", "cost": {"gflops_per_image": 1.5}, "quality": {"top1": 0.5}})
        assert rec.wandb_run.summary["cost/gflops_per_image"] == 1.5
        ids.append(rec.wandb_run_id)
        rec.finish()
        assert len(list((tmp_path / name / "wandb").glob("offline-run-*/*.wandb"))) == 1
    assert ids[0] != ids[1]
    RunRecorder(tmp_path / "off", {}, wandb_cfg={"mode": "disabled"}).finish()
    assert not (tmp_path / "off" / "wandb").exists()
