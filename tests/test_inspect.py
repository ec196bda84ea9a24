"""`moebench inspect` on real smoke runs: the routing it draws is the routing the layers computed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from moebench.inspection.routing import SoftRouting, capture, moe_layers, rebuild_output, route
from moebench.inspection.summary import LayerSummary
from moebench.moe import SoftMoE
from moebench.runs import load_run, load_run_data

from conftest import moebench

# router_runs (conftest): one run per router on conftest.DIGITS, digits at 8x8 in 2x2 patches (a 4x4 grid of 16
# tokens), 4 experts, the smoke model for 1 epoch; trained once per session (test_cli.py reads them too).
ROUTERS = ("soft", "tokens_choice", "experts_choice")
FIGURES = {
    "soft": {"soft_dispatch_block1.png", "soft_combine.png"},
    "tokens_choice": {"tokens_choice_assignment.png"},
    "experts_choice": {"experts_choice_assignment.png"},
}
COMMON = {"expert_load.png", "position_rate.png", "expert_similarity.png", "training_routing.png"}


def model_and_batch(run_dir):
    loaded = load_run(run_dir)
    data = load_run_data(loaded.config)
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    return loaded.model, (data.test_images[:20].float() / 255 - mean) / std  # 20: groups of 2 and a leftover


@pytest.mark.parametrize("router", ROUTERS)
def test_recomputed_routing_rebuilds_each_layer_output_and_matches_its_metrics(router_runs, router):
    model, images = model_and_batch(router_runs[router])
    for _, layer in moe_layers(model):
        layer.track_routing = True  # the library's own statistics in eval mode, to compare with
    _, seen = capture(model, images)
    assert seen, "no MoE layer captured"
    for name, layer in moe_layers(model):
        x, y = seen[name]
        routing = route(layer, x)
        torch.testing.assert_close(rebuild_output(layer, x, routing), y.float(), atol=1e-5, rtol=1e-4)
        summary = LayerSummary(router, layer.num_experts, x.shape[1])
        summary.add(routing)
        stats = summary.result()
        if isinstance(routing, SoftRouting):
            torch.testing.assert_close(routing.dispatch.sum(1), torch.ones(20, layer.num_slots))
            torch.testing.assert_close(routing.combine.sum(2), torch.ones(20, x.shape[1]))
            assert stats["dispatch_max"] == pytest.approx(float(layer.metrics["dispatch_max"]), rel=1e-5)
            assert stats["combine_max"] == pytest.approx(float(layer.metrics["combine_max"]), rel=1e-5)
            # A wrong routing must not rebuild the output: the check has teeth.
            flipped = SoftRouting(routing.dispatch.flip(1), routing.combine, routing.slots_per_expert)
            assert not torch.allclose(rebuild_output(layer, x, flipped), y.float(), atol=1e-5)
        elif router == "tokens_choice":
            assert bool((routing.processed <= routing.requested).all())
            assert bool((routing.requested.sum(-1) == layer.k).all())
            assert stats["dropped_choices"] == pytest.approx(float(layer.metrics["dropped"]), abs=1e-6)
            assert 0 < stats["dropped_choices"] < 1  # 2 images x 16 tokens into 4 experts of capacity 8: some drop
        else:
            assert stats["tokens_0_experts"] == pytest.approx(float(layer.metrics["tokens_0_experts"]), abs=1e-6)
            # Every expert takes exactly its capacity from each group of 2 images (32 tokens).
            per_group = routing.processed[:20].reshape(10, 2 * 16, -1).sum(1)
            assert bool((per_group == layer.capacity(32)).all())
        assert sum(stats["load_share"]) == pytest.approx(1.0)
        assert sum(stats["first_choice_share"]) == pytest.approx(1.0)


@pytest.mark.parametrize("options", [
    {}, {"dispatch_normalized": True}, {"normalize": False, "scale_init": 8.0},
    {"dispatch": "uniform"}, {"combine": "uniform"}, {"dispatch": "identity", "combine": "identity", "slots_per_expert": 4},
])
def test_inspected_soft_routing_is_the_layers_own_for_every_option(options):
    """The routing `moebench inspect` draws rebuilds the layer's output whatever the options: the
    inspection asks the layer for its routing instead of recomputing it (a copy once drifted by
    0.66 under dispatch_normalized=true)."""
    torch.manual_seed(0)
    layer = SoftMoE(8, 16, num_experts=4, num_tokens=16, **{"slots_per_expert": 2, **options}).eval()
    x = torch.randn(3, 16, 8) * 3  # far from unit norm: normalising the dispatched tokens matters
    with torch.no_grad():
        y = layer(x)
    routing = route(layer, x)
    torch.testing.assert_close(rebuild_output(layer, x, routing), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("router", [pytest.param(r, marks=[] if r == "soft" else pytest.mark.slow) for r in ROUTERS])  # slow: the sparse routers' pictures (one inspect process each)
def test_inspect_writes_the_pictures_the_index_lists_and_the_numbers_behind_them(router_runs, router):
    run_dir = router_runs[router]
    proc = moebench("inspect", str(run_dir), "--images", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "inspect"
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == FIGURES[router] | COMMON
    dir_mode, file_mode = out.stat().st_mode & 0o777, (out / "index.md").stat().st_mode & 0o777
    assert dir_mode == file_mode | ((file_mode & 0o444) >> 2)  # readable by whoever may read its files (was 0700)
    for name in pngs:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    index = (out / "index.md").read_text()
    assert set(re.findall(r"\]\(([^)]+\.png)\)", index)) == pngs  # every picture linked, no dead link

    record = json.loads((out / "inspect.json").read_text())
    assert record["router"] == router and record["shown_test_images"] == [0, 1, 2]
    assert record["stats_test_images"] == 64 and record["patch_grid"] == [4, 4]
    assert {f["file"] for f in record["figures"]} == pngs
    assert max(record["agreement_max_abs_diff"].values()) < 1e-5
    for layer, stats in record["layers"].items():
        assert sum(stats["load_share"]) == pytest.approx(1.0)
        grid = np.asarray(stats["position_rate"])
        assert grid.shape == (4, 4)
        if router == "soft":
            assert grid.mean() == pytest.approx(1.0)  # dispatch mass over all slots, relative to uniform
        else:
            assert ((grid >= 0) & (grid <= 1)).all()
        assert -1 <= stats["expert_similarity_offdiag_min"] <= stats["expert_similarity_offdiag_mean"] <= 1

    arrays = np.load(out / "routing.npz")
    for layer in record["layers"]:
        if router == "soft":
            dispatch = arrays[f"{layer}/dispatch"]
            assert dispatch.shape == (3, 16, 4)
            np.testing.assert_allclose(dispatch.sum(1), 1.0, rtol=1e-5)  # each slot's map sums to 1 over the patches
            np.testing.assert_allclose(arrays[f"{layer}/combine"].sum(2), 1.0, rtol=1e-5)
            top = arrays[f"{layer}/combine_top_slot"]
            assert (top.reshape(3, 16) == arrays[f"{layer}/combine"].argmax(2)).all()
        else:
            processed, requested = arrays[f"{layer}/processed"], arrays[f"{layer}/requested"]
            assert processed.shape == (3, 16, 4) and (processed <= requested).all()
            none = arrays[f"{layer}/top_processing_expert"].reshape(3, 16) == -1
            assert (none == ~processed.any(-1)).all()  # the crossed-out patches are the unprocessed tokens
    curves = record["training_curves"]
    assert any(key.endswith("entropy") for key in curves), curves.keys()


@pytest.mark.slow  # W&B's service start
def test_inspect_logs_to_the_runs_own_wandb_run_only_when_it_used_wandb(router_runs):
    soft, tokens = router_runs["soft_wandb"], router_runs["tokens_choice"]
    for run_dir in (soft, tokens):
        if not (run_dir / "inspect").exists():
            assert moebench("inspect", str(run_dir), "--images", "2").returncode == 0
    run_id = torch.load(soft / "last.pt", weights_only=True)["wandb_id"]
    offline = sorted((soft / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # the training run, then the inspect resume of the same id
    logged = {re.sub(r"_\d+_[0-9a-f]+\.png$", ".png", p.name)
              for p in (offline[-1] / "files" / "media" / "images" / "inspect").glob("*.png")}
    record = json.loads((soft / "inspect" / "inspect.json").read_text())
    assert logged == {f["file"] for f in record["figures"]}
    assert not (tokens / "wandb").exists()  # W&B disabled for that run: nothing logged


def test_dense_run_has_no_routing_to_draw_and_bad_input_is_one_line(router_runs, tmp_path, cli_in_process):
    # in this process, like the refusals below (a fresh one spends seconds importing torch first; the
    # Soft MoE pictures above are the fresh-process `moebench inspect`)
    code, _, err = cli_in_process("inspect", str(router_runs["dense"]), cwd=tmp_path)
    assert code == 0, err[-3000:]
    out = router_runs["dense"] / "inspect"
    assert not list(out.glob("*.png")) and "no routing to draw" in (out / "index.md").read_text()
    for args, needle in ((["--images", "0"], "--images"), (["--checkpoint", "nope.pt"], "nope.pt")):
        code, _, err = cli_in_process("inspect", str(router_runs["dense"]), *args, cwd=tmp_path)
        assert code == 2 and needle in err and "Traceback" not in err
    code, _, err = cli_in_process("inspect", str(tmp_path / "missing"), cwd=tmp_path)
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1
