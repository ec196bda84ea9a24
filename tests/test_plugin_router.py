"""A router defined and registered in this file alone trains, aggregates, inspects and benches.

The proof that a router describes itself once: ``HashMoE`` (token i -> expert i mod E, weight 1;
no gate) and its ``Router`` live here, moebench imports this file as a plugin (MOEBENCH_PLUGINS)
and every subcommand handles it without a line of moebench changed for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore

from moebench.moe import MoELayer, Router, SparseRouting, register
from moebench.moe.experts import Experts
from moebench.moe.registry import default_bench
from moebench.schema import BOOL, Int

HERE = Path(__file__).resolve().parent


class HashMoE(MoELayer):
    """Token position i goes to expert i mod E with weight 1 (Roller et al.'s hash layer, by position)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, identical_init: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.experts = Experts(num_experts, dim, hidden_dim, identical_init=identical_init)

    def routing(self, x: torch.Tensor) -> SparseRouting:
        batch, tokens, _ = x.shape
        expert = torch.arange(tokens, device=x.device) % self.num_experts
        weights = F.one_hot(expert, self.num_experts).float().expand(batch, tokens, self.num_experts)
        return SparseRouting(weights, weights.bool(), weights.bool(), weights, chooser="tokens")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every expert on every token, then the routing keeps each token's own: simple, and small here.
        batch, tokens, dim = x.shape
        out = self.experts(x.reshape(1, batch * tokens, dim).expand(self.num_experts, -1, -1))
        weights = self.routing(x).weights.reshape(batch * tokens, self.num_experts)
        self.aux_loss = x.new_zeros(())
        return torch.einsum("ne,end->nd", weights.to(out.dtype), out).reshape(batch, tokens, dim).to(x.dtype)

    def active_expert_fraction(self) -> float:
        return 1 / self.num_experts


def build(dim: int, hidden_dim: int, num_tokens: int, options: dict) -> HashMoE:
    return HashMoE(dim, hidden_dim, **options)


register(Router(
    name="hash", build=build, options={"num_experts": Int(1), "identical_init": BOOL},
    label=lambda get: [f"E{get('num_experts')}"],
    check=lambda o: None if o["num_experts"] >= 1 else f"router.num_experts must be >= 1, got {o['num_experts']}",
    bench=default_bench("hash", build), marker="x",
))
ConfigStore.instance().store(group="router", name="hash", node={
    "name": "hash", "num_experts": "${experts}", "identical_init": False, "lr_mult": 1.0,
})

ENV = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore",
       "MOEBENCH_PLUGINS": "test_plugin_router",
       "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
# Digits at 8x8 with 2x2 patches: 16 tokens over 4 experts.
DIGITS = ["experiment=smoke", "data=digits", "data.num_test=64", "model.patch_size=2"]


def moebench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moebench", *args], capture_output=True, text=True, env=ENV,
                          timeout=900)


def test_hash_routing_sends_token_i_to_expert_i_mod_e():
    layer = HashMoE(8, 16, num_experts=4)
    routing = layer.routing(torch.randn(2, 10, 8))
    assert routing.processed[1].nonzero()[:, 1].tolist() == [i % 4 for i in range(10)]


@pytest.mark.slow  # train, pareto, inspect and bench in four processes
def test_a_router_from_a_plugin_trains_aggregates_inspects_and_benches(tmp_path):
    sweep = tmp_path / "sweep"
    proc = moebench("train", "-m", *DIGITS, "router=hash,dense", "experts=4", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {json.loads(p.read_text())["config"]["router"]["name"]: p.parent for p in sweep.rglob("result.json")}
    assert set(results) == {"hash", "dense"}
    record = json.loads((results["hash"] / "result.json").read_text())
    assert record["status"] == "completed" and record["cost"]["params_active"] < record["cost"]["params_total"]

    proc = moebench("pareto", str(sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = {arm["label"]: arm for arm in json.loads((sweep / "pareto.json").read_text())["arms"]}
    assert set(arms) == {"hash E4", "dense"}  # the plugin's own arm label

    proc = moebench("inspect", str(results["hash"]), "--images", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    inspected = json.loads((results["hash"] / "inspect" / "inspect.json").read_text())
    assert inspected["router"] == "hash" and inspected["layers"]
    assert max(inspected["agreement_max_abs_diff"].values()) < 1e-5  # its routing rebuilds its output
    for stats in inspected["layers"].values():
        assert stats["load_share"] == [0.25] * 4  # 16 positions over 4 experts: exactly even

    out = tmp_path / "bench.json"
    proc = moebench("bench", "--only", "hash", "--experts", "4", "--dim", "16", "--hidden", "32", "--tokens", "8",
                    "--batch", "4", "--repeats", "1", "--warmup", "0", "--no-inference", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["layer"]: row for row in json.loads(out.read_text())["training"]["rows"]}
    assert rows["hash/E=4"]["median_ms"] > 0 and "dense" in rows


def test_an_unimportable_plugin_is_one_line(tmp_path):
    env = {**ENV, "MOEBENCH_PLUGINS": "no_such_router_module"}
    proc = subprocess.run([sys.executable, "-m", "moebench", "pareto", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "moebench: error: MOEBENCH_PLUGINS: cannot import 'no_such_router_module': ModuleNotFoundError: "
        "No module named 'no_such_router_module'"]
