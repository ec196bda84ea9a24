"""Sparse upcycling (init_from): what an upcycled model starts as, what is refused, and the CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from moebench import pareto, preflight, upcycle
from moebench.errors import CheckpointError, UserError
from moebench.moe import DenseMLP, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from moebench.build import build_model, conf_dir, validate

import conftest
from conftest import moebench, result

ROUTERS = {"soft": [], "tokens_choice": ["router.group_size=2"], "experts_choice": ["router.group_size=2"]}
IN_CHANS, CLASSES = 3, 10  # experiment=smoke's synthetic data


def compose_cfg(*overrides: str):
    return conftest.compose_cfg("experiment=smoke", *overrides)


def model_of(seed: int, *overrides: str, classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(compose_cfg(*overrides), IN_CHANS, classes)


def trained_dense(seed: int = 7) -> nn.Module:
    """A dense model whose weights are all non-trivial (the zero-init head too)."""
    model = model_of(seed, "router=dense")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def save_checkpoint(path: Path, model: nn.Module, *overrides: str, step: int = 3, **extra) -> Path:
    """A checkpoint as training writes it (the fields load_checkpoint requires), without training."""
    config = OmegaConf.to_container(compose_cfg(*overrides), resolve=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1, "step": step, "config": config, **extra},
               path)
    return path


# ----------------------------------------------------------------------------- what the upcycled model is

@pytest.mark.parametrize("router", list(ROUTERS))
def test_experts_copy_the_dense_mlp_the_rest_is_copied_and_the_router_is_fresh(router):
    dense = trained_dense()
    source = dense.state_dict()
    model = model_of(0, f"router={router}", *ROUTERS[router])
    scratch = model_of(0, f"router={router}", *ROUTERS[router]).state_dict()  # the same run from scratch
    done = upcycle.upcycle_(model, source)
    state = model.state_dict()

    assert done["upcycled"] == ["blocks.1.mlp"]  # experiment=smoke: the second of 2 blocks is MoE
    experts = model.blocks[1].mlp.experts
    for e in range(experts.num_experts):
        assert torch.equal(experts.w1[e], source["blocks.1.mlp.fc1.weight"].t())
        assert torch.equal(experts.b1[e], source["blocks.1.mlp.fc1.bias"])
        assert torch.equal(experts.w2[e], source["blocks.1.mlp.fc2.weight"].t())
        assert torch.equal(experts.b2[e], source["blocks.1.mlp.fc2.bias"])
    copied = [key for key in state if not key.startswith("blocks.1.mlp.")]
    assert len(copied) == done["copied"] and "head.weight" in copied and "blocks.0.mlp.fc1.weight" in copied
    for key in copied:
        assert torch.equal(state[key], source[key]), key
    fresh = {"soft": ["blocks.1.mlp.phi", "blocks.1.mlp.scale"]}.get(router, ["blocks.1.mlp.gate.weight"])
    assert done["fresh"] == fresh
    for key in fresh:  # exactly what the run from scratch draws with this seed
        assert torch.equal(state[key], scratch[key]), key


def test_the_dense_control_is_the_source_model_exactly():
    dense = trained_dense().eval()
    model = model_of(0, "router=dense")
    done = upcycle.upcycle_(model, dense.state_dict())
    assert done == {"copied": len(dense.state_dict()), "upcycled": [], "fresh": []}
    images = torch.randn(5, IN_CHANS, 8, 8)
    assert torch.equal(model.eval()(images), dense(images))


def upcycled_layer(layer: nn.Module, dim: int = 16, hidden: int = 32) -> tuple[nn.Module, DenseMLP]:
    """``layer`` with its experts upcycled from a random dense MLP (names as in a ViT block)."""
    torch.manual_seed(3)
    mlp = DenseMLP(dim, hidden)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(std=0.3)
    holder = nn.ModuleDict({"mlp": layer})
    upcycle.upcycle_(holder, {f"mlp.{key}": value for key, value in mlp.state_dict().items()})
    return layer.eval(), mlp.eval()


def test_what_each_router_computes_at_the_start():
    """Every expert is the dense MLP, so a token gets MLP(its expert input) x the router's weights."""
    x = torch.randn(4, 9, 16)
    # Tokens Choice top-1, nothing dropped (capacity = every token): the top gate x the dense output.
    tc, mlp = upcycled_layer(TokensChoiceMoE(16, 32, num_experts=4, k=1, capacity_factor=4.0, group_size=2))
    top_gate = torch.softmax(x @ tc.gate.weight.t(), dim=-1).amax(-1, keepdim=True)
    torch.testing.assert_close(tc(x), top_gate * mlp(x), rtol=1e-5, atol=1e-6)
    # The gates sum to 1: k = E (no drops), or Experts Choice with every expert taking every token,
    # is exactly the dense model.
    tc_all, mlp = upcycled_layer(TokensChoiceMoE(16, 32, num_experts=4, k=4, capacity_factor=1.0))
    torch.testing.assert_close(tc_all(x), mlp(x), rtol=1e-5, atol=1e-6)
    ec, mlp = upcycled_layer(ExpertsChoiceMoE(16, 32, num_experts=4, capacity_factor=4.0))
    torch.testing.assert_close(ec(x), mlp(x), rtol=1e-5, atol=1e-6)
    # Soft MoE with identity dispatch and combine (slot i = token i) is the dense model too...
    identity, mlp = upcycled_layer(SoftMoE(16, 32, num_experts=9, dispatch="identity", combine="identity"))
    torch.testing.assert_close(identity(x), mlp(x), rtol=1e-5, atol=1e-6)
    # ...but soft slots are mixes of tokens and MLP(mix) != mix of MLPs: it is not the dense model.
    soft, mlp = upcycled_layer(SoftMoE(16, 32, num_experts=4))
    logits = soft.logits(x)
    slots = logits.softmax(1).transpose(1, 2) @ x
    torch.testing.assert_close(soft(x), logits.softmax(-1) @ mlp(slots), rtol=1e-5, atol=1e-6)
    assert (soft(x) - mlp(x)).abs().max() > 1e-2


# ----------------------------------------------------------------------------- what is refused, before any work

def prepare(tmp_path: Path, *overrides: str, multirun: bool = False) -> preflight.Command:
    args = (["-m"] if multirun else []) + ["experiment=smoke", *overrides,
                                          f"hydra.{'sweep' if multirun else 'run'}.dir={tmp_path / 'new'}"]
    return preflight.prepare(args, conf_dir(), validate)


def test_a_bad_source_is_refused_in_one_line_naming_what_differs(tmp_path):
    dense = save_checkpoint(tmp_path / "dense" / "last.pt", trained_dense(), "router=dense")
    prepare(tmp_path, "router=soft", f"init_from={dense.parent}")  # a run dir means its last.pt
    cases = {
        "no checkpoint at": f"init_from={tmp_path / 'nowhere'}",
        "cannot read checkpoint": f"init_from={tmp_path / 'junk.pt'}",
        "is a soft run; upcycling starts from a dense run": f"init_from={tmp_path / 'soft' / 'last.pt'}",
        "has model.dim=16, this run model.dim=32": "model.dim=32",
        "router.mlp_mult=4; experts are model.mlp_dim wide": f"init_from={tmp_path / 'wide' / 'last.pt'}",
    }
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    save_checkpoint(tmp_path / "soft" / "last.pt", model_of(0, "router=soft"), "router=soft")
    save_checkpoint(tmp_path / "wide" / "last.pt", model_of(0, "router=dense", "router.mlp_mult=4"),
                    "router=dense", "router.mlp_mult=4")
    for needle, override in cases.items():
        overrides = ["router=soft", f"init_from={dense}", override]
        with pytest.raises(UserError, match=needle) as err:
            prepare(tmp_path, *overrides)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="is a soft run"):  # every job of a sweep is checked
        prepare(tmp_path, "router=soft,tokens_choice", f"init_from={tmp_path / 'soft'}", multirun=True)
    with pytest.raises(CheckpointError, match=r"has head.weight of shape \(10, 16\), this model \(4, 16\) "
                                              r"\(the number of classes differ\)"):
        upcycle.upcycle_(model_of(0, "router=soft", classes=4), torch.load(dense)["model"], dense)
    assert not (tmp_path / "new").exists()  # nothing written


def test_the_init_cost_adds_up_along_a_chain_of_init_from_runs(tmp_path):
    """A source that was itself started with init_from brings its own init cost along."""
    config = OmegaConf.to_container(compose_cfg("router=dense"), resolve=True)
    dense = trained_dense()
    first = save_checkpoint(tmp_path / "a" / "last.pt", dense, "router=dense", step=5)
    (first.parent / "result.json").write_text(json.dumps({"status": "completed", "cost": {"gflops_per_image": 2.0}}))
    record = upcycle.init_model(model_of(0, "router=dense"), str(first.parent), config)
    assert record["images"] == 5 * 16 and record["train_gflops"] == 3 * 2.0 * 80 == record["total_train_gflops"]
    assert record["init_train_gflops"] == 0.0 and record["epochs"] == 1 and record["path"] == str(first.resolve())

    second = save_checkpoint(tmp_path / "b" / "last.pt", dense, "router=dense", f"init_from={first}", step=2,
                             init_from=record)  # a continuation of the first, 2 steps
    (second.parent / "result.json").write_text(json.dumps({"status": "completed", "cost": {"gflops_per_image": 2.0}}))
    chained = upcycle.init_model(model_of(0, "router=soft"), str(second), {**config, "router": {"name": "soft"}})
    assert chained["train_gflops"] == 3 * 2.0 * 32 and chained["init_train_gflops"] == 480.0
    assert chained["total_train_gflops"] == 480.0 + 192.0
    (second.parent / "result.json").unlink()  # the source's forward FLOPs are unknown without its record
    assert upcycle.init_model(model_of(0, "router=dense"), str(second), config)[
        "total_train_gflops"] is None


def test_a_source_whose_cost_moves_in_training_brings_the_training_flops_its_record_counted(tmp_path):
    """ReMoE's FLOPs per image fall as it trains (its trained_gates count them): from the checkpoint its
    result.json was written at, the source's cost is that record's train_gflops_total, not 3 x its final
    FLOPs x images; from an earlier one it is unknown."""
    config = OmegaConf.to_container(compose_cfg("router=dense"), resolve=True)
    state = trained_dense()
    source = save_checkpoint(tmp_path / "a" / "last.pt", state, "router=dense", step=5)
    record = {"status": "completed", "position": {"step": 5},
              "cost": {"gflops_per_image": 2.0, "train_gflops_total": 700.0}}
    (source.parent / "result.json").write_text(json.dumps(record))
    assert upcycle.init_model(model_of(0, "router=dense"), str(source), config)["train_gflops"] == 700.0
    record["position"]["step"] = 9  # the run went on after this checkpoint
    (source.parent / "result.json").write_text(json.dumps(record))
    assert upcycle.init_model(model_of(0, "router=dense"), str(source), config)["train_gflops"] == 3 * 2.0 * 80
    ckpt = torch.load(source)
    ckpt["model"]["blocks.1.mlp.trained_gates"] = torch.zeros(2, dtype=torch.float64)  # as a ReMoE layer keeps
    torch.save(ckpt, source)
    assert upcycle.source_cost(source, ckpt)["total_train_gflops"] is None


# ----------------------------------------------------------------------------- the CLI end to end

# A learning rate of 1e-9 leaves the weights where upcycling put them (within ~1e-8).
UPCYCLED = ["experiment=smoke", "router=tokens_choice", "router.group_size=2", "train.lr=1e-9"]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A short dense run and a Tokens Choice run upcycled from it, through the CLI."""
    tmp_path = tmp_path_factory.mktemp("upcycle")
    dense_dir, up_dir = tmp_path / "dense", tmp_path / "upcycled"
    proc = moebench("train", "experiment=smoke", "router=dense", "seed=1", f"hydra.run.dir={dense_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = moebench("train", *UPCYCLED, f"init_from={dense_dir}", f"hydra.run.dir={up_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dense_dir, up_dir


@pytest.mark.slow  # a dense run and an upcycled run
def test_a_run_upcycled_from_a_short_dense_run_records_and_counts_its_init_cost(short_runs, tmp_path, capsys):
    dense_dir, up_dir = short_runs
    dense, up = result(dense_dir), result(up_dir)
    assert up["status"] == "completed" and up["config"]["init_from"] == str(dense_dir)
    record = up["init_from"]
    images = dense["position"]["step"] * 16  # experiment=smoke: batches of 16
    assert record["run_dir"] == str(dense_dir.resolve()) and record["router"] == "dense"
    assert record["step"] == dense["position"]["step"] and record["images"] == images == dense["cost"]["train_images"]
    assert record["train_gflops"] == pytest.approx(3 * dense["cost"]["gflops_per_image"] * images)
    assert record["total_train_gflops"] == record["train_gflops"] == pytest.approx(dense["cost"]["train_gflops_total"])
    assert record["upcycled"] == ["blocks.1.mlp"] and record["fresh"] == ["blocks.1.mlp.gate.weight"]
    assert up["cost"]["train_gflops_total"] == pytest.approx(
        3 * up["cost"]["gflops_per_image"] * up["position"]["step"] * 16)
    source = torch.load(dense_dir / "last.pt")["model"]
    weights = torch.load(up_dir / "last.pt")["model"]
    for e in range(4):
        torch.testing.assert_close(weights["blocks.1.mlp.experts.w1"][e], source["blocks.1.mlp.fc1.weight"].t(),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(weights["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"],
                               rtol=0, atol=1e-6)

    common = [str(dense_dir), str(up_dir), "--allow-mixed", "--wandb-mode", "disabled"]  # train.lr differs
    assert pareto.main([*common, "--out", str(tmp_path / "own")]) == 0
    assert "--include-init-cost counts it" in capsys.readouterr().out
    assert pareto.main([*common, "--include-init-cost", "--out", str(tmp_path / "all")]) == 0
    assert "include the init_from run's training for 1 of 2 runs" in capsys.readouterr().out
    own, total = ({row["label"]: row for row in json.loads((tmp_path / d / "pareto.json").read_text())["runs"]}
                  for d in ("own", "all"))
    label = "tokens_choice E4 k1 C1.0 upcycled"
    assert own[label]["train_gflops_total"] == pytest.approx(up["cost"]["train_gflops_total"])
    assert total[label]["train_gflops_total"] == pytest.approx(
        up["cost"]["train_gflops_total"] + dense["cost"]["train_gflops_total"])
    assert total["dense"]["train_gflops_total"] == own["dense"]["train_gflops_total"]


@pytest.mark.slow  # three runs
def test_a_resumed_upcycled_run_never_reads_its_source_again(short_runs, tmp_path):
    dense_dir, up_dir = short_runs
    run_dir = tmp_path / "upcycled"
    shutil.copytree(up_dir, run_dir)
    record = result(run_dir)["init_from"]
    shutil.move(dense_dir, tmp_path / "moved")  # resume wins over init_from: the dense run may even be gone
    try:
        proc = moebench("train", *UPCYCLED, f"init_from={dense_dir}", "train.epochs=2", f"resume={run_dir}")
    finally:
        shutil.move(tmp_path / "moved", dense_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = result(run_dir)
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 2
    assert resumed["init_from"] == record  # carried by the checkpoint
    assert "init_from" not in (run_dir / "train.log").read_text().split("resuming at step")[1]
