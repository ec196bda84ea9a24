"""Routers compute in float32 under bf16 autocast; only the experts follow the autocast."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moebench.moe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE

aten = torch.ops.aten


def layers():
    return {
        "soft": SoftMoE(16, 32, 4, 2),
        "tokens_choice": TokensChoiceMoE(16, 32, 4, k=2, capacity_factor=0.75, group_size=2, noise_std=0.0),
        "experts_choice": ExpertsChoiceMoE(16, 32, 4, capacity_factor=1.0, group_size=2),
    }


class OutputDtypes(TorchDispatchMode):
    """Records (op, output) of every op dispatched below autocast, i.e. as actually run."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.append((func.overloadpacket, out))
        return out

    def outputs(self, *ops):
        return [out for op, out in self.seen if op in ops]


def inputs():
    torch.manual_seed(0)
    return torch.randn(4, 6, 16) * 2


@pytest.mark.parametrize("name", ["soft", "tokens_choice", "experts_choice"])
def test_routing_ops_run_in_float32_and_experts_in_bf16_under_autocast(name):
    torch.manual_seed(0)
    layer = layers()[name].train()
    with torch.autocast("cpu", dtype=torch.bfloat16), OutputDtypes() as mode:
        y = layer(inputs())
    routing = mode.outputs(aten._softmax, aten.topk, aten.mm, aten.bmm, aten.sort)
    assert routing, "no routing op recorded"
    for out in routing:
        first = out[0] if isinstance(out, tuple) else out
        if first.is_floating_point():  # sorts of integer expert ids are exact anyway
            assert first.dtype == torch.float32
    experts = mode.outputs(aten.baddbmm)
    assert len(experts) == 2 and all(out.dtype == torch.bfloat16 for out in experts)  # the expert MLP matmuls
    assert y.dtype == torch.float32  # the input's dtype, for the residual stream
    # Softmaxes in float32 sum to 1 to float32 precision (bf16 weights would be off by ~1e-3).
    for probs in mode.outputs(aten._softmax):
        sums = [probs.sum(dim) for dim in range(1, probs.dim())]
        assert any(torch.allclose(s, torch.ones_like(s), atol=2e-6, rtol=0) for s in sums)


@pytest.mark.parametrize("name", ["soft", "tokens_choice", "experts_choice"])
def test_autocast_changes_only_the_expert_arithmetic(name):
    """Same routing decisions and statistics as in float32; outputs within bf16 error of the expert MLPs."""
    torch.manual_seed(0)
    layer = layers()[name].eval()
    layer.track_routing = True
    x = inputs()
    y32 = layer(x)
    metrics32 = dict(layer.metrics)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    torch.testing.assert_close(y16, y32, atol=3e-2 * y32.abs().max().item(), rtol=3e-2)
    assert metrics32.keys() == layer.metrics.keys()
    for key, value in metrics32.items():
        if key.startswith("slot_"):  # slot inputs are float32 in both runs, but this one is computed from them
            torch.testing.assert_close(layer.metrics[key], value)
        else:
            assert torch.equal(layer.metrics[key], value), key


def test_soft_moe_logits_are_float32_and_identical_under_autocast():
    layer = SoftMoE(16, 32, 4, 2)
    x = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.logits(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, layer.logits(x))


def test_gradients_reach_router_parameters_in_float32_under_autocast():
    layer = layers()["tokens_choice"].train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(inputs())
        loss = out.float().pow(2).sum() + layer.aux_loss
    loss.backward()
    assert layer.gate.weight.grad.dtype == torch.float32 and layer.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["soft", "tokens_choice", "experts_choice"])
def test_a_bf16_model_takes_the_routers_float32_output_into_its_experts(name):
    """``model.to(torch.bfloat16)`` without autocast: the router still routes in float32 and the
    experts take its output in their own dtype; output and gradients within bf16 error of float32."""
    torch.manual_seed(0)
    layer32 = layers()[name].eval()
    layer16 = layers()[name].eval()
    layer16.load_state_dict(layer32.state_dict())
    layer16.to(torch.bfloat16)
    x = inputs()
    y32 = layer32(x)
    x16 = x.to(torch.bfloat16).requires_grad_(True)
    y16 = layer16(x16)
    assert y16.dtype == torch.bfloat16
    y16.float().sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and layer16.experts.w1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=5e-2 * y32.abs().max().item(), rtol=5e-2)
