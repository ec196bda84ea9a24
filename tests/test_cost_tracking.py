"""Cost measurement and run records."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from moebench.allocator import tune_cpu_allocator
from moebench.cost import LiveTensorBytes, Throughput, flops_per_image, infer_peak_mb, measure_inference
from moebench.cost import peak_memory_mb, reset_peak_memory, train_peak_mb, train_step_call, warm_up
from moebench.moe import TokensChoiceMoE, collect_aux_loss, track_routing
from moebench.tracking import RunRecorder, atomic_write_json, read_metrics


def test_flops_per_image_counts_matmuls_per_image_and_restores_mode():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).train()
    assert flops_per_image(model, torch.randn(5, 16)) == 2 * 16 * 32 + 2 * 32 * 4
    assert model.training


def test_training_compute_counts_what_remoe_training_forwards_did():
    # ReMoE's cost falls as its gates sparsify: the training FLOPs are those of the training forwards,
    # not 3 x the final forward's per image x images (a fresh layer passes about half its gates).
    from torch.utils.flop_counter import FlopCounterMode

    from moebench.cost import CUSTOM_FLOPS, flops_by_module, train_gflops_total
    from moebench.moe import ReMoE, update_l1_coefficient

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), ReMoE(8, 16, 4, k=1)).train()
    counted, images = 0.0, 0
    for step in range(3):
        x = torch.randn(2 + step, 6, 8)
        with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            y = model(x)  # the training forward (3x: its backward, which cost.py counts as two forwards)
        y.sum().backward()
        counted += counter.get_total_flops()
        images += x.shape[0]
        update_l1_coefficient(model)
        with torch.no_grad():  # move the gates: the final forward's cost differs from the training ones'
            model[1].gate.weight.sub_(0.3)
    example = torch.randn(5, 6, 8)
    module_flops = flops_by_module(model, example)
    assert module_flops["0"] == 2 * 8 * 8 * 6 and module_flops[""] > module_flops["1"] > 0
    naive = train_gflops_total(module_flops[""] / 1e9, images)
    exact = train_gflops_total(module_flops[""] / 1e9, images, model, module_flops)
    assert exact != pytest.approx(naive)
    assert exact == pytest.approx(3 * counted / 1e9, rel=1e-12)
    # the counts are state: float64 in a half model, carried by the state dict
    state = model.half().state_dict()
    assert state["1.trained_gates"].dtype == torch.float64 and state["1.trained_gates"][1] == images * 6 * 4


def test_cpu_attention_is_counted():
    q = torch.randn(1, 2, 6, 8)
    attention = type("A", (nn.Module,), {"forward": lambda self, x: nn.functional.scaled_dot_product_attention(x, x, x)})
    assert flops_per_image(attention(), q) == 2 * 2 * (2 * 6 * 6 * 8)  # heads x (QK^T + AV)


def test_measure_inference_reports_the_median_call_per_image(monkeypatch):
    """Scripted call times: the figures are the median call (not the mean, not the first) over
    the batch's images, whatever the machine's speed."""
    from moebench import cost

    calls = iter([0.4, 0.1, 0.2, 0.3, 0.5])  # seconds per batch of 4; median 0.3, mean 0.3 + 0
    monkeypatch.setattr(cost, "warm_up", lambda *args, **kwargs: 1)
    monkeypatch.setattr(cost, "timed", lambda call, device: (call(), next(calls))[1])
    out = measure_inference(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, repeats=5)
    assert out == {"infer_images_per_s": pytest.approx(4 / 0.3), "infer_ms_per_image": pytest.approx(1e3 * 0.3 / 4)}
    calls = iter([0.1, 0.1, 0.7])  # median 0.1, mean 0.3: the median must win
    out = measure_inference(nn.Linear(8, 8), torch.randn(2, 8), warmup=1, repeats=3)
    assert out["infer_ms_per_image"] == pytest.approx(1e3 * 0.1 / 2)


def test_measure_inference_times_each_precision():
    for precision in ("fp32", "bf16"):
        out = measure_inference(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, repeats=3, precision=precision)
        assert out["infer_images_per_s"] > 0 and out["infer_ms_per_image"] > 0


def test_a_compiled_model_is_what_gets_timed():
    class Compiled(nn.Module):  # like torch.compile's wrapper: no len(), so no truth value either
        calls = 0

        def __len__(self):
            raise TypeError("no len()")

        def forward(self, x):
            Compiled.calls += 1
            return x

    measure_inference(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, repeats=3, compiled=Compiled())
    assert Compiled.calls >= 4


def test_a_timed_training_step_trains_the_model_without_routing_statistics():
    model = nn.Sequential(TokensChoiceMoE(8, 16, 4, group_size=2), nn.Flatten(1), nn.Linear(48, 3))
    track_routing(model, "train")  # as the trainer has it
    step = train_step_call(model, torch.randn(2, 6, 8), torch.tensor([0, 2]), aux_loss=collect_aux_loss)
    step()
    layer = step.model[0]
    assert layer.metrics == {} and layer.aux_loss.requires_grad  # the objective, not the statistics
    assert model[0].track_routing == "train"  # the trained model keeps its own setting


def test_warm_up_goes_on_until_the_times_settle_and_a_minimum_time_has_passed():
    def fake(durations):
        durations = iter(durations)
        return lambda fn, device: next(durations)

    cpu = torch.device("cpu")
    # The first call (compiling, say) is left out; then the median of the last 3 calls must agree
    # with that of the 3 before: 0.01 (calls 7-9) against 0.01 (0.03, 0.01, 0.01: calls 4-6).
    slow_start = [1.0, 0.05, 0.04, 0.03] + [0.01] * 20
    assert warm_up(lambda: None, cpu, min_seconds=0.0, tolerance=0.1, time_call=fake(slow_start)) == 9
    # 0.05 + 0.04 + 0.03 + 6 x 0.01 = 0.18 s after 10 calls
    assert warm_up(lambda: None, cpu, min_seconds=0.175, tolerance=0.1, time_call=fake(slow_start)) == 10
    assert warm_up(lambda: None, cpu, min_seconds=0.0, min_calls=12, time_call=fake(slow_start)) == 12
    never_settles = [10.0] + [0.01, 0.03] * 100
    assert warm_up(lambda: None, cpu, min_seconds=0.0, max_seconds=0.19, time_call=fake(never_settles)) == 11  # the cap
    assert warm_up(lambda: None, cpu, min_seconds=0.3, max_seconds=0.19, time_call=fake(never_settles)) == 17
    assert warm_up(lambda: time.sleep(0.001), cpu, min_seconds=0.0, tolerance=10.0) == 7  # real calls


def test_live_tensor_bytes_counts_what_is_alive_at_once():
    x = torch.zeros(1000)  # 4000 bytes
    with LiveTensorBytes() as live:
        live.track(x)
        for _ in range(5):
            y = x + 1  # created and freed: one at a time
            del y
        a = x + 1
        b = a.view(10, 100)  # a view: no new storage
        a.resize_(2000)  # grown in place
    assert live.peak == 4000 + 8000 and live.current == 4000 + 8000
    del a, b
    assert live.current == 4000


def test_inference_peak_is_parameters_input_and_the_largest_live_activations():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    params = sum(p.numel() for p in model.parameters()) * 4
    # Inside Sequential, the first Linear's output lives until the GELU has made its own.
    expected = params + 5 * 16 * 4 + 2 * 5 * 32 * 4
    assert infer_peak_mb(model, torch.randn(5, 16)) * 2**20 == expected
    model(torch.randn(5, 16)).sum().backward()  # a trained model's leftover gradients are not served
    assert infer_peak_mb(model, torch.randn(5, 16)) * 2**20 == expected


def vit(experts: int = 4, router: str = "soft"):
    from moebench.moe import SoftMoE, TokensChoiceMoE
    from moebench.vit import ViT

    make = {"soft": lambda _: SoftMoE(32, 64, num_experts=experts, slots_per_expert=1, num_tokens=16),
            "tokens_choice": lambda _: TokensChoiceMoE(32, 64, num_experts=experts, k=1)}[router]
    torch.manual_seed(0)
    return ViT(image_size=16, patch_size=4, in_chans=3, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64,
               moe_blocks=[1], make_moe=make)


def test_model_memory_grows_with_batch_and_experts_and_is_deterministic():
    images, labels = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    for router in ("soft", "tokens_choice"):
        model = vit(router=router)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train = train_peak_mb(model, images[:16], labels[:16])
        assert train == train_peak_mb(model, images[:16], labels[:16])  # the same model: the same figure
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # trained on a copy
        assert train_peak_mb(model, images, labels) > train  # a bigger batch
        assert train_peak_mb(vit(16, router), images[:16], labels[:16]) > train  # a bigger model
        infer = infer_peak_mb(model, images[:16])
        assert infer == infer_peak_mb(model, images[:16]) and infer < train
        assert infer_peak_mb(model, images) > infer
        assert train_peak_mb(model, images[:16], labels[:16], "bf16") > 0


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
    # killed before its first checkpoint, the run starts again from step 0: the old lines go
    with RunRecorder(tmp_path, {"a": 1}) as rec:
        rec.log({"loss": 0.5}, step=1)
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1]


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
