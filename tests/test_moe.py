"""The router library against its slow references and hand-made cases (soft-moe.md, sections 1-4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import moe_reference as ref
from moebench.moe import (
    DenseMLP, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, collect_aux_loss, collect_metrics, compute_capacity,
    count_parameters, track_routing,
)

pytestmark = pytest.mark.usefixtures("float64_and_seed")  # conftest.py: float64 and seed 0 in every test


def grads(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of <out, weight> w.r.t. the input and every parameter."""
    names = ["input"] + [n for n, _ in layer.named_parameters()]
    values = torch.autograd.grad((out * weight).sum(), [x, *layer.parameters()], allow_unused=True)
    return {n: (v if v is not None else torch.zeros(())) for n, v in zip(names, values)}


def assert_matches_reference(layer, x, reference_fn):
    x = x.clone().requires_grad_(True)
    weight = torch.randn_like(x)
    fast = layer(x)
    slow = reference_fn(layer, x)
    slow = slow[0] if isinstance(slow, tuple) else slow
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    g_fast, g_slow = grads(layer, x, fast, weight), grads(layer, x, slow, weight)
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_slow[name], atol=1e-5, rtol=1e-5, msg=f"grad of {name}")


# ----------------------------------------------------------------------------- capacity

@pytest.mark.parametrize("args,expected", [
    ((64, 8, 1.0, 1, "ceil"), 8),
    ((64, 8, 1.05, 1, "ceil"), 9),        # 8.4 -> 9
    ((30, 10, 0.1 * 10, 1, "ceil"), 3),   # float fuzz must not add one
    ((512, 32, 1.0, 2, "ceil"), 32),      # k multiplies
    ((10, 4, 1.0, 1, "round"), 3),        # 2.5 rounds half up
    ((10, 4, 0.9, 1, "round"), 2),        # 2.25
    ((64, 8, 1.05, 1, 4), 12),            # ceil 9, then a multiple of 4
    ((16, 256, 1.0, 1, "round"), 1),      # never 0
    ((16, 2, 4.0, 1, "ceil"), 16),        # never more than the group's tokens
])
def test_compute_capacity(args, expected):
    assert compute_capacity(*args) == expected


def test_compute_capacity_rejects_unknown_rounding():
    with pytest.raises(ValueError, match="rounding"):
        compute_capacity(8, 2, 1.0, rounding="floor")


# ----------------------------------------------------------------------------- Soft MoE

@pytest.mark.parametrize("batch,tokens,experts,slots,normalize,dispatch,combine", [
    (2, 5, 3, 2, True, "soft", "soft"),
    (3, 4, 4, 1, True, "soft", "soft"),
    (2, 6, 2, 3, False, "soft", "soft"),
    (2, 5, 3, 1, True, "soft", "uniform"),
    (2, 5, 3, 1, True, "uniform", "soft"),
    (2, 5, 3, 1, True, "uniform", "uniform"),
    (2, 4, 2, 2, True, "identity", "identity"),
])
def test_soft_moe_matches_reference(batch, tokens, experts, slots, normalize, dispatch, combine):
    layer = SoftMoE(6, 8, experts, slots, normalize=normalize, identical_init=False, dispatch=dispatch,
                    combine=combine)
    with torch.no_grad():
        layer.scale.fill_(2.5)  # a non-trivial scale must be applied to the logits
    assert_matches_reference(layer, torch.randn(batch, tokens, 6) * 3, ref.soft_moe)


def test_soft_moe_example_independent_of_the_rest_of_the_batch():
    layer = SoftMoE(8, 16, 4, 2)
    x = torch.randn(4, 6, 8)
    y = layer(x)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 6, 8) * 10
    torch.testing.assert_close(layer(x2)[0], y[0])
    torch.testing.assert_close(layer(x[:1])[0], y[0])


def test_soft_moe_permuting_tokens_permutes_output():
    layer = SoftMoE(8, 16, 4, 2)
    x = torch.randn(2, 7, 8)
    perm = torch.randperm(7)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm])


def test_soft_moe_drops_nothing_and_mixes_over_the_right_axes():
    layer = SoftMoE(8, 16, 4, 2)
    layer.track_routing = True
    x = torch.randn(2, 5, 8)
    # Every token's output depends on that token (nothing dropped) ...
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    for t in range(5):
        g, = torch.autograd.grad(out[0, t].sum(), xg, retain_graph=True)
        assert g[0, t].abs().sum() > 0
    # ... dispatch is a softmax over tokens (each slot a convex mix) and combine over all slots.
    xn = x / torch.sqrt((x**2).sum(-1, keepdim=True) + 1e-6)
    phi = layer.phi.reshape(8, -1)
    logits = xn @ (phi / torch.sqrt((phi**2).sum(0, keepdim=True) + 1e-6))
    d, c = logits.softmax(1), logits.softmax(-1)
    torch.testing.assert_close(d.sum(1), torch.ones(2, 8))
    torch.testing.assert_close(c.sum(-1), torch.ones(2, 5))
    assert layer.metrics["dispatch_max"] == pytest.approx(d.amax(1).mean().item())
    assert float(layer.aux_loss) == 0.0


def test_soft_moe_raw_tokens_are_dispatched():
    """Scaling an example's tokens scales the slot inputs (normalised logits are unchanged)."""
    layer = SoftMoE(8, 16, 4, 1)
    seen = []
    layer.experts.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.randn(1, 5, 8)
    layer(x)
    layer(3 * x)
    torch.testing.assert_close(seen[1], 3 * seen[0], atol=1e-5, rtol=1e-5)  # eps 1e-6 in the norm


def test_soft_moe_slot_factor_and_identical_init():
    assert SoftMoE(8, 16, 4, slot_factor=1.0, num_tokens=16).slots_per_expert == 4
    assert SoftMoE(8, 16, 32, slot_factor=0.5, num_tokens=16).slots_per_expert == 1  # at least 1
    layer = SoftMoE(8, 16, 4)
    assert torch.equal(layer.experts.w1[0], layer.experts.w1[3])  # reference code: one draw for all
    assert not torch.equal(SoftMoE(8, 16, 4, identical_init=False).experts.w1[0],
                           SoftMoE(8, 16, 4, identical_init=False).experts.w1[1])
    with pytest.raises(ValueError, match="slots == tokens"):
        SoftMoE(8, 16, 4, dispatch="identity")(torch.randn(1, 5, 8))


# ----------------------------------------------------------------------------- Tokens Choice

@pytest.mark.parametrize("batch,k,factor,bpr,rounding", [
    (4, 1, 1.0, True, "ceil"),
    (4, 1, 0.5, True, "ceil"),
    (4, 1, 0.5, False, "ceil"),
    (5, 2, 1.0, True, "ceil"),      # last group smaller
    (5, 2, 0.6, False, "round"),
    (3, 2, 2.0, True, 4),
    (6, 1, 1.25, False, "ceil"),
])
def test_tokens_choice_matches_reference(batch, k, factor, bpr, rounding):
    layer = TokensChoiceMoE(6, 8, 4, k=k, capacity_factor=factor, bpr=bpr, group_size=2,
                            capacity_rounding=rounding).eval()
    layer.track_routing = True  # statistics in eval mode only when asked
    x = torch.randn(batch, 5, 6) * 2
    assert_matches_reference(layer, x, lambda layer, x: ref.tokens_choice(layer, x)[0])
    _, dropped = ref.tokens_choice(layer, x)
    layer(x)
    assert layer.metrics["dropped"].item() == pytest.approx(len(dropped) / (k * batch * 5))


def handmade_tokens_choice(bpr: bool) -> tuple[TokensChoiceMoE, torch.Tensor]:
    """4 tokens, 2 experts, capacity 1: three tokens want expert 0, one wants expert 1."""
    layer = TokensChoiceMoE(2, 4, 2, k=1, capacity_factor=0.5, bpr=bpr, group_size=1).eval()
    layer.track_routing = True
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(2))  # gate logits = the token itself
    #                   t0: e0 at 0.73   t1: e0 at 0.95  t2: e0 at 0.88  t3: e1 at 0.73
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])
    return layer, x


@pytest.mark.parametrize("bpr,kept", [(False, {0, 3}), (True, {1, 3})])
def test_tokens_choice_drops_exactly_the_expected_tokens(bpr, kept):
    layer, x = handmade_tokens_choice(bpr)
    assert layer.capacity(4) == 1
    out = layer(x)
    for t in range(4):
        if t in kept:
            gate = torch.softmax(x[0, t], 0).max()
            e = int(x[0, t].argmax())
            torch.testing.assert_close(out[0, t], gate * ref.expert(layer.experts, e, x[0, t]))
        else:
            assert torch.equal(out[0, t], torch.zeros(2)), f"token {t} should be dropped"
    assert layer.metrics["dropped"].item() == pytest.approx(0.5)


def test_tokens_choice_first_choices_beat_earlier_tokens_second_choices():
    layer = TokensChoiceMoE(2, 4, 2, k=2, capacity_factor=0.5, bpr=False, group_size=1).eval()
    layer.track_routing = True
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(2))
    x = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # t0: e0 then e1; t1: e1 then e0; capacity 1
    out = layer(x)
    for t, e in ((0, 0), (1, 1)):  # only the first choices survive
        gate = torch.softmax(x[0, t], 0)[e]
        torch.testing.assert_close(out[0, t], gate * ref.expert(layer.experts, e, x[0, t]))
    assert layer.metrics["dropped"].item() == pytest.approx(0.5)


def test_tokens_choice_groups_never_share_capacity():
    """Capacity is per group: a full group does not make another group drop."""
    layer = TokensChoiceMoE(2, 4, 2, k=1, capacity_factor=1.0, bpr=False, group_size=1).eval()
    layer.track_routing = True
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    layer(x)
    # group 0: both tokens want e0 with capacity 1 -> one drop; group 1: no drop.
    assert layer.metrics["dropped"].item() == pytest.approx(0.25)


def test_tokens_choice_aux_losses_by_hand():
    layer = TokensChoiceMoE(3, 4, 3, k=1, group_size=8, importance_weight=0.1, load_weight=0.2,
                            switch_weight=0.3, z_loss_weight=0.4).eval()
    layer.track_routing = True
    x = torch.randn(2, 4, 3)
    layer(x)
    logits = x.reshape(1, 8, 3) @ layer.gate.weight.T
    gates = logits.softmax(-1)[0]
    importance = gates.sum(0)
    imp = (importance.std(correction=0) / importance.mean()) ** 2
    top1 = torch.bincount(gates.argmax(-1), minlength=3) / 8
    switch = 3 * (top1 * gates.mean(0)).sum()
    z = torch.logsumexp(logits[0], -1).pow(2).mean()
    m = layer.metrics
    assert m["importance_loss"].item() == pytest.approx(imp.item())
    assert m["switch_loss"].item() == pytest.approx(switch.item())
    assert m["z_loss"].item() == pytest.approx(z.item())
    assert m["load_loss"].item() == 0.0  # eval: no noise, no load loss
    assert layer.aux_loss.item() == pytest.approx(0.1 * imp.item() + 0.3 * switch.item() + 0.4 * z.item())


def test_tokens_choice_noise_and_load_loss_only_when_training():
    layer = TokensChoiceMoE(8, 16, 4, noise_std=1.0, group_size=2)
    layer.track_routing = "train"
    x = torch.randn(4, 6, 8)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    load = layer.metrics["load_loss"].item()
    assert math.isfinite(load) and load > 0
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    quiet = track_routing(TokensChoiceMoE(8, 16, 4, noise_std=0.0, group_size=2).train())
    torch.testing.assert_close(quiet(x), quiet(x))
    assert quiet.metrics["load_loss"].item() == 0.0


# ----------------------------------------------------------------------------- Experts Choice

@pytest.mark.parametrize("batch,factor,rounding", [(4, 1.0, "round"), (5, 0.5, "round"), (3, 2.0, "ceil"), (4, 1.0, 2)])
def test_experts_choice_matches_reference(batch, factor, rounding):
    layer = ExpertsChoiceMoE(6, 8, 4, capacity_factor=factor, group_size=2, capacity_rounding=rounding).eval()
    layer.track_routing = True
    x = torch.randn(batch, 5, 6) * 2
    assert_matches_reference(layer, x, lambda layer, x: ref.experts_choice(layer, x)[0])
    assert_coverage_matches_reference(layer, x, ref.experts_choice)


def assert_coverage_matches_reference(layer, x, reference_fn):
    """The layer's coverage metrics (tokens picked by no expert, by 2+) equal the reference's picks."""
    _, picks = reference_fn(layer, x)
    layer(x)
    counts = torch.tensor(list(picks.values()))
    assert layer.metrics["tokens_0_experts"].item() == pytest.approx((counts == 0).double().mean().item())
    assert layer.metrics["tokens_2plus_experts"].item() == pytest.approx((counts >= 2).double().mean().item())


def test_experts_choice_handmade_picks():
    """3 experts, 6 tokens, c = 2. Experts 0 and 1 share a gate column, so they pick the same
    two tokens; expert 2 prefers the other end; the two middle tokens get nothing."""
    layer = ExpertsChoiceMoE(2, 4, 3, capacity_factor=1.0, group_size=1).eval()
    layer.track_routing = True
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[[3.0, 0.0], [2.0, 0.0], [0.5, 0.0], [0.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]]])
    out = layer(x)
    assert layer.capacity(6) == 2
    for t in (2, 3):
        assert torch.equal(out[0, t], torch.zeros(2)), f"token {t} is picked by no expert"
    gates = torch.softmax(x[0] @ layer.gate.weight.T, -1)
    expected_t0 = sum(gates[0, e] * ref.expert(layer.experts, e, x[0, 0]) for e in (0, 1))
    torch.testing.assert_close(out[0, 0], expected_t0)
    torch.testing.assert_close(out[0, 5], gates[5, 2] * ref.expert(layer.experts, 2, x[0, 5]))
    m = layer.metrics
    assert [m[k].item() for k in ("tokens_0_experts", "tokens_1_expert", "tokens_2plus_experts")] == \
        pytest.approx([2 / 6, 2 / 6, 2 / 6])
    assert float(layer.aux_loss) == 0.0


# ----------------------------------------------------------------------------- shared properties

def all_layers(experts: int = 4):
    return {
        "dense": DenseMLP(8, 16),
        "soft": SoftMoE(8, 16, experts, 2),
        "tokens_choice": TokensChoiceMoE(8, 16, experts, k=2, capacity_factor=1.0, group_size=2),
        "experts_choice": ExpertsChoiceMoE(8, 16, experts, capacity_factor=1.0, group_size=2),
    }


def assert_every_parameter_trains(layer: nn.Module) -> None:
    """A training forward of ``layer`` (dim 8) and the backward of its squared output plus its aux loss give
    every parameter a nonzero gradient."""
    layer.train()
    out = layer(torch.randn(4, 6, 8))
    (out.pow(2).sum() + layer.aux_loss).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["dense", "soft", "tokens_choice", "experts_choice"])
def test_every_parameter_receives_a_gradient(name):
    assert_every_parameter_trains(all_layers()[name])


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def assert_no_python_loop_over_experts(make, after_backward=None) -> None:
    """The ops dispatched by forward + backward of ``make(experts)`` (dim 8), and by ``after_backward(layer)``
    (a per-step update) when given, are as many at 4 experts as at 16."""
    counts = []
    for experts in (4, 16):
        torch.manual_seed(0)
        layer = make(experts)
        x = torch.randn(4, 16, 8, requires_grad=True)  # capacities stay >= 2 at both sizes
        with OpCounter() as counter:
            (layer(x).sum() + layer.aux_loss).backward()
            if after_backward is not None:
                after_backward(layer)
        counts.append(counter.count)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("name", ["soft", "tokens_choice", "experts_choice"])
def test_no_python_loop_over_experts(name):
    """The ops dispatched by forward + backward do not grow with the number of experts."""
    assert_no_python_loop_over_experts(lambda experts: all_layers(experts)[name].eval())


def forward_flops(layer, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_total_flops()


def test_flops_equal_the_analytic_counts():
    """FlopCounterMode counts matmuls (mm, bmm, addmm, baddbmm) at 2*M*N*K; softmax, GELU,
    norms, gathers and scatters count 0. N = B*T tokens, S = n*p slots."""
    B, T, d, h = 6, 10, 8, 16
    x = torch.randn(B, T, d)
    N = B * T
    assert forward_flops(DenseMLP(d, h), x) == 4 * N * d * h
    for n, p in ((4, 1), (3, 2)):
        S = n * p
        assert forward_flops(SoftMoE(d, h, n, p), x) == 6 * N * S * d + 4 * B * S * d * h
    # groups of 4 examples: one full group (40 tokens) and a leftover group (20 tokens)
    E = 4
    tc = TokensChoiceMoE(d, h, E, k=2, capacity_factor=1.0, group_size=4).eval()
    rows = tc.capacity(40) + tc.capacity(20)  # 20 + 10
    assert forward_flops(tc, x) == 2 * N * d * E + 4 * E * rows * d * h
    ec = ExpertsChoiceMoE(d, h, E, capacity_factor=1.0, group_size=4).eval()
    rows = ec.capacity(40) + ec.capacity(20)  # 10 + 5
    assert forward_flops(ec, x) == 2 * N * d * E + 4 * E * rows * d * h


def test_collect_aux_loss_metrics_and_parameter_counts():
    model = nn.Sequential(
        TokensChoiceMoE(8, 16, 4, k=1, group_size=2), ExpertsChoiceMoE(8, 16, 4, group_size=2), SoftMoE(8, 16, 4),
    ).train()
    track_routing(model, "train")
    model(torch.randn(4, 6, 8))
    total = collect_aux_loss(model)
    assert total.requires_grad and total.item() == pytest.approx(model[0].aux_loss.item())
    metrics = collect_metrics(model)
    assert "0/dropped" in metrics and "1/tokens_0_experts" in metrics and "2/combine_entropy" in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    expert_params = 4 * (8 * 16 + 16 + 16 * 8 + 8)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # Tokens Choice: 1 of 4 experts per token; Experts Choice: C=1 of 4; Soft MoE: all.
    assert counts["active"] == counts["total"] - 2 * expert_params * 3 // 4
