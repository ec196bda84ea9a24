"""model=timm: a timm ViT as the backbone, the MLPs of its MoE blocks replaced by moebench routers.

The smoke preset shrinks any timm ViT to 2 blocks of width 16 on 8x8 images
(patch 4: 4 patches and timm's class token = 5 tokens), so everything runs in
seconds and offline (``pretrained=false``; pretrained weights come from a local
file where a test needs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from moebench import cost
from moebench.errors import ConfigError
from moebench.moe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, weight_decay_split
from moebench.build import build_model, conf_dir, validate

import conftest
from conftest import ENV, moebench

timm = pytest.importorskip("timm")
from timm.layers import Mlp  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

SMOKE = ["experiment=smoke", "model=timm"]
ROUTERS = {"soft": SoftMoE, "tokens_choice": TokensChoiceMoE, "experts_choice": ExpertsChoiceMoE, "dense": Mlp}


def compose_cfg(*overrides: str):
    return conftest.compose_cfg(*SMOKE, *overrides)


def images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_blocks_are_moebench_routers_inside_timms_own_model(router):
    cfg = compose_cfg(f"router={router}")
    validate(cfg)
    model = build_model(cfg, in_chans=3, num_classes=10)
    assert isinstance(model, VisionTransformer)  # timm's class, not a copy
    assert [type(block.mlp) for block in model.blocks] == [Mlp, ROUTERS[router]]  # MoE in the second half
    assert model(images(2)).shape == (2, 10)
    if router != "dense":
        layer = model.blocks[1].mlp
        assert (layer.num_experts, layer.experts.dim, layer.experts.hidden_dim) == (4, 16, 32)

    every = build_model(compose_cfg(f"router={router}", "model.moe.placement=every", "model.moe.n=1"), 3, 10)
    assert [type(block.mlp) for block in every.blocks] == [ROUTERS[router]] * 2


@pytest.mark.parametrize("router", ["soft", "tokens_choice", "experts_choice"])
def test_flops_equal_moebench_vit_of_the_same_shape(router):
    """timm's ViT with a class token is moebench's ViT with pool=cls: 5 tokens, same matmuls."""
    timm_model = build_model(compose_cfg(f"router={router}"), 3, 10)
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        own = build_model(compose("train", overrides=["experiment=smoke", f"router={router}", "model.pool=cls"]), 3, 10)
    assert cost.flops_per_image(timm_model, images()) == cost.flops_per_image(own, images())
    if router == "soft":  # and the analytic count (tests/test_cli.py), with 5 tokens
        t, d, h, s, classes, patch_pixels = 5, 16, 32, 4, 10, 3 * 4 * 4
        attention = 2 * t * d * 3 * d + 2 * t * d * d + 4 * t * t * d
        expected = 2 * 4 * d * patch_pixels + 2 * attention + 4 * t * d * h + 6 * t * s * d + 4 * s * d * h \
            + 2 * d * classes
        assert cost.flops_per_image(timm_model, images()) == expected


def test_weight_decay_on_kernels_only():
    model = build_model(compose_cfg("router=tokens_choice"), 3, 10)
    decay, no_decay = weight_decay_split(model)
    kernels = ("patch_embed.proj.weight", "qkv.weight", "attn.proj.weight", "fc1.weight", "fc2.weight",
               "experts.w1", "experts.w2", "gate.weight", "head.weight")
    assert set(decay) == {name for name, _ in model.named_parameters() if name.endswith(kernels)}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.weight", "blocks.1.mlp.experts.b1",
            "blocks.0.attn.qkv.bias"} <= set(no_decay)


@pytest.mark.parametrize("router", ["tokens_choice", "soft"])
def test_pretrained_weights_upcycle_into_every_expert(tmp_path, router):
    """pretrained=true from a local weights file (offline): timm loads them, each expert is a copy
    of its block's MLP, the router's own parameters are fresh."""
    dense = build_model(compose_cfg("router=dense"), 3, 10)
    weights = tmp_path / "weights.pth"
    torch.save(dense.state_dict(), weights)
    cfg = compose_cfg(f"router={router}", "model.pretrained=true", f"model.pretrained_file={weights}")
    validate(cfg)
    model = build_model(cfg, 3, 10)
    state, source = model.state_dict(), dense.state_dict()
    for name in ("pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight",
                 "blocks.1.attn.qkv.weight", "norm.weight"):
        assert torch.equal(state[name], source[name]), name
    mlp, layer = dense.blocks[1].mlp, model.blocks[1].mlp
    x = torch.randn(4, 7, 16)
    per_expert = layer.experts(x.reshape(1, 28, 16).expand(4, -1, -1))
    for e in range(4):
        torch.testing.assert_close(per_expert[e].reshape(4, 7, 16), mlp(x))
    fresh = build_model(cfg, 3, 10, load_pretrained=False)  # a resume: the weights come from the checkpoint
    assert not torch.equal(fresh.blocks[1].mlp.experts.w1[0], mlp.fc1.weight.t())

    kept = build_model(compose_cfg(f"router={router}", "model.pretrained=true", f"model.pretrained_file={weights}",
                                   "model.upcycle=false"), 3, 10)
    assert torch.equal(kept.state_dict()["pos_embed"], source["pos_embed"])
    assert not torch.equal(kept.blocks[1].mlp.experts.w1[0], mlp.fc1.weight.t())  # fresh experts


@pytest.mark.parametrize("overrides,message", [
    (["model.name=vit_smal_patch16_224"], "model.name='vit_smal_patch16_224' is not a timm model; did you mean "
     "vit_small_patch16_224? list them with: python -c \"import timm; print(timm.list_models('vit_*'))\""),
    (["model.patch_size=3"], "data.image_size=8 is not divisible by the patch size 3 of vit_small_patch16_224"),
    (["model.img_size=16"], "model.img_size=16 differs from data.image_size=8"),
    (["model.heads=3"], "timm cannot build vit_small_patch16_224 with"),
    (["model.moe.placement=list", "model.moe.layers=[2]"], "model.moe.layers [2] out of range: blocks are 0..1"),
    (["model.name=mixer_s16_224", "data.image_size=32", "model.patch_size=null", "model.dim=null", "model.depth=null",
      "model.heads=null", "model.mlp_dim=null"],  # MLP-Mixer: its blocks have mlp_tokens and mlp_channels
     "moebench replaces blocks[i].mlp, and this timm model has no such blocks"),
    (["model.pretrained=true", "model.pretrained_file=/nonexistent.pth"], "no such file"),
    (["router=tokens_choice", "router.granularity=3"],
     "router.granularity=3 must divide the expert width (the MLP width of vit_small_patch16_224: "),
])
def test_config_errors_name_the_key(overrides, message):
    """What preflight prints as one line (exit 2, no run dir) before any work."""
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_moebench_vit_refuses_null_sizes():
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["model.dim=null"])
    with pytest.raises(ConfigError, match="model.dim=null: moebench's ViT needs a value"):
        validate(cfg)


# ----------------------------------------------------------------------------- the CLI, end to end

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`moebench train -m experiment=smoke model=timm router=soft,tokens_choice`: two runs and their Pareto files."""
    sweep = tmp_path_factory.mktemp("timm") / "sweep"
    proc = moebench("train", "-m", *SMOKE, "router=soft,tokens_choice", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def run_of(sweep, router):
    return next(p for p in sweep.iterdir() if p.name.endswith(f"router={router}"))


@pytest.mark.slow  # a sweep of timm models
@pytest.mark.parametrize("router,metric", [("soft", "combine_entropy"), ("tokens_choice", "dropped")])
def test_smoke_runs_train_measure_and_record(sweep, router, metric):
    run_dir = run_of(sweep, router)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["config"]["model"]["name"] == "vit_small_patch16_224"
    if router == "soft":
        assert result["cost"]["gflops_per_image"] * 1e9 == pytest.approx(50496, rel=1e-9)  # as counted above
    else:
        assert result["cost"]["params_active"] < result["cost"]["params_total"]
    assert {"pos_embed", "cls_token"} <= set(result["optimizer"]["no_decay"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(f"routing/blocks.1.mlp/{metric}" in line for line in lines)
    assert any(key.startswith("diagnostics/blocks.1.mlp/") for line in lines for key in line)


@pytest.mark.slow  # a sweep of timm models
def test_pareto_and_inspect_work_on_timm_runs(sweep):
    from moebench.inspection.report import inspect_run

    pareto = json.loads((sweep / "pareto.json").read_text())
    assert sorted(row["router"] for row in pareto["runs"]) == ["soft", "tokens_choice"]
    for router in ("soft", "tokens_choice"):
        record = inspect_run(run_of(sweep, router), images=2, log_wandb=False)
        assert record["patch_grid"] == [2, 2]  # the class token is left off the picture
        assert max(record["agreement_max_abs_diff"].values()) < 1e-4  # the pictures show what the model did
        assert (run_of(sweep, router) / "inspect" / "index.md").is_file()


@pytest.mark.slow  # timm's import and a failing job in a fresh process; the in-process timm tests above stay
def test_pretrained_offline_is_one_line(tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # never touches the network
    run_dir = tmp_path / "run"
    proc = moebench("train", *SMOKE, "model.pretrained=true", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moebench: error:")]
    assert errors == ["moebench: error: model.pretrained=true: cannot get timm's pretrained weights of "
                      "vit_small_patch16_224: HF_HUB_OFFLINE is set and they are not cached; run once online "
                      "to cache them (HF_HOME) or use model.pretrained=false"]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_resume_and_torchrun(tmp_path):
    """A timm run resumes from its checkpoint (pretrained weights are not fetched again), and trains
    under torchrun with experts sharded over 2 processes."""
    weights = tmp_path / "weights.pth"
    torch.save(build_model(compose_cfg("router=dense"), 3, 10).state_dict(), weights)
    args = [*SMOKE, "router=tokens_choice", "model.pretrained=true", f"model.pretrained_file={weights}"]
    proc = moebench("train", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = moebench("train", *args, "train.epochs=2", f"resume={tmp_path / 'run'}",
                    env={**ENV, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["epochs_completed"] == 2

    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
                "-m", "moebench", "train", *SMOKE, "router=tokens_choice", "expert_parallel=true",
                f"hydra.run.dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(torchrun, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["status"] == "completed" and result["processes"] == 2 and result["expert_parallel"]
