"""Routers that pick pairs by a transport plan (Liu et al., TMLR 2024): Sinkhorn Tokens and Experts
Choice, sparsity-constrained Experts Choice; against the slow references (routers-since-2023.md, 1)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moe_reference as ref
from moebench.moe import ExpertsChoiceMoE, TokensChoiceMoE
from moebench.moe.plans import plan_balance, project_sparse_simplex, sinkhorn_plan, sparse_ot_plan
from test_moe import assert_coverage_matches_reference, assert_matches_reference, assert_no_python_loop_over_experts

pytestmark = pytest.mark.usefixtures("float64_and_seed")  # conftest.py: float64 and seed 0 in every test


# ----------------------------------------------------------------------------- the plans

@pytest.mark.parametrize("m,experts,iterations", [(6, 3, 1), (8, 4, 20), (5, 2, 7), (12, 4, 3)])
def test_sinkhorn_plan_matches_the_scaling_form(m, experts, iterations):
    logits = torch.randn(3, m, experts) * 2
    fast = sinkhorn_plan(logits, iterations)
    for g in range(3):
        torch.testing.assert_close(fast[g], torch.tensor(ref.sinkhorn(logits[g], iterations)), rtol=1e-10, atol=1e-12)


def test_sinkhorn_plan_meets_its_marginals():
    """Rows sum to 1 after every iteration (the last update is the rows'); columns converge to
    m / E; large logits, where exp() overflows float32, still give a finite balanced plan."""
    logits = torch.randn(2, 16, 4) * 3
    plan = sinkhorn_plan(logits, 1)
    torch.testing.assert_close(plan.sum(-1), torch.ones(2, 16))
    assert (plan.sum(1) - 4).abs().max() > 1e-3  # one iteration: columns not there yet
    plan = sinkhorn_plan(logits, 300)
    torch.testing.assert_close(plan.sum(1), torch.full((2, 4), 4.0), rtol=0, atol=1e-8)
    rows, columns = plan_balance(plan)
    assert float(rows) < 1e-12 and float(columns) < 1e-8
    big = sinkhorn_plan((logits * 100).float(), 300)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big.sum(-1), torch.ones(2, 16, dtype=torch.float32), rtol=0, atol=1e-4)
    # a constant per row or column changes nothing: the plan depends on the logits' differences only
    shifted = logits + torch.randn(2, 16, 1) + torch.randn(2, 1, 4)
    torch.testing.assert_close(sinkhorn_plan(shifted, 300), plan, rtol=0, atol=1e-8)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_sparse_simplex_projection(k):
    x = torch.randn(5, 6)
    fast = project_sparse_simplex(x, k)
    for row, values in zip(fast, x):
        top = sorted(range(6), key=lambda i: -values[i])[:k]
        expected = torch.zeros(6)
        expected[top] = torch.tensor(ref.simplex_projection([float(values[i]) for i in top]))
        torch.testing.assert_close(row, expected)
    assert ((fast > 0).sum(-1) <= k).all()
    torch.testing.assert_close(fast.sum(-1), torch.ones(5))
    # a vector already on the simplex is its own projection
    onto = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    torch.testing.assert_close(project_sparse_simplex(onto, 3), onto)


@pytest.mark.parametrize("m,experts,k,iterations", [(8, 4, 2, 20), (6, 3, 2, 5), (10, 2, 5, 40)])
def test_sparse_ot_plan_matches_reference(m, experts, k, iterations):
    scores = torch.randn(2, m, experts).softmax(-1)
    fast = sparse_ot_plan(scores, k, iterations, lr=0.05)
    for g in range(2):
        torch.testing.assert_close(fast[g], torch.tensor(ref.sparse_ot(scores[g], k, iterations, 0.05)))
    # every column holds exactly its mass m / E on at most k tokens, whatever the iterations
    torch.testing.assert_close(fast.sum(1), torch.full((2, experts), m / experts))
    assert ((fast > 0).sum(1) <= k).all()


def test_sparse_ot_plan_rows_approach_one_with_iterations():
    """Rows reach their mass only as the dual converges: 20 of the authors' Adam steps leave them
    far off; many more steps bring them close (the approximation recipe 14 measures)."""
    scores = torch.randn(4, 16, 4).softmax(-1)
    rows_20 = float(plan_balance(sparse_ot_plan(scores, 4, 20, 0.01))[0])
    rows_long = float(plan_balance(sparse_ot_plan(scores, 4, 4000, 0.01, tol=0.0))[0])
    assert rows_long < 0.05 < rows_20


def test_sparse_ot_plan_stops_a_converged_group():
    """A group whose gradient is already small stops (jaxopt's tol); the others go on."""
    scores = torch.full((2, 4, 2), 0.5)  # uniform, k = m: alpha = 0 is optimal, the gradient is 0 at once
    scores[1] = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    both = sparse_ot_plan(scores, 4, 20, 0.01)
    torch.testing.assert_close(both[0], torch.full((4, 2), 0.5))
    torch.testing.assert_close(both[1:], sparse_ot_plan(scores[1:], 4, 20, 0.01))
    torch.testing.assert_close(both[1], torch.tensor(ref.sparse_ot(scores[1], 4, 20, 0.01)))
    # the rule itself: a tolerance no gradient meets stops every group after its first step
    assert torch.equal(sparse_ot_plan(scores, 4, 20, 0.01, tol=1e9), sparse_ot_plan(scores, 4, 1, 0.01))
    assert not torch.equal(sparse_ot_plan(scores, 4, 20, 0.01, tol=0.0), sparse_ot_plan(scores, 4, 1, 0.01))


# ----------------------------------------------------------------------------- the routers

@pytest.mark.parametrize("batch,k,factor,bpr", [(4, 1, 1.0, True), (5, 2, 1.0, True), (3, 1, 0.5, False), (4, 2, 2.0, False)])
def test_sinkhorn_tokens_choice_matches_reference(batch, k, factor, bpr):
    layer = TokensChoiceMoE(6, 8, 4, k=k, capacity_factor=factor, bpr=bpr, group_size=2, assignment="sinkhorn",
                            plan_iterations=5).eval()
    layer.track_routing = True
    x = torch.randn(batch, 5, 6) * 2
    assert_matches_reference(layer, x, lambda layer, x: ref.sinkhorn_tokens_choice(layer, x)[0])
    _, dropped = ref.sinkhorn_tokens_choice(layer, x)
    layer(x)
    assert layer.metrics["dropped"].item() == pytest.approx(len(dropped) / (k * batch * 5))
    assert {"plan_row_error", "plan_column_error"} <= set(layer.metrics)


@pytest.mark.parametrize("assignment", ["sinkhorn", "sparse_ot"])
@pytest.mark.parametrize("batch,factor,rounding", [(4, 1.0, "round"), (5, 0.5, "round"), (3, 2.0, "ceil")])
def test_plan_experts_choice_matches_reference(assignment, batch, factor, rounding):
    layer = ExpertsChoiceMoE(6, 8, 4, capacity_factor=factor, group_size=2, capacity_rounding=rounding,
                             assignment=assignment, plan_iterations=6, plan_lr=0.05).eval()
    layer.track_routing = True
    x = torch.randn(batch, 5, 6) * 2
    assert_matches_reference(layer, x, lambda layer, x: ref.plan_experts_choice(layer, x)[0])
    assert_coverage_matches_reference(layer, x, ref.plan_experts_choice)


def test_sinkhorn_balances_what_softmax_crowds():
    """Every token prefers expert 0: softmax Tokens Choice sends them all there and drops most;
    the Sinkhorn plan spreads them over both experts and drops none (capacity = m / E)."""
    x = torch.randn(1, 8, 4)
    layers = {}
    for assignment in ("softmax", "sinkhorn"):
        layer = TokensChoiceMoE(4, 8, 2, k=1, capacity_factor=1.0, group_size=1, assignment=assignment).eval()
        with torch.no_grad():
            layer.gate.weight.zero_()
            layer.gate.weight[0, 0] = 1.0
        layer.track_routing = True
        layers[assignment] = layer
    x[..., 0] = torch.linspace(1.0, 2.0, 8)  # logits (x0, 0): expert 0 first for every token
    for layer in layers.values():
        layer(x)
    assert layers["softmax"].metrics["dropped"].item() == pytest.approx(0.5)
    assert layers["sinkhorn"].metrics["dropped"].item() == 0.0
    # the plan gives expert 0 the tokens that prefer it most
    routing = layers["sinkhorn"].routing(x)
    assert routing.processed[0, 4:, 0].all() and routing.processed[0, :4, 1].all()


def test_sparse_ot_fills_a_short_column_with_the_first_tokens():
    """A column with fewer than c non-zeros is topped up with the lowest-index tokens at plan 0, as
    the authors' top_k picks them; the metric counts those picks."""
    layer = ExpertsChoiceMoE(2, 4, 2, capacity_factor=2.0, group_size=1, assignment="sparse_ot", noise_std=0.0).eval()
    layer.track_routing = True
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[8.0, 0.0], [-8.0, 0.0]]))
    # c = 4 of 4 tokens: expert 0's column is the softmax of token 0's huge lead, so its projection keeps
    # only token 0 at the first step; the rest of its picks are tokens 1, 2, 3 at plan 0
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [-0.5, 0.0], [-1.0, 0.0]]])
    plan = sparse_ot_plan(torch.softmax(x[0] @ layer.gate.weight.T, -1).unsqueeze(0), 4, 20, 0.01)
    layer(x)
    zeros = (plan == 0).double().mean().item()
    assert zeros > 0
    assert layer.metrics["zero_plan_picks"].item() == pytest.approx(zeros)
    torch.testing.assert_close(layer(x), ref.plan_experts_choice(layer, x)[0])


def test_plan_routers_count_the_same_flops_as_softmax():
    """The plan adds element-wise work only (exp, log-sum-exp, sorts), which FlopCounterMode counts
    as 0, as it counts softmax: a plan router's FLOPs equal its softmax twin's exactly."""
    x = torch.randn(6, 10, 8)

    def flops(layer):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer.eval()(x)
        return counter.get_total_flops()

    tc = flops(TokensChoiceMoE(8, 16, 4, k=2, group_size=4))
    assert flops(TokensChoiceMoE(8, 16, 4, k=2, group_size=4, assignment="sinkhorn")) == tc
    ec = flops(ExpertsChoiceMoE(8, 16, 4, group_size=4))
    for assignment in ("sinkhorn", "sparse_ot"):
        assert flops(ExpertsChoiceMoE(8, 16, 4, group_size=4, assignment=assignment)) == ec


@pytest.mark.parametrize("make", [
    lambda e: TokensChoiceMoE(8, 16, e, k=2, group_size=2, assignment="sinkhorn"),
    lambda e: ExpertsChoiceMoE(8, 16, e, group_size=2, assignment="sinkhorn"),
    lambda e: ExpertsChoiceMoE(8, 16, e, group_size=2, assignment="sparse_ot"),
])
def test_plan_routers_have_no_python_loop_over_experts(make):
    assert_no_python_loop_over_experts(lambda experts: make(experts).eval())


def test_plan_routers_train_every_parameter():
    for layer in (TokensChoiceMoE(8, 16, 4, k=2, group_size=2, assignment="sinkhorn"),
                  ExpertsChoiceMoE(8, 16, 4, group_size=2, assignment="sinkhorn", noise_std=1.0),
                  ExpertsChoiceMoE(8, 16, 4, group_size=2, assignment="sparse_ot")):
        layer.train()
        (layer(torch.randn(4, 6, 8)).pow(2).sum() + layer.aux_loss).backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (layer.assignment, name)


def test_bad_assignments_are_refused():
    with pytest.raises(ValueError, match="assignment"):
        TokensChoiceMoE(8, 16, 4, assignment="sparse_ot")
    with pytest.raises(ValueError, match="plan_iterations"):
        ExpertsChoiceMoE(8, 16, 4, assignment="sinkhorn", plan_iterations=0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_plan(torch.zeros(1, 2, 2), 0)


def test_null_options_are_the_defaults():
    """A config's null (the keys came after runs that lack them) builds the softmax router, bit for bit."""
    x = torch.randn(2, 5, 8)
    nulls = {"assignment": None, "plan_iterations": None}
    for make, extra in ((lambda **kw: TokensChoiceMoE(8, 16, 4, group_size=2, **kw), {}),
                        (lambda **kw: ExpertsChoiceMoE(8, 16, 4, group_size=2, **kw), {"plan_lr": None})):
        torch.manual_seed(1)
        default = make().eval()
        torch.manual_seed(1)
        null = make(**nulls, **extra).eval()
        assert null.assignment == "softmax" and null.plan_iterations == 20
        assert torch.equal(null(x), default(x))
