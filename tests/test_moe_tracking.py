"""Routing statistics and auxiliary losses only when tracking; metrics averaged between collections."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moebench.moe import (
    DenseMLP, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, collect_aux_loss, collect_metrics, track_routing,
)


def routers():
    torch.manual_seed(0)
    return {
        "soft": SoftMoE(8, 16, 4, 2),
        "tokens_choice": TokensChoiceMoE(8, 16, 4, k=2, group_size=2),
        "experts_choice": ExpertsChoiceMoE(8, 16, 4, group_size=2),
    }


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_of_forward(layer, x) -> int:
    with torch.no_grad(), OpCounter() as counter:
        layer(x)
    return counter.count


@pytest.mark.parametrize("name", ["soft", "tokens_choice", "experts_choice"])
def test_eval_forward_computes_no_statistics_unless_asked(name):
    layer = routers()[name]
    model = nn.Sequential(layer).eval()
    x = torch.randn(4, 6, 8)
    y = model(x)
    assert layer.metrics == {} and float(layer.aux_loss) == 0.0
    assert collect_metrics(model) == {}
    untracked = ops_of_forward(layer, x)
    track_routing(model)
    tracked = ops_of_forward(layer, x)
    assert tracked > untracked  # the statistics were really skipped, not computed and dropped
    torch.testing.assert_close(model(x), y)  # tracking never changes the output
    assert layer.metrics and set(collect_metrics(model)) == {f"0/{key}" for key in layer.metrics}
    if name == "tokens_choice":
        assert layer.aux_loss.item() > 0
    track_routing(model, False)
    model(x)
    assert collect_metrics(model) == {}


def handmade_experts_choice() -> ExpertsChoiceMoE:
    """Experts 0 and 1 share a gate column that grows with a token's first feature, expert 2's
    column falls with it: 0 and 1 pick the c largest tokens, 2 the c smallest."""
    layer = ExpertsChoiceMoE(2, 4, 3, capacity_factor=1.0, group_size=1)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    return layer


def tokens(*values: float) -> torch.Tensor:
    return torch.tensor([[[v, 0.0] for v in values]])


def test_metrics_are_means_over_the_training_forwards_since_the_last_collection():
    layer = handmade_experts_choice().train()
    model = track_routing(nn.Sequential(layer), "train")
    # 6 tokens, c = 2: two tokens picked twice, two once, two never.
    model(tokens(3, 2, 0.5, 0, -1, -2))
    # 4 tokens, c = round(4/3) = 1: one token picked twice, one once, two never.
    model(tokens(3, 2, 0, -1))
    model.eval()
    model(tokens(5, 4, 3, 2, 1, 0, -1, -2))  # eval, not tracked: must not count
    metrics = collect_metrics(model)
    assert metrics["0/tokens_0_experts"] == pytest.approx((2 / 6 + 2 / 4) / 2)
    assert metrics["0/tokens_1_expert"] == pytest.approx((2 / 6 + 1 / 4) / 2)
    assert metrics["0/tokens_2plus_experts"] == pytest.approx((2 / 6 + 1 / 4) / 2)
    assert collect_metrics(model) == {}  # the sums restart after each collection
    model.train()
    model(tokens(3, 2, 0, -1))
    assert collect_metrics(model)["0/tokens_0_experts"] == pytest.approx(2 / 4)


def test_soft_moe_metrics_average_the_per_forward_values():
    layer = track_routing(SoftMoE(8, 16, 4, 2).train())
    xs = [torch.randn(3, 5, 8), torch.randn(2, 7, 8) * 4, torch.randn(1, 5, 8)]
    expected = []
    for x in xs:
        layer(x)
        dispatch = layer.logits(x).softmax(1)
        expected.append(dispatch.amax(1).mean().item())
        assert layer.metrics["dispatch_max"].item() == pytest.approx(expected[-1])
    assert collect_metrics(layer)["dispatch_max"] == pytest.approx(sum(expected) / 3)


def test_aux_loss_in_training_is_the_weighted_sum_of_the_losses():
    torch.manual_seed(0)
    layer = TokensChoiceMoE(3, 4, 3, k=1, group_size=8, noise_std=0.0, importance_weight=0.1, load_weight=0.2,
                            switch_weight=0.3, z_loss_weight=0.4).train()
    model = nn.Sequential(layer, DenseMLP(3, 4))
    x = torch.randn(2, 4, 3)
    model(x)
    logits = x.reshape(8, 3) @ layer.gate.weight.T
    gates = logits.softmax(-1)
    importance = gates.sum(0)
    imp = (importance.std(correction=0) / importance.mean()) ** 2
    top1 = torch.bincount(gates.argmax(-1), minlength=3) / 8
    switch = 3 * (top1 * gates.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    total = collect_aux_loss(model)
    assert total.requires_grad
    assert total.item() == pytest.approx((0.1 * imp + 0.3 * switch + 0.4 * z).item(), rel=1e-5)
    model.eval()
    model(x)
    assert collect_aux_loss(model).item() == 0.0


@pytest.mark.parametrize("name", ["soft", "tokens_choice", "experts_choice"])
def test_training_computes_the_weighted_losses_and_statistics_only_when_asked(name):
    layer, x = routers()[name].train(), torch.randn(4, 6, 8)
    torch.manual_seed(1)  # the same training noise for both forwards
    y = layer(x)
    untracked_aux, untracked_ops = layer.aux_loss, ops_of_forward(layer, x)
    assert layer.metrics == {} and collect_metrics(layer) == {}
    track_routing(layer, "train")
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), y)
    assert layer.metrics and set(collect_metrics(layer)) == set(layer.metrics)
    torch.testing.assert_close(layer.aux_loss, untracked_aux)  # the objective does not depend on tracking
    assert untracked_aux.requires_grad == (name == "tokens_choice")  # its importance and load losses have weights
    assert ops_of_forward(layer, x) > untracked_ops
    collect_metrics(layer)
    layer.eval()
    layer(x)  # "train": an evaluation forward is not tracked
    assert layer.metrics == {} and collect_metrics(layer) == {} and float(layer.aux_loss) == 0.0


def test_track_routing_names_what_it_takes():
    with pytest.raises(ValueError, match="True, False or 'train'"):
        track_routing(routers()["soft"], "eval")
