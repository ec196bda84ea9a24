"""Config composition and the pieces of the train app that need no training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moebench.errors import ConfigError
from moebench.moe import DenseMLP, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from moebench.build import build_model, conf_dir, validate
from moebench.resolvers import dirname_label
from moebench.loop import lr_factor
from conftest import compose_cfg


def test_defaults_are_the_main_job_on_digits():
    cfg = compose_cfg()
    assert (cfg.router.name, cfg.model.name, cfg.data.name, cfg.wandb.mode) == ("soft", "tiny", "digits", "offline")
    validate(cfg)


@pytest.mark.parametrize("router,cls", [("soft", SoftMoE), ("tokens_choice", TokensChoiceMoE),
                                        ("experts_choice", ExpertsChoiceMoE), ("dense", DenseMLP)])
def test_shortcuts_reach_the_router_and_the_model_places_moe_in_the_second_half(router, cls):
    cfg = compose_cfg(f"router={router}", "experts=6", "slots=2", "k=2", "capacity_factor=1.5")
    validate(cfg)
    model = build_model(cfg, in_chans=1, num_classes=10)
    mlps = [block.mlp for block in model.blocks]
    assert [type(m) for m in mlps] == [DenseMLP, DenseMLP, cls, cls]
    layer = mlps[-1]
    if router == "soft":
        assert (layer.num_experts, layer.slots_per_expert) == (6, 2)
    if router == "tokens_choice":
        assert (layer.num_experts, layer.k, layer.capacity_factor, layer.bpr) == (6, 2, 1.5, True)
    if router == "experts_choice":
        assert (layer.num_experts, layer.capacity_factor, layer.capacity_rounding) == (6, 1.5, "round")
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("preset,dim,depth", [("ti", 192, 12), ("s", 384, 12), ("b", 768, 12)])
def test_model_presets(preset, dim, depth):
    cfg = compose_cfg(f"model={preset}", "data.image_size=32", "experts=2")
    validate(cfg)
    assert (cfg.model.dim, cfg.model.depth) == (dim, depth)
    model = build_model(cfg, in_chans=3, num_classes=10)
    assert sum(isinstance(b.mlp, SoftMoE) for b in model.blocks) == 6


@pytest.mark.parametrize("overrides", [
    ["model.moe.placement=every", "model.moe.n=2"],
    ["model.moe.placement=list", "model.moe.layers=[0,3]"],
])
def test_moe_placement_options(overrides):
    cfg = compose_cfg(*overrides)
    model = build_model(cfg, in_chans=1, num_classes=10)
    moe = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, SoftMoE)]
    assert moe == ([1, 3] if "every" in overrides[0] else [0, 3])


@pytest.mark.parametrize("overrides,needle", [
    (["experts=0"], "experts (router.num_experts) must be an int >= 1, got 0"),
    (["router=tokens_choice", "k=3", "experts=2"], "k (router.k) must be in [1, experts=2]"),
    (["router=experts_choice", "capacity_factor=0"], "capacity_factor (router.capacity_factor) must be a finite number > 0"),
    (["router=tokens_choice", "router.capacity_rounding=floor"], "router.capacity_rounding"),
    (["router.dispatch=hard"], "router.dispatch must be soft, uniform or identity, got 'hard'"),
    (["router=dense", "router.mlp_mult=0"], "router.mlp_mult must be an int >= 1, got 0"),
    (["model.heads=5"], "model.heads=5"),
    (["model.moe.placement=last", "model.moe.n=9"], "model.moe.n must be in [0, depth=4]"),
    (["train.schedule=linear"], "train.schedule"),
    (["router=tokens_choice", "router.granularity=3"], "router.granularity=3 must divide the expert width (model.mlp_dim="),
    (["router=tokens_choice", "k=2", "router.granularity=2", "router.shared_experts=4"],
     "router.shared_experts=4 must be in [0, k * granularity = 4)"),
    (["router=tokens_choice", "router.gate=sigmoid", "router.assignment=sinkhorn"],
     "router.gate=sigmoid and router.assignment=sinkhorn do not combine"),
    (["router=tokens_choice", "router.bias_rate=0.001"], "router.load_weight=0.005 with router.bias_rate > 0"),
    (["router=tokens_choice", "router.bias_rate=0.001", "router.load_weight=0", "router.assignment=sinkhorn"],
     "router.bias_rate > 0 and router.assignment=sinkhorn do not combine"),
])
def test_validate_names_the_key_and_what_is_allowed(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_lr_schedule_warms_up_then_decays():
    f = lambda step, schedule: lr_factor(step, warmup_steps=10, total_steps=110, schedule=schedule)
    assert [f(s, "cosine") for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10, "cosine") == 1.0 and f(60, "cosine") == pytest.approx(0.5) and f(110, "cosine") == pytest.approx(0)
    assert f(39, "rsqrt") == pytest.approx(math.sqrt(10 / 40))
    assert f(100, "constant") == 1.0


def test_sweep_dir_labels_stay_short_and_distinct():
    assert dirname_label("experts=8,router=soft") == "experts=8,router=soft"
    assert "/" not in dirname_label("data.root=/data/cifar,router=soft")
    long_a, long_b = ",".join(f"key{i}=value" for i in range(40)), ",".join(f"key{i}=other" for i in range(40))
    a, b = dirname_label(long_a), dirname_label(long_b)
    assert len(a) < 140 and a != b and a.startswith("key0=value,")


# ----------------------------------------------------------------------------- schema, resume rules, statuses

@pytest.mark.parametrize("router", ["soft", "tokens_choice", "experts_choice", "dense"])
@pytest.mark.parametrize("extra", [[], ["experiment=smoke"], ["model=b", "data=cifar10"]])
def test_the_schema_accepts_every_shipped_preset(router, extra):
    from moebench import schema
    from moebench.preflight import resolve

    schema.check(resolve(compose_cfg(f"router={router}", *extra)))


@pytest.mark.parametrize("overrides,message", [
    (["experts=abc"], "experts (router.num_experts) must be an int >= 1, got 'abc'"),
    (["router=tokens_choice", "router.capacity_rounding=1.5"], "router.capacity_rounding must be an int >= 1, ceil or round"),
    (["train.betas=[0.9,high]"], "train.betas must be a list of floats"),
    (["model.moe.layers=[1,x]"], "model.moe.layers must be a list of ints"),
    (["wandb.mode=on"], "wandb.mode must be offline, online or disabled, got 'on'"),
    (["train.checkpoint_every_steps=0"], "train.checkpoint_every_steps must be an int >= 1 or null, got 0"),
    (["router=tokens_choice", "router.bias_rate=-0.001"], "router.bias_rate must be a finite number >= 0 or null, got -0.001"),
    (["router=tokens_choice", "router.gate=relu"], "router.gate must be softmax, sigmoid or null, got 'relu'"),
    (["router=tokens_choice", "router.granularity=0"], "router.granularity must be an int >= 1 or null, got 0"),
    (["router=tokens_choice", "router.shared_experts=-1"], "router.shared_experts must be an int >= 0 or null, got -1"),
    (["router=tokens_choice", "router.routed_scaling=0"], "router.routed_scaling must be a finite number > 0 or null, got 0"),
])
def test_the_schema_names_the_key_and_what_is_allowed(overrides, message):
    from moebench import schema
    from moebench.preflight import resolve

    with pytest.raises(ConfigError) as err:
        schema.check(resolve(compose_cfg(*overrides)))
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("variant", sorted(p.stem for p in (Path(conf_dir()) / "variant").glob("*.yaml")))
def test_every_variant_validates(variant):
    from moebench import schema
    from moebench.preflight import resolve

    cfg = compose_cfg("experiment=smoke", f"variant={variant}")
    schema.check(resolve(cfg))
    validate(cfg)


def test_unknown_keys_name_the_nearest_known_one():
    from moebench.schema import unknown_key_error

    known = ["experts", "train.epochs", "train.lr", "router.num_experts", "router.k"]
    assert "did you mean experts?" in str(unknown_key_error("expert", known))
    assert "did you mean train.epochs?" in str(unknown_key_error("train.epoch", known))
    assert "did you mean router.num_experts?" in str(unknown_key_error("router.experts", known))
    assert "did you mean" not in str(unknown_key_error("zzz", known))


def test_resume_may_change_only_what_does_not_change_the_result(tmp_path):
    from moebench.checkpoint import check_resume_config
    from moebench.errors import CheckpointError
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(compose_cfg("experiment=smoke"), resolve=True)
    for fine in (["train.epochs=5"], ["train.time_limit_min=3"], ["wandb.mode=online"], ["threads=1"],
                 ["device=cpu"], ["train.checkpoint_every_steps=7"], ["train.log_every=3"]):
        check_resume_config(saved, compose_cfg("experiment=smoke", *fine), tmp_path / "last.pt")
    for changed in ("train.weight_decay=0.1", "train.label_smoothing=0.1", "train.grad_clip=2.0",
                    "train.betas=[0.9,0.95]", "precision=bf16", "compile=true", "seed=1", "router.num_experts=8",
                    "data.val_fraction=0.3", "train.skip_nonfinite_steps=2"):
        with pytest.raises(CheckpointError, match=f": {changed.split('=')[0]} was "):
            check_resume_config(saved, compose_cfg("experiment=smoke", changed), tmp_path / "last.pt")


def test_every_status_has_its_exit_code():
    import signal

    from moebench import status

    assert [status.exit_code(s) for s in ("completed", "stopped", "diverged", "failed")] == [0, 0, 3, 1]
    assert status.exit_code("preempted", signal.SIGTERM) == 143 and status.exit_code("preempted", signal.SIGINT) == 130
    assert status.exit_code("preempted", signal.SIGUSR1) == 138


def test_jobs_that_differ_only_in_keys_their_router_ignores_are_named_before_the_sweep(tmp_path):
    # dense has no experts: `router=soft,dense experts=4,8` trains dense twice, the same run.
    from moebench import preflight
    from moebench.build import conf_dir
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    command = preflight.prepare(["-m", "experiment=smoke", "router=soft,dense", "experts=4,8", sweep], conf_dir())
    assert command.warnings == [
        "2 jobs train the same run (experts=4 | experts=8): experts changes nothing for experiment=smoke "
        f"{sweep} router=dense; each repeats the first, and moebench pareto counts them as one run"]
    command = preflight.prepare(["-m", "experiment=smoke", "router=soft,tokens_choice", "experts=4,8", sweep], conf_dir())
    assert command.warnings == []  # every job its own run


def test_a_sigmoid_gate_over_one_routed_choice_is_one_warning_before_training(tmp_path):
    # its gate is 1 for every token, so the router never learns (test_moe_deepseek pins the gradient)
    from moebench import preflight
    from moebench.build import conf_dir
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    one_routed = ["experiment=smoke", "variant=tc_deepseek_e32", "router.granularity=1", "router.shared_experts=0"]
    command = preflight.prepare(["-m", *one_routed, "seed=0,1", sweep], conf_dir())
    assert [w for w in command.warnings if "router.gate=sigmoid" in w] == [  # once for the sweep
        "router.gate=sigmoid with one routed choice per token: the gate, the chosen score over the chosen scores' "
        "sum, is 1 for every token, so the loss gives the router no gradient (it keeps its initial weights, moved "
        "only by weight decay and any auxiliary loss); route more than one choice or use the softmax"]
    for fine in (["experiment=smoke", "variant=tc_deepseek_e32"], [*one_routed, "router.gate=softmax"]):
        assert preflight.prepare(["-m", *fine, sweep], conf_dir()).warnings == []


def test_jobs_that_differ_only_in_options_a_setting_makes_inert_are_named_before_the_sweep(tmp_path):
    # dropless Tokens Choice has no capacity (nothing to drop, nothing for BPR to order): a sweep over
    # capacity_factor or bpr trains one run several times; with capacity, each job is its own run.
    from moebench import preflight
    from moebench.build import conf_dir
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    command = preflight.prepare(["-m", "experiment=smoke", "router=tokens_choice", "router.dropless=true",
                                 "router.capacity_factor=1.0,2.0", sweep], conf_dir())
    assert len(command.warnings) == 1 and command.warnings[0].startswith("2 jobs train the same run")
    assert "router.capacity_factor changes nothing" in command.warnings[0]
    command = preflight.prepare(["-m", "experiment=smoke", "router=tokens_choice", "router.dropless=true",
                                 "router.bpr=true,false", sweep], conf_dir())
    assert "router.bpr changes nothing" in command.warnings[0]
    command = preflight.prepare(["-m", "experiment=smoke", "router=tokens_choice", "router.capacity_factor=1.0,2.0",
                                 sweep], conf_dir())
    assert command.warnings == []
    # Experts Choice's plan_lr reaches only the sparse_ot plan
    command = preflight.prepare(["-m", "experiment=smoke", "router=experts_choice", "router.plan_lr=0.01,0.1",
                                 "router.assignment=sinkhorn,sparse_ot", sweep], conf_dir())
    assert len(command.warnings) == 1 and command.warnings[0].startswith("2 jobs train the same run")
    assert "(router.plan_lr=0.01 | router.plan_lr=0.1): router.plan_lr changes nothing" in command.warnings[0]
