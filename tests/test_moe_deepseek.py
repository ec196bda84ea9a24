"""DeepSeek-V3's router pieces on Tokens Choice (routers-since-2023.md, section 2): sigmoid gates with
renormalised top-k and a routed scaling factor, auxiliary-loss-free balancing (a selection-only bias
moved after each optimizer step), shared and fine-grained experts; against the slow reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import moe_reference as ref
from moebench import router_options
from helpers import WORLD, case, run_on_two_ranks
from moebench.moe import (
    TokensChoiceMoE, count_parameters, discard_balancing_load, shard_experts, track_routing, update_balancing_bias,
)
from test_moe import assert_every_parameter_trains, assert_matches_reference, assert_no_python_loop_over_experts

pytestmark = pytest.mark.usefixtures("float64_and_seed")  # conftest.py: float64 and seed 0 in every test


def deepseek(dim=6, hidden=8, experts=4, **options) -> TokensChoiceMoE:
    options = {"group_size": 2, "load_weight": 0.0, **options}
    return TokensChoiceMoE(dim, hidden, experts, **options)


# ----------------------------------------------------------------------------- against the loop reference

CASES = [  # (batch, options): each piece alone, then together; capacities that drop, BPR on and off
    (4, dict(k=1, gate="sigmoid")),
    (5, dict(k=2, gate="sigmoid", capacity_factor=0.6, bpr=False)),
    (4, dict(k=2, gate="sigmoid", routed_scaling=2.5, capacity_factor=0.5)),
    (4, dict(k=2, routed_scaling=0.5)),  # softmax gates scaled too (DeepSeek's Gate)
    (5, dict(k=1, bias_rate=0.001, capacity_factor=0.5)),  # softmax + bias
    (4, dict(k=2, gate="sigmoid", bias_rate=0.001, capacity_factor=0.75)),
    (3, dict(k=1, granularity=2)),
    (4, dict(k=1, granularity=4, shared_experts=1)),
    (5, dict(k=2, shared_experts=1, capacity_factor=0.5)),
    (4, dict(k=1, gate="sigmoid", bias_rate=0.001, granularity=4, shared_experts=1, routed_scaling=1.5,
             capacity_factor=1.0)),
    (5, dict(k=2, gate="sigmoid", bias_rate=0.001, granularity=2, shared_experts=3, capacity_factor=0.5, bpr=False)),
]


@pytest.mark.parametrize("batch,options", CASES)
def test_deepseek_tokens_choice_matches_reference(batch, options):
    layer = deepseek(**options).eval()
    layer.track_routing = True
    if layer.balancing:  # a bias large enough to change choices and the BPR order
        with torch.no_grad():
            layer.selection_bias.copy_(torch.randn(layer.num_experts) * 0.3)
    x = torch.randn(batch, 5, 6) * 2
    assert_matches_reference(layer, x, lambda layer, x: ref.tokens_choice(layer, x)[0])
    _, dropped = ref.tokens_choice(layer, x)
    layer(x)
    assert layer.metrics["dropped"].item() == pytest.approx(len(dropped) / (layer.k * batch * 5))
    assert {"load_cv", "load_max_over_mean", "gate_entropy"} <= set(layer.metrics)
    assert ("bias_spread" in layer.metrics) == layer.balancing


def test_the_default_options_are_the_v_moe_router():
    """gate=softmax, scaling 1, no bias, no shared, granularity 1: the same layer as before, same outputs."""
    torch.manual_seed(1)
    plain = TokensChoiceMoE(6, 8, 4, k=2, group_size=2)
    torch.manual_seed(1)
    spelled = TokensChoiceMoE(6, 8, 4, k=2, group_size=2, gate="softmax", routed_scaling=1.0, bias_rate=0.0,
                              shared_experts=0, granularity=1)
    torch.manual_seed(1)
    nulls = TokensChoiceMoE(6, 8, 4, k=2, group_size=2, gate=None, routed_scaling=None, bias_rate=None,
                            shared_experts=None, granularity=None)  # the config's nulls: off
    assert plain.state_dict().keys() == spelled.state_dict().keys() == nulls.state_dict().keys()
    assert "selection_bias" not in plain.state_dict() and plain.shared is None
    x = torch.randn(4, 5, 6)
    torch.manual_seed(2)
    a = plain.train()(x)
    for twin in (spelled, nulls):
        torch.manual_seed(2)
        assert torch.equal(a, twin.train()(x))


# ----------------------------------------------------------------------------- sigmoid gates by hand

def test_sigmoid_gates_by_hand():
    """Logits = the token: every token picks its 2 largest sigmoid scores; the gate values are those
    two scores over their sum, times the scaling; the softmax twin keeps its unnormalised softmax."""
    layer = TokensChoiceMoE(3, 4, 3, k=2, capacity_factor=2.0, group_size=1, noise_std=0.0, gate="sigmoid",
                            routed_scaling=2.0, load_weight=0.0).eval()
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(3))
    x = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]]])
    routing = layer.routing(x)
    s = torch.sigmoid(x[0])
    expected = torch.zeros(2, 3)
    expected[0, [0, 2]] = s[0, [0, 2]] / s[0, [0, 2]].sum() * 2.0
    expected[1, [1, 2]] = s[1, [1, 2]] / s[1, [1, 2]].sum() * 2.0
    torch.testing.assert_close(routing.weights[0], expected)
    torch.testing.assert_close(routing.gates[0], s / s.sum(-1, keepdim=True))  # the normalised scores
    out = layer(x)
    for t in range(2):
        y = sum(expected[t, e] * ref.expert(layer.experts, e, x[0, t]) for e in range(3) if expected[t, e] > 0)
        torch.testing.assert_close(out[0, t], y)


def test_a_sigmoid_gate_over_one_routed_choice_gives_the_router_no_gradient(float64_and_seed):
    """Renormalised over a single routed choice every gate is exactly 1 (DeepSeek-V3's Gate does the same):
    the task loss cannot reach the router, which keeps choosing by its initial weights; a shared expert
    beside that one choice does not change it. Two routed choices, three beside a shared one, or the
    softmax do train it. The CLI warns exactly where the router gets no gradient."""
    x = torch.randn(2, 8, 6)
    for options, trains in ((dict(k=1), False), (dict(k=2), True), (dict(k=1, granularity=2, shared_experts=1), False),
                            (dict(k=1, granularity=4, shared_experts=1), True), (dict(k=1, gate="softmax"), True)):
        layer = deepseek(experts=4, capacity_factor=2.0, noise_std=0.0, **{"gate": "sigmoid", **options})
        layer(x).pow(2).sum().backward()
        assert (layer.gate.weight.grad.abs().max() > 1e-6) == trains, options
        declared = {"num_experts": 4, "gate": "sigmoid", **options}
        assert (router_options.tokens_choice_caveat(declared) is None) == trains, options


def test_sigmoid_bpr_serves_the_top_selection_score_first():
    """Capacity 1, both tokens want the same expert: BPR serves first the token whose top selection score
    (score + bias) is larger, not the one with the larger score."""
    layer = TokensChoiceMoE(2, 4, 2, k=1, capacity_factor=0.5, group_size=1, noise_std=0.0, gate="sigmoid",
                            load_weight=0.0, bias_rate=0.01).eval()
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.2], [2.0, 0.0]]])
    routing = layer.routing(x)  # no bias: both want expert 0, token 1 scores higher (0.88 > 0.73)
    assert routing.requested[0, :, 0].all() and routing.processed[0, :, 0].tolist() == [False, True]
    with torch.no_grad():
        layer.selection_bias.copy_(torch.tensor([0.0, 0.6]))
    # scores + bias: t0 (0.73, 0.55 + 0.6), t1 (0.88, 0.5 + 0.6): both want expert 1, t0's 1.15 beats t1's 1.10,
    # though t1's best score (0.88) beats t0's (0.73)
    routing = layer.routing(x)
    assert routing.requested[0, :, 1].all() and routing.processed[0, :, 1].tolist() == [True, False]
    torch.testing.assert_close(routing.weights[0, 0], torch.tensor([0.0, 1.0]))  # one choice: renormalised to 1


# ----------------------------------------------------------------------------- the aux losses with sigmoid gates

def test_sigmoid_aux_losses_read_the_normalised_scores():
    """importance and Switch on s / sum(s); z on the logits; V-MoE's load is the softmax's own value
    (the same noisy top-k event: both gates increase with the logit)."""
    layer = TokensChoiceMoE(3, 4, 3, k=1, group_size=8, gate="sigmoid", importance_weight=0.1, load_weight=0.2,
                            switch_weight=0.3, z_loss_weight=0.4).eval()
    layer.track_routing = True
    x = torch.randn(2, 4, 3)
    layer(x)
    logits = (x.reshape(8, 3) @ layer.gate.weight.T)
    s = logits.sigmoid()
    p = s / s.sum(-1, keepdim=True)
    importance = p.sum(0)
    imp = (importance.std(correction=0) / importance.mean()) ** 2
    top1 = torch.bincount(s.argmax(-1), minlength=3) / 8
    switch = 3 * (top1 * p.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    m = layer.metrics
    assert m["importance_loss"].item() == pytest.approx(imp.item())
    assert m["switch_loss"].item() == pytest.approx(switch.item())
    assert m["z_loss"].item() == pytest.approx(z.item())
    assert layer.aux_loss.item() == pytest.approx(0.1 * imp.item() + 0.3 * switch.item() + 0.4 * z.item())
    # training: the same noise draw gives the same load loss under either gate
    twins = {}
    for gate in ("softmax", "sigmoid"):
        torch.manual_seed(5)
        twin = TokensChoiceMoE(3, 4, 3, k=2, group_size=8, gate=gate, noise_std=1.0).train()
        twin.track_routing = True
        torch.manual_seed(6)
        twin(x)
        twins[gate] = twin.metrics["load_loss"].item()
    assert twins["sigmoid"] == twins["softmax"] > 0


# ----------------------------------------------------------------------------- auxiliary-loss-free balancing

def biased_layer(rate=0.25, **options) -> TokensChoiceMoE:
    """4 experts, logits = the first 4 coordinates of the token, no noise: choices set by hand."""
    layer = TokensChoiceMoE(4, 8, 4, k=1, group_size=1, noise_std=0.0, gate="sigmoid", load_weight=0.0,
                            bias_rate=rate, **options)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4))
    return layer


def tokens_for(experts: list[int]) -> torch.Tensor:
    """One example whose token t prefers expert experts[t]."""
    return torch.eye(4)[experts].unsqueeze(0) * 2.0


def test_bias_update_rule_by_hand():
    """Two forwards in a step (micro-batches): loads (3, 1, 0, 0) + (1, 0, 0, 2) = (4, 1, 0, 2), mean 1.75:
    b <- b + u * sign(1.75 - load) = (-u, +u, +u, -u); a second step from there adds its own signs."""
    layer = biased_layer(rate=0.25).train()
    layer(tokens_for([0, 0, 0, 1]))
    layer(tokens_for([0, 3, 3]))
    assert layer._load_counts.tolist() == [4, 1, 0, 2]
    assert update_balancing_bias(nn.Sequential(layer)) == 1
    assert layer.selection_bias.tolist() == [-0.25, 0.25, 0.25, -0.25]
    assert layer._load_counts is None
    # step 2, scores + bias: (0.88 - 0.25, 0.5 + 0.25, 0.52 + 0.25, 0.5 - 0.25): both tokens go to expert 2
    x = torch.tensor([[[2.0, 0.0, 0.1, 0.0], [2.0, 0.0, 0.1, 0.0]]])
    layer(x)
    assert layer._load_counts.tolist() == [0, 0, 2, 0]
    update_balancing_bias(layer)  # a bare layer works too
    assert layer.selection_bias.tolist() == [0.0, 0.5, 0.0, 0.0]  # mean 0.5: (+u, +u, -u, +u)
    # a perfectly balanced load changes nothing (sign 0), and neither does a step without training forwards
    layer.apply_load(torch.tensor([2.0, 2.0, 2.0, 2.0]))
    update_balancing_bias(layer)
    assert layer.selection_bias.tolist() == [0.0, 0.5, 0.0, 0.0]


def test_bias_never_changes_a_gate_value():
    """Whatever the bias, a chosen pair's combine weight is its score without the bias (renormalised over
    the chosen); the bias only changes which experts are chosen."""
    layer = TokensChoiceMoE(6, 8, 8, k=2, capacity_factor=4.0, group_size=2, noise_std=0.0, gate="sigmoid",
                            load_weight=0.0, bias_rate=0.001).eval()
    x = torch.randn(2, 5, 6)
    before = layer.routing(x)
    with torch.no_grad():
        layer.selection_bias.copy_(torch.randn(8) * 0.5)
    after = layer.routing(x)
    assert not torch.equal(before.requested, after.requested)  # the bias moved choices
    s = torch.sigmoid(x @ layer.gate.weight.T)
    chosen = s * after.requested
    torch.testing.assert_close(after.weights, chosen / chosen.sum(-1, keepdim=True))
    same = (before.requested == after.requested).all(-1)  # tokens whose choices did not move
    torch.testing.assert_close(after.weights[same], before.weights[same])
    torch.testing.assert_close(after.gates, before.gates)


def test_eval_forwards_neither_count_nor_move_the_bias():
    layer = biased_layer().eval()
    layer.track_routing = True  # statistics in eval: still no load for the bias
    layer(tokens_for([0, 0, 0, 1]))
    assert layer._load_counts is None
    update_balancing_bias(layer)
    assert layer.selection_bias.tolist() == [0.0] * 4
    layer.train()(tokens_for([0, 1]))
    layer.eval()(tokens_for([3, 3, 3]))
    assert layer._load_counts.tolist() == [1, 1, 0, 0]
    layer.train()
    layer.routing(tokens_for([3, 3]))  # inspection is no training forward either
    assert layer._load_counts.tolist() == [1, 1, 0, 0]
    discard_balancing_load(layer)  # a skipped step: forgotten, nothing moves
    update_balancing_bias(layer)
    assert layer.selection_bias.tolist() == [0.0] * 4


def test_bias_trajectory_is_in_the_routing_metrics():
    layer = biased_layer(rate=0.25).train()
    track_routing(layer, "train")
    layer(tokens_for([0, 0, 0, 1]))
    update_balancing_bias(layer)
    layer(tokens_for([0, 0, 0, 1]))
    m = layer.metrics
    assert (m["bias_min"].item(), m["bias_max"].item(), m["bias_spread"].item()) == (-0.25, 0.25, 0.5)


def test_bias_is_saved_and_restored():
    layer = biased_layer().train()
    layer(tokens_for([0, 0, 2]))
    update_balancing_bias(layer)
    state = layer.state_dict()
    assert torch.equal(state["selection_bias"], layer.selection_bias) and state["selection_bias"].abs().sum() > 0
    assert "selection_bias" not in dict(layer.named_parameters())  # a buffer: no gradient, no optimizer
    fresh = biased_layer()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.selection_bias, layer.selection_bias)


def test_a_resumed_training_ends_bit_identical_to_an_uninterrupted_one():
    """Train 6 AdamW steps with noisy gates and the bias update; stop after 3, save what a checkpoint
    saves (state_dict, optimizer, RNG), rebuild and continue: the same weights and bias, bit for bit."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(*(deepseek(6, 8, 4, k=1, gate="sigmoid", bias_rate=0.01, granularity=2,
                                        shared_experts=1, noise_std=1.0) for _ in range(2)))

    data = torch.randn(6, 4, 5, 6, generator=torch.Generator().manual_seed(1))

    def train(model, optimizer, steps):
        for x in steps:
            optimizer.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            optimizer.step()
            update_balancing_bias(model)

    straight = make()
    opt = torch.optim.AdamW(straight.parameters(), lr=0.05)
    torch.manual_seed(7)
    train(straight, opt, data)

    first = make()
    opt = torch.optim.AdamW(first.parameters(), lr=0.05)
    torch.manual_seed(7)
    train(first, opt, data[:3])
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()})
    resumed = make()
    opt = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    train(resumed, opt, data[3:])

    assert straight[0].selection_bias.abs().sum() > 0
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- data parallel and expert parallel

def ddp_bias_on_rank(rank: int) -> None:
    torch.set_default_dtype(torch.float64)
    for name in ("replicated", "expert parallel"):
        with case(name):
            torch.manual_seed(0)
            full = TokensChoiceMoE(6, 8, 4, k=1, group_size=2, noise_std=0.0, gate="sigmoid", load_weight=0.0,
                                   bias_rate=0.125, granularity=2, shared_experts=1, capacity_factor=0.5).train()
            x = torch.randn(8, 5, 6)
            mine = copy.deepcopy(full)
            if name == "expert parallel":
                shard_experts(mine)
            # one process, the whole batch: the reference update
            full(x)
            update_balancing_bias(full)
            # each rank its half (the same routing groups); the loads are summed before the update
            mine(x[4 * rank:4 * (rank + 1)])
            local = mine._load_counts.clone()
            update_balancing_bias(mine)
            assert not torch.equal(full.selection_bias, torch.zeros(8))
            assert torch.equal(mine.selection_bias, full.selection_bias), (mine.selection_bias, full.selection_bias)
            others = [torch.empty(8) for _ in range(WORLD)]
            dist.all_gather(others, mine.selection_bias)
            assert torch.equal(others[0], others[1])  # replicated
            total = local.clone()
            dist.all_reduce(total)
            assert not torch.equal(total, local)  # the ranks' loads differ: the sum is what moved the bias


def test_the_bias_update_sums_the_load_over_ranks_and_stays_replicated(tmp_path):
    run_on_two_ranks(ddp_bias_on_rank, tmp_path)


# ----------------------------------------------------------------------------- shared and fine-grained experts: cost

def forward_flops(layer, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("k,m,shared", [(1, 1, 0), (1, 2, 0), (1, 4, 1), (2, 2, 3), (2, 1, 1)])
def test_flops_and_parameters_of_shared_and_fine_grained_experts(k, m, shared):
    """Gate 2 N d (E m); routed experts 4 (E m) rows d (h / m) with k m - K_s choices per token; shared
    experts 4 N d K_s (h / m). With capacities that divide exactly, the total equals the plain layer's."""
    B, T, d, h, E = 4, 8, 8, 16, 4  # one group of 4 images: 32 tokens
    x = torch.randn(B, T, d)
    N = B * T
    layer = TokensChoiceMoE(d, h, E, k=k, group_size=4, granularity=m, shared_experts=shared, gate="sigmoid").eval()
    routed = k * m - shared
    assert layer.num_experts == E * m and layer.k == routed
    rows = layer.capacity(N)
    assert rows == routed * N // (E * m)  # capacities divide exactly in these cases
    expected = 2 * N * d * E * m + 4 * E * m * rows * d * (h // m) + 4 * N * d * shared * (h // m)
    assert forward_flops(layer, x) == expected
    plain = TokensChoiceMoE(d, h, E, k=k, group_size=4).eval()
    if (routed * N) % (E * m) == 0:
        gate_flops = 2 * N * d * E * (m - 1)  # the wider gate is the only difference
        assert forward_flops(layer, x) == forward_flops(plain, x) + gate_flops
    # parameters: the shared experts are always active, the routed ones routed / (E m) of the time
    model = nn.Sequential(layer)
    routed_params = E * m * (2 * d * (h // m) + h // m + d)
    shared_params = 2 * d * shared * (h // m) + shared * (h // m) + d if shared else 0
    counts = count_parameters(model)
    assert counts["total"] == d * E * m + routed_params + shared_params
    assert counts["active"] == round(counts["total"] - routed_params * (1 - routed / (E * m)))


def test_shared_experts_are_no_router_parameters_and_decay_their_kernels():
    from moebench.build import router_parameter_names
    from moebench.moe import weight_decay_split

    model = nn.Sequential(deepseek(k=1, granularity=2, shared_experts=1))
    assert router_parameter_names(model) == {"0.gate.weight"}
    decay, _ = weight_decay_split(model)
    assert {"0.shared.fc1.weight", "0.shared.fc2.weight"} <= set(decay)
    assert not {"0.shared.fc1.bias", "0.shared.fc2.bias"} & set(decay)


def test_no_python_loop_over_experts():
    assert_no_python_loop_over_experts(
        lambda experts: TokensChoiceMoE(8, 16, experts, k=1, group_size=2, gate="sigmoid", bias_rate=0.001,
                                        load_weight=0.0, granularity=2, shared_experts=1).train(),
        update_balancing_bias)


def test_every_parameter_trains():
    assert_every_parameter_trains(deepseek(8, 16, 4, k=1, gate="sigmoid", bias_rate=0.001, granularity=2,
                                           shared_experts=1, importance_weight=0.01))


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("options,needle", [
    (dict(k=5), "k (router.k) must be in [1, experts=4]"),
    (dict(k=1, granularity=3), "router.granularity=3 must divide the expert width"),
    (dict(k=1, granularity=2, shared_experts=2), "router.shared_experts=2 must be in [0, k * granularity = 2)"),
    (dict(k=1, shared_experts=1), "router.shared_experts=1"),
    (dict(bias_rate=-0.001), "router.bias_rate must be >= 0"),
    (dict(gate="relu"), "router.gate must be softmax or sigmoid"),
    (dict(gate="sigmoid", assignment="sinkhorn"), "router.gate=sigmoid and router.assignment=sinkhorn"),
    (dict(bias_rate=0.001, assignment="sinkhorn"), "router.bias_rate > 0 and router.assignment=sinkhorn"),
    (dict(bias_rate=0.001, load_weight=0.005), "router.load_weight=0.005 with router.bias_rate > 0"),
    (dict(routed_scaling=0.0), "router.routed_scaling must be > 0"),
])
def test_the_layer_refuses_bad_settings_in_one_line(options, needle):
    with pytest.raises(ValueError) as err:
        TokensChoiceMoE(6, 8, 4, **options)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_labels_name_only_the_pieces_that_are_on():
    from moebench.moe import registry

    label = registry.get("tokens_choice").label
    base = {"num_experts": 32, "k": 1, "capacity_factor": 1.0, "bpr": True}
    assert label(base.get) == ["E32", "k1", "C1.0"]  # an old run without the new keys
    nulls = {**base, "gate": None, "routed_scaling": None, "bias_rate": None, "granularity": None,
             "shared_experts": None, "assignment": "softmax"}  # conf/'s defaults
    assert label(nulls.get) == ["E32", "k1", "C1.0"]
    defaults = {**base, "gate": "softmax", "routed_scaling": 1.0, "bias_rate": 0.0, "granularity": 1,
                "shared_experts": 0, "assignment": "softmax"}
    assert label(defaults.get) == ["E32", "k1", "C1.0"]
    on = {**defaults, "gate": "sigmoid", "routed_scaling": 2.5, "bias_rate": 0.001, "granularity": 4,
          "shared_experts": 1}
    assert label(on.get) == ["E32", "k1", "C1.0", "sigmoid", "scale2.5", "bias0.001", "m4", "shared1"]
    vmoe = {**defaults, "noise_std": 1.0, "importance_weight": 0.005}  # V-MoE's balancing: unnamed, as ever
    assert label(vmoe.get) == ["E32", "k1", "C1.0"]
    assert label({**on, "noise_std": 1.0, "importance_weight": 0.005}.get) == [
        "E32", "k1", "C1.0", "sigmoid", "scale2.5", "bias0.001", "noise1", "importance0.005", "m4", "shared1"]
    # beside the bias, named
    assert label({**on, "noise_std": 0.0, "importance_weight": 0.0}.get) == label(on.get)


def test_inspection_rebuilds_the_output_with_shared_experts_and_the_bias():
    """`moebench inspect` checks its picture against the layer: the routing plus the shared experts
    rebuild the output exactly; without the shared experts' part they would not."""
    from moebench.inspection.routing import rebuild_output, route
    from moebench.inspection.summary import LayerSummary

    layer = TokensChoiceMoE(8, 16, 4, k=1, group_size=2, capacity_factor=1.0, gate="sigmoid", bias_rate=0.001,
                            load_weight=0.0, granularity=4, shared_experts=1, routed_scaling=2.0).float().eval()
    with torch.no_grad():
        layer.selection_bias.copy_(torch.randn(16, dtype=torch.float32) * 0.2)
    x = torch.randn(5, 16, 8, dtype=torch.float32)
    with torch.no_grad():
        y = layer(x)
    routing = route(layer, x)
    torch.testing.assert_close(rebuild_output(layer, x, routing), y, atol=1e-5, rtol=1e-4)
    assert bool((routing.requested.sum(-1) == layer.k).all()) and layer.k == 3
    summary = LayerSummary("tokens_choice", layer.num_experts, x.shape[1])
    summary.add(routing)
    assert sum(summary.result()["load_share"]) == pytest.approx(1.0)


def test_runs_made_before_the_new_keys_resume_and_pool_with_default_runs():
    """The new keys default to null (off), so a run whose config predates them is the same experiment:
    its checkpoint resumes under today's config, and pareto puts it in the same arm."""
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from moebench.checkpoint import check_resume_config
    from moebench.pareto.arms import arm_of
    from moebench.pareto.records import Run

    cfg = compose_cfg("experiment=smoke", "router=tokens_choice")
    today = OmegaConf.to_container(cfg, resolve=True)
    before = copy.deepcopy(today)
    for key in ("gate", "routed_scaling", "bias_rate", "shared_experts", "granularity"):
        assert today["router"][key] is None
        del before["router"][key]
    check_resume_config(before, cfg, "last.pt")  # no refusal
    assert arm_of(Run(None, "completed", before)) == arm_of(Run(None, "completed", today))


def test_upcycling_refuses_split_experts_and_leaves_shared_experts_and_the_bias_fresh():
    """A dense MLP cannot be copied into experts of width mlp_dim/m (one line naming the key); at
    granularity 1 the routed experts are copies and the shared experts, like the gate and the bias, start fresh."""
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from moebench import upcycle
    from moebench.build import build_model
    from moebench.errors import CheckpointError

    def config(*overrides):
        return OmegaConf.to_container(compose_cfg("experiment=smoke", *overrides), resolve=True)

    dense = config("router=dense")
    with pytest.raises(CheckpointError) as err:
        upcycle.check_source(dense, config("variant=tc_deepseek_e32"), "dense/last.pt")
    assert "router.granularity=4" in str(err.value) and "\n" not in str(err.value)
    overrides = ("router=tokens_choice", "k=2", "router.shared_experts=1", "router.bias_rate=0.001",
                 "router.load_weight=0", "router.gate=sigmoid")
    upcycle.check_source(dense, config(*overrides), "dense/last.pt")
    torch.manual_seed(0)
    source = build_model(compose_cfg("experiment=smoke", "router=dense"), 3, 10).state_dict()
    model = build_model(compose_cfg("experiment=smoke", *overrides), 3, 10)
    done = upcycle.upcycle_(model, source, "dense/last.pt")
    assert set(done["fresh"]) == {"blocks.1.mlp.gate.weight", "blocks.1.mlp.selection_bias",
                                  *(f"blocks.1.mlp.shared.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias"))}
    torch.testing.assert_close(model.blocks[1].mlp.experts.w1[1], source["blocks.1.mlp.fc1.weight"].t())


def test_the_bias_stays_float32_in_a_bf16_model():
    """model.to(bf16): the bias keeps float32, so 0.001 steps still add up past |b| = 0.25 (in bf16 they would
    round away), and the layer still routes (in float32, as every router)."""
    layer = biased_layer(rate=0.001).float()
    with torch.no_grad():
        layer.selection_bias.fill_(0.5)
    layer.to(torch.bfloat16)
    assert layer.selection_bias.dtype == torch.float32 and layer.experts.w1.dtype == torch.bfloat16
    layer.train()(tokens_for([0, 0, 1]).to(torch.bfloat16))
    update_balancing_bias(layer)
    assert layer.selection_bias.tolist() == torch.tensor([0.499, 0.499, 0.501, 0.501], dtype=torch.float32).tolist()
    assert layer.double().selection_bias.dtype == torch.float64  # wider is kept (the float64 references)


@pytest.mark.slow  # 30 s of dynamo tracing on 2 busy cores
def test_torch_compile_counts_the_load_as_eager_does():
    """Under torch.compile (dynamo; the eager backend, so no C++ build) a training forward still adds its
    load to the layer's count, and the bias moves as without compile."""
    torch.manual_seed(0)
    options = dict(k=1, group_size=2, gate="sigmoid", bias_rate=0.01, load_weight=0.0, granularity=2,
                   shared_experts=1, noise_std=0.0)
    layer, plain = TokensChoiceMoE(8, 16, 4, **options), TokensChoiceMoE(8, 16, 4, **options)
    plain.load_state_dict(layer.state_dict())
    track_routing(layer, "train")
    compiled = torch.compile(layer, backend="eager")
    for _ in range(3):
        x = torch.randn(4, 6, 8)
        torch.testing.assert_close(compiled(x), plain(x))
        assert torch.equal(layer._load_counts, plain._load_counts)
        update_balancing_bias(layer)
        update_balancing_bias(plain)
    assert torch.equal(layer.selection_bias, plain.selection_bias) and layer.selection_bias.abs().sum() > 0
    assert layer.metrics["bias_spread"].item() > 0
