"""ReMoE (Wang et al., ICLR 2025; routers-since-2023.md section 2): ReLU gates on the dropless path, the
load-balanced L1 penalty, and its coefficient lambda adapted after each optimizer step towards the target
sparsity 1 - k/E; against the slow reference, by hand, FLOPs counted exactly, lambda saved and resumed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import moe_reference as ref
from helpers import run_on_two_ranks
from moebench.cost import CUSTOM_FLOPS
from moebench.moe import ReMoE, discard_gate_counts, track_routing, update_l1_coefficient
from test_moe import assert_every_parameter_trains, assert_matches_reference, assert_no_python_loop_over_experts
from test_moe_dropless import EXPERT_MATMULS, needs_grouped

pytestmark = pytest.mark.usefixtures("float64_and_seed")  # conftest.py: float64 and seed 0 in every test


def hand_layer(**options) -> ReMoE:
    """4 experts whose gates are the first 4 coordinates of the token: the positive ones run."""
    layer = ReMoE(4, 8, 4, **{"k": 1, **options})
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4))
    return layer


# ----------------------------------------------------------------------------- against the loop reference

@pytest.mark.parametrize("batch,experts,k", [(2, 4, 1), (3, 6, 2), (1, 8, 7)])
def test_remoe_matches_reference(batch, experts, k):
    layer = ReMoE(6, 8, experts, k=k).train()
    with torch.no_grad():
        layer.l1_coeff.fill_(0.3)
    x = torch.randn(batch, 5, 6)
    assert_matches_reference(layer, x, lambda layer, x: ref.remoe(layer, x)[0])
    # the penalty: the same value and the same gradient for the gate
    x = x.clone().requires_grad_()
    layer.zero_grad()
    layer(x)
    (fast,) = torch.autograd.grad(layer.aux_loss, layer.gate.weight)
    _, penalty = ref.remoe(layer, x)
    (slow,) = torch.autograd.grad(0.3 * penalty, layer.gate.weight)
    torch.testing.assert_close(layer.aux_loss, 0.3 * penalty)
    torch.testing.assert_close(fast, slow)


def test_gates_and_penalty_by_hand():
    """Tokens (2, -1, 0.5, -3) and (-1, -1, 4, 1): gates (2, 0, 0.5, 0) and (0, 0, 4, 1); experts 0, 2, 2, 3
    run. N = 2, k = 1, E = 4: penalty = 4 / 4 * (2 * 1 + 0 * 0 + 4.5 * 2 + 1 * 1) = 12."""
    layer = hand_layer().train()
    track_routing(layer)
    x = torch.tensor([[[2.0, -1.0, 0.5, -3.0], [-1.0, -1.0, 4.0, 1.0]]])
    y = layer(x)
    e = lambda i, t: ref.expert(layer.experts, i, x[0, t])
    torch.testing.assert_close(y[0, 0], 2.0 * e(0, 0) + 0.5 * e(2, 0))
    torch.testing.assert_close(y[0, 1], 4.0 * e(2, 1) + 1.0 * e(3, 1))
    assert layer.aux_loss.item() == pytest.approx(1e-8 * 12.0)
    m = layer.metrics
    assert m["l1_loss"].item() == pytest.approx(12.0) and m["l1_coeff"].item() == pytest.approx(1e-8)
    assert (m["sparsity"].item(), m["experts_per_token"].item(), m["tokens_0_experts"].item()) == (0.5, 2.0, 0.0)
    assert m["load_max_over_mean"].item() == 2.0  # loads (1, 0, 2, 1)
    routing = layer.routing(x)
    assert routing.processed[0].tolist() == [[True, False, True, False], [False, False, True, True]]
    torch.testing.assert_close(routing.weights[0], torch.tensor([[2.0, 0, 0.5, 0], [0, 0, 4.0, 1.0]]))


def test_a_token_without_a_positive_gate_outputs_zero():
    """No positive gate in the whole batch: zeros out, and the experts still get a (zero) gradient, as DDP
    expects of every parameter."""
    layer = hand_layer().train()
    track_routing(layer)
    y = layer(-torch.ones(1, 3, 4))
    assert torch.equal(y, torch.zeros(1, 3, 4)) and layer.metrics["tokens_0_experts"].item() == 1.0
    (y.sum() + layer.aux_loss).backward()
    for name, p in layer.experts.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


# ----------------------------------------------------------------------------- lambda

def test_lambda_schedule_by_hand():
    """target 1 - 1/4 = 0.75. Sparsity 0.5 (below): lambda x 1.2; 0.875 (above): / 1.2; exactly 0.75: stays
    (the paper's sign). Two forwards before a step pool their gates; eval forwards count nothing."""
    layer = hand_layer(l1_init=1.0, l1_factor=1.2).train()
    two_of_four = torch.tensor([[[1.0, 1.0, -1.0, -1.0]]])
    none = -torch.ones(1, 1, 4)
    layer(two_of_four)
    assert update_l1_coefficient(layer) == 1
    assert layer.l1_coeff.item() == pytest.approx(1.2)
    layer(none)  # sparsity 1
    layer(torch.tensor([[[1.0, -1.0, -1.0, -1.0], [-1.0] * 4]]))  # 1 of 8: pooled 1 of 12, 0.917 > 0.75
    update_l1_coefficient(layer)
    assert layer.l1_coeff.item() == pytest.approx(1.0)
    layer(torch.tensor([[[1.0, -1.0, -1.0, -1.0]]]))  # 1 of 4: exactly the target
    update_l1_coefficient(layer)
    assert layer.l1_coeff.item() == pytest.approx(1.0)
    layer.eval()(two_of_four)  # evaluation: nothing counted
    assert update_l1_coefficient(layer) == 0 and layer.l1_coeff.item() == pytest.approx(1.0)
    layer.train()(two_of_four)
    layer.routing(two_of_four)  # inspection is no training forward either
    discard_gate_counts(layer)  # a skipped step
    assert update_l1_coefficient(layer) == 0 and layer.l1_coeff.item() == pytest.approx(1.0)


def test_lambda_is_one_value_over_layers_from_their_pooled_sparsity():
    """Layer A passes 3 of 4 gates, layer B 0 of 4: pooled sparsity 5/8 < 0.75, so both go up, though B alone
    is above its target."""
    model = nn.Sequential(hand_layer(l1_init=2.0), hand_layer(l1_init=2.0)).train()
    model[0](torch.tensor([[[1.0, 1.0, 1.0, -1.0]]]))
    model[1](-torch.ones(1, 1, 4))
    assert update_l1_coefficient(model) == 2
    assert model[0].l1_coeff.item() == model[1].l1_coeff.item() == pytest.approx(2.4)


def test_lambda_weights_the_loss_and_is_a_saved_buffer_not_a_parameter():
    layer = hand_layer(l1_init=0.5).train()
    layer(torch.tensor([[[1.0, 1.0, -1.0, -1.0]]]))
    update_l1_coefficient(layer)
    assert "l1_coeff" in layer.state_dict() and "l1_coeff" not in dict(layer.named_parameters())
    fresh = hand_layer()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.l1_coeff.item() == pytest.approx(0.6)
    x = torch.tensor([[[2.0, -1.0, 0.5, -3.0], [-1.0, -1.0, 4.0, 1.0]]])
    fresh.train()(x)
    assert fresh.aux_loss.item() == pytest.approx(0.6 * 12.0)


def test_lambda_stays_float32_in_a_bf16_model():
    layer = hand_layer().float().to(torch.bfloat16)
    assert layer.l1_coeff.dtype == torch.float32 and layer.experts.w1.dtype == torch.bfloat16
    for _ in range(3):
        layer.train()(torch.tensor([[[1.0, 1.0, -1.0, -1.0]]], dtype=torch.bfloat16))
        update_l1_coefficient(layer)
    assert layer.l1_coeff.item() == pytest.approx(1e-8 * 1.2**3, rel=1e-6)


def test_a_resumed_training_ends_bit_identical_to_an_uninterrupted_one():
    """6 AdamW steps with lambda adapted after each; stop after 3, save what a checkpoint saves, rebuild and
    continue: the same weights and lambda, bit for bit."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(*(ReMoE(6, 8, 4, k=1, l1_init=0.01) for _ in range(2)))

    data = torch.randn(6, 4, 5, 6, generator=torch.Generator().manual_seed(1))

    def train(model, optimizer, steps):
        for x in steps:
            optimizer.zero_grad(set_to_none=True)
            y = model(x)
            (y.pow(2).mean() + sum(layer.aux_loss for layer in model)).backward()
            optimizer.step()
            update_l1_coefficient(model)

    straight = make()
    opt = torch.optim.AdamW(straight.parameters(), lr=0.05)
    train(straight, opt, data)

    first = make()
    opt = torch.optim.AdamW(first.parameters(), lr=0.05)
    train(first, opt, data[:3])
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": opt.state_dict()})
    resumed = make()
    opt = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    train(resumed, opt, data[3:])

    assert straight[0].l1_coeff.item() != 0.01
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def ddp_lambda_on_rank(rank: int) -> None:
    torch.set_default_dtype(torch.float64)
    full = hand_layer(l1_init=1.0).train()
    # rank 0: 3 of 4 gates positive (sparsity 0.25), rank 1: none (sparsity 1); together 3 of 8: 0.625 < 0.75
    x = torch.tensor([[[1.0, 1.0, 1.0, -1.0]], [[-1.0, -1.0, -1.0, -1.0]]])
    full(x[rank:rank + 1])
    update_l1_coefficient(full)
    assert full.l1_coeff.item() == pytest.approx(1.2), full.l1_coeff  # rank 1 alone would divide
    assert full.trained_gates.tolist() == [3.0, 8.0]  # the training compute counts both ranks' gates


@pytest.mark.slow  # two spawned processes: ~20 s on 2 busy cores
def test_lambda_update_sums_the_gates_over_ranks(tmp_path):
    run_on_two_ranks(ddp_lambda_on_rank, tmp_path)


# ----------------------------------------------------------------------------- cost

@needs_grouped
def test_flops_count_the_positive_gates_exactly():
    """Forward FLOPs: the gate (2 N d E) plus 4 d h per positive gate, whatever their number."""
    torch.set_default_dtype(torch.float32)
    B, T, d, h, E = 2, 8, 8, 16, 8
    layer = ReMoE(d, h, E, k=2).eval()
    x = torch.randn(B, T, d)
    active = int((layer.routing(x).processed).sum())
    assert 0 < active < B * T * E
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * B * T * d * E + 4 * active * d * h


@pytest.mark.parametrize("matmul", EXPERT_MATMULS)
def test_no_python_loop_over_experts(matmul):
    torch.set_default_dtype(torch.float32)
    assert_no_python_loop_over_experts(
        lambda experts: track_routing(ReMoE(8, 16, experts, k=1, dropless_matmul=matmul).train()),
        update_l1_coefficient)


def test_every_parameter_trains():
    assert_every_parameter_trains(ReMoE(8, 16, 4, k=1))


def test_inspection_rebuilds_the_output():
    from moebench.inspection.routing import rebuild_output, route
    from moebench.inspection.summary import LayerSummary

    torch.set_default_dtype(torch.float32)
    layer = ReMoE(8, 16, 4, k=1).eval()
    x = torch.randn(3, 16, 8)
    with torch.no_grad():
        y = layer(x)
    routing = route(layer, x)
    torch.testing.assert_close(rebuild_output(layer, x, routing), y, atol=1e-5, rtol=1e-4)
    summary = LayerSummary("remoe", 4, 16)
    summary.add(routing)
    result = summary.result()
    assert sum(result["load_share"]) == pytest.approx(1.0) and "tokens_2plus_experts" in result


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("options,needle", [
    (dict(k=4), "k (router.k) must be in [1, experts=4) for remoe: the target sparsity 1 - k/experts"),
    (dict(k=0), "k (router.k) must be in [1, experts=4)"),
    (dict(l1_init=0.0), "router.l1_init must be > 0"),
    (dict(l1_factor=1.0), "router.l1_factor must be > 1"),
    (dict(l1_factor=-1.2), "router.l1_factor must be > 1"),
])
def test_the_layer_refuses_bad_settings_in_one_line(options, needle):
    with pytest.raises(ValueError) as err:
        ReMoE(6, 8, 4, **options)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,line", [
    (["variant=remoe_e32", "experts=4", "k=4"], "k (router.k) must be in [1, experts=4) for remoe: the target "
     "sparsity 1 - k/experts must lie in (0, 1), got k=4"),
    (["variant=remoe_e32", "router.l1_init=-1"], "router.l1_init must be a finite number > 0, got -1"),
    (["variant=remoe_e32", "router.l1_factor=0.5"], "router.l1_factor must be > 1 (lambda's step up or down), "
     "got 0.5"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, overrides, line, cli_in_process):
    from conftest import TINY

    code, _, err = cli_in_process("train", *TINY, *overrides, cwd=tmp_path)
    assert code == 2 and err.splitlines() == [f"moebench: error: {line}"], err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_a_bad_target_is_one_line_from_a_fresh_process(tmp_path):
    from conftest import TINY, refusal_line

    assert refusal_line(tmp_path, "train", *TINY, "variant=remoe_e32", "k=32") == (
        "moebench: error: k (router.k) must be in [1, experts=32) for remoe: the target sparsity 1 - k/experts must "
        "lie in (0, 1), got k=32")


def test_labels():
    from moebench.moe import registry

    label = registry.get("remoe").label
    assert label({"num_experts": 32, "k": 1, "l1_init": 1e-8, "l1_factor": 1.2}.get) == ["E32", "k1"]
    assert label({"num_experts": 32, "k": 2, "l1_init": 1e-6, "l1_factor": 1.5}.get) == [
        "E32", "k2", "alpha1.5", "lambda0_1e-06"]


@pytest.mark.slow  # three tiny runs
def test_an_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Through the CLI: lambda moved every step, is in the checkpoint, and resumes exactly; its trajectory and
    the realised sparsity are in the routing metrics."""
    from conftest import metric_lines, result, train

    common = ["variant=remoe_e32", "experts=4", "train.epochs=3", "deterministic=true", "data.num_train=96"]
    proc, straight = train(tmp_path, *common, name="straight")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc, cut = train(tmp_path, *common, "train.time_limit_min=0", name="cut")
    assert proc.returncode == 0 and result(cut)["status"] == "stopped", proc.stderr[-2000:]
    proc, _ = train(tmp_path, *common, f"resume={cut}", name="resumed")
    assert proc.returncode == 0 and result(cut)["status"] == "completed", proc.stderr[-2000:]
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "last.pt", weights_only=True)["model"]
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key
    coeffs = [tensor for key, tensor in a.items() if key.endswith("l1_coeff")]
    assert coeffs and all(c.item() != 1e-8 for c in coeffs)
    keys = {key for line in metric_lines(cut) for key in line}
    assert any(key.endswith("/l1_coeff") for key in keys) and any(key.endswith("/sparsity") for key in keys)
    assert result(straight)["quality"] == result(cut)["quality"]
