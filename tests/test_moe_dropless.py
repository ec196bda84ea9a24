"""Dropless Tokens Choice (MegaBlocks, arXiv 2211.15841; routers-since-2023.md section 2): no capacity,
every choice processed, the experts run on the choices sorted by expert (a grouped matmul, or padding
to the largest load); against the slow reference, by hand, and its FLOPs counted exactly."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moe_reference as ref
from moebench.cost import CUSTOM_FLOPS
from moebench.moe import TokensChoiceMoE, track_routing, update_balancing_bias
from moebench.moe.dropless import grouped_mm_available, select_matmul
from test_moe import assert_every_parameter_trains, assert_matches_reference, assert_no_python_loop_over_experts

needs_grouped = pytest.mark.skipif(not grouped_mm_available(), reason="this torch has no torch._grouped_mm")
# both dropless expert calls, the grouped one where this torch has it (test_moe_remoe.py uses them too)
EXPERT_MATMULS = [pytest.param("grouped", marks=needs_grouped), "padded"]

pytestmark = pytest.mark.usefixtures("float64_and_seed")  # conftest.py: float64 and seed 0 in every test


def dropless(dim=6, hidden=8, experts=4, **options) -> TokensChoiceMoE:
    return TokensChoiceMoE(dim, hidden, experts, **{"group_size": 2, "dropless": True, **options})


def flops(layer, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        layer(x)
    return counter.get_total_flops()


CASES = [  # (batch, options): a remainder group (5 images in groups of 2), k > 1, every gate and assignment
    (4, dict(k=1)),
    (5, dict(k=2, bpr=False)),
    (5, dict(k=3, capacity_factor=0.25)),  # the capacity factor changes nothing
    (4, dict(k=2, assignment="sinkhorn")),
    (5, dict(k=1, gate="sigmoid", bias_rate=0.001, load_weight=0.0, granularity=2, shared_experts=1,
             routed_scaling=2.0)),
]


@pytest.mark.parametrize("batch,options", CASES)
def test_dropless_matches_reference(batch, options):
    layer = dropless(**options).eval()
    if layer.balancing:
        with torch.no_grad():
            layer.selection_bias.copy_(torch.randn(layer.num_experts) * 0.3)
    x = torch.randn(batch, 5, 6) * 2
    assert select_matmul(None, layer.experts, x) == "padded"  # float64: the grouped matmul does not run
    reference = ref.sinkhorn_tokens_choice if layer.assignment == "sinkhorn" else ref.tokens_choice
    assert_matches_reference(layer, x, lambda layer, x: reference(layer, x)[0])
    _, dropped = reference(layer, x)
    assert not dropped
    layer.track_routing = True
    layer(x)
    assert layer.metrics["dropped"].item() == 0.0 and 0.0 <= layer.metrics["padding"].item() < 1.0


def test_all_tokens_on_one_expert_by_hand():
    """Every token's top choice is expert 0: capacity Tokens Choice (C=1: 2 slots for 8 tokens) keeps 2 and
    drops 6; dropless processes all 8, each weighted by its gate; padding to the largest load (8) fills 8 of
    the 4 x 8 rows."""
    layer = dropless(4, 8, 4, k=1, group_size=1, noise_std=0.0, dropless_matmul="padded").eval()
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4))
    x = torch.zeros(1, 8, 4)
    x[0, :, 0] = torch.linspace(1.0, 2.0, 8)
    track_routing(layer)
    y = layer(x)
    gates = torch.softmax(x[0] @ layer.gate.weight.T, -1)[:, 0]
    for t in range(8):
        torch.testing.assert_close(y[0, t], gates[t] * ref.expert(layer.experts, 0, x[0, t]))
    m = layer.metrics
    assert (m["dropped"].item(), m["load_max_over_mean"].item(), m["padding"].item()) == (0.0, 4.0, 0.75)
    routing = layer.routing(x)
    assert routing.processed[0, :, 0].all() and routing.processed.sum() == 8
    capped = TokensChoiceMoE(4, 8, 4, k=1, group_size=1, noise_std=0.0, capacity_factor=1.0).eval()
    capped.load_state_dict(layer.state_dict())
    track_routing(capped)
    capped(x)
    assert capped.metrics["dropped"].item() == 0.75  # what dropless saves


@needs_grouped
@pytest.mark.parametrize("k", [1, 3])
def test_grouped_and_padded_agree_in_float32(k):
    """The default expert call (torch._grouped_mm) and the padded bmm: the same outputs and gradients."""
    torch.set_default_dtype(torch.float32)
    results = []
    for matmul in ("grouped", "padded"):
        torch.manual_seed(0)
        layer = dropless(8, 16, 8, k=k, gate="sigmoid", dropless_matmul=matmul).train()
        x = torch.randn(5, 6, 8, requires_grad=True)
        assert select_matmul(layer.dropless_matmul, layer.experts, x) == matmul
        torch.manual_seed(1)
        y = layer(x)
        (y.pow(2).sum() + layer.aux_loss).backward()
        results.append([y, x.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_grouped
def test_grouped_runs_under_bf16_autocast():
    """The experts follow the caller's autocast on the grouped path as on the padded one (routing stays float32)."""
    torch.set_default_dtype(torch.float32)
    layer = dropless(8, 16, 4, k=2).eval()
    x = torch.randn(3, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert select_matmul(None, layer.experts, x) == "grouped"
        y = layer(x)
        padded = dropless(8, 16, 4, k=2, dropless_matmul="padded").eval()
        padded.load_state_dict(layer.state_dict())
        z = padded(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, z, atol=2e-2, rtol=2e-2)


@needs_grouped
@pytest.mark.parametrize("k", [1, 2])
def test_flops_count_every_assignment_once(k):
    """Forward FLOPs: the gate (2 N d E) and exactly N k expert MLPs (4 d h each) on the grouped path, what
    capacity Tokens Choice at C=1 costs when its capacities divide; the padded path computes (and the counter
    counts) E x max load rows, its padding included."""
    torch.set_default_dtype(torch.float32)
    B, T, d, h, E = 4, 8, 8, 16, 4
    N = B * T
    x = torch.randn(B, T, d)
    layer = dropless(d, h, E, k=k, group_size=4).eval()
    assert flops(layer, x) == 2 * N * d * E + 4 * N * k * d * h
    capped = TokensChoiceMoE(d, h, E, k=k, group_size=4, capacity_factor=1.0).eval()
    assert flops(capped, x) == flops(layer, x)
    padded = dropless(d, h, E, k=k, group_size=4, dropless_matmul="padded").eval()
    padded.load_state_dict(layer.state_dict())
    load = int(padded.routing(x).requested.sum((0, 1)).max())
    assert flops(padded, x) == 2 * N * d * E + 4 * E * load * d * h


@pytest.mark.parametrize("matmul", EXPERT_MATMULS)
def test_no_python_loop_over_experts(matmul):
    torch.set_default_dtype(torch.float32)
    assert_no_python_loop_over_experts(
        lambda experts: dropless(8, 16, experts, k=2, dropless_matmul=matmul, gate="sigmoid", bias_rate=0.01,
                                 load_weight=0.0).train(),
        update_balancing_bias)


def test_every_parameter_trains():
    assert_every_parameter_trains(dropless(8, 16, 4, k=2, importance_weight=0.01))


def test_label_and_old_runs():
    """The label says dropless instead of a capacity; a run without the key (older) is capacity-based."""
    from moebench.moe import registry

    label = registry.get("tokens_choice").label
    base = {"num_experts": 32, "k": 1, "capacity_factor": 1.0, "bpr": True}
    assert label(base.get) == label({**base, "dropless": None}.get) == ["E32", "k1", "C1.0"]
    assert label({**base, "dropless": True, "bpr": False}.get) == ["E32", "k1", "dropless"]
    assert TokensChoiceMoE(6, 8, 4, dropless=None).dropless is False


def test_inspection_rebuilds_the_dropless_output():
    from moebench.inspection.routing import rebuild_output, route

    torch.set_default_dtype(torch.float32)
    layer = dropless(8, 16, 4, k=2, group_size=2).eval()
    x = torch.randn(5, 16, 8)
    with torch.no_grad():
        y = layer(x)
    routing = route(layer, x)
    torch.testing.assert_close(rebuild_output(layer, x, routing), y, atol=1e-5, rtol=1e-4)
    assert bool((routing.processed.sum(-1) == 2).all())


def test_a_bad_dropless_value_is_one_line_from_the_cli(tmp_path):
    from conftest import TINY, refusal_line

    assert refusal_line(tmp_path, "train", *TINY, "variant=tc_e32_k1_dropless", "router.dropless=3") == (
        "moebench: error: router.dropless must be true or false or null, got 3")


@pytest.mark.slow  # dynamo tracing on 2 busy cores
def test_torch_compile_runs_the_dropless_expert_call_eagerly():
    """Under torch.compile (the eager backend: no C++ build) dropless Tokens Choice and ReMoE give the eager
    outputs; the expert call itself stays eager (data-dependent shapes; the grouped matmul's meta kernel refuses
    float32), and ReMoE's training forwards still count their gates for lambda."""
    from moebench.moe import ReMoE, update_l1_coefficient

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    for layer in (dropless(16, 32, 4, k=2, noise_std=0.0), ReMoE(16, 32, 4, k=1)):
        compiled = torch.compile(layer, backend="eager")
        x = torch.randn(4, 6, 16)
        y = compiled(x)
        (y.sum() + layer.aux_loss).backward()
        torch.testing.assert_close(y, layer(x))
    assert layer.take_gate_counts()[1] == 2 * 4 * 6 * 4  # both training forwards counted
    layer(x)
    assert update_l1_coefficient(layer) == 1
