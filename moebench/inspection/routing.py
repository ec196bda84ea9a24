"""What each MoE layer of a trained model did with a batch, from its input and parameters.

The layers keep only summary metrics after a forward (and none in eval mode),
so the per-token routing is computed again here: a forward hook captures each
MoE layer's input (the block's LayerNorm output) and its output. Soft MoE's
routing is the layer's own (``SoftMoE.routing``, what its forward computes
with); the sparse routers' is rebuilt from the layer's parameters, in float32
and in eval mode (no gate noise), the way the layer routes.
``rebuild_output`` then turns the routing back into the layer's output; it
matching the captured output is the evidence that the pictures show what the
model did.

Sparse routers route groups of ``group_size`` consecutive examples of a
batch, so an image's routing depends on its batch neighbours: feed batches cut
as the run's evaluation cuts them (``data.eval_batch_size``) to see what the
evaluation saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..moe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, position_in_expert
from ..moe.soft import SoftRouting

ROUTED = (SoftMoE, TokensChoiceMoE, ExpertsChoiceMoE)


@dataclass
class SparseRouting:
    gates: torch.Tensor  # (B, m, E) softmax over experts per token
    requested: torch.Tensor  # (B, m, E) bool: the token chose the expert (Experts Choice: the expert chose it)
    processed: torch.Tensor  # (B, m, E) bool: the expert processed the token (requested minus drops)
    weights: torch.Tensor  # (B, m, E) combine weight: the gate where processed, else 0


def moe_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(module name, layer)`` of every routed MoE layer, in block order (names as in metrics.jsonl)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ROUTED)]


@torch.no_grad()
def capture(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple]]:
    """Run ``model`` on ``images``; returns its logits and ``{layer name: (layer input, layer output)}``."""
    seen: dict[str, tuple] = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out)))
        for name, layer in moe_layers(model)
    ]
    try:
        logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, seen


@torch.no_grad()
def route(layer: torch.nn.Module, x: torch.Tensor) -> SoftRouting | SparseRouting:
    if isinstance(layer, SoftMoE):
        return layer.routing(x)  # the layer's own: what forward computes with
    if isinstance(layer, TokensChoiceMoE):
        return _grouped(layer, x, _tokens_choice)
    if isinstance(layer, ExpertsChoiceMoE):
        return _grouped(layer, x, _experts_choice)
    raise TypeError(f"no routing to recompute for {type(layer).__name__}")


def _grouped(layer, x: torch.Tensor, assign) -> SparseRouting:
    """Cut the batch into routing groups exactly as ``SparseMoE.forward`` does, route each part."""
    batch, tokens, dim = x.shape
    size = min(layer.group_size, batch)
    full = batch - batch % size
    parts = [x[:full].reshape(full // size, size * tokens, dim)]
    if full < batch:
        parts.append(x[full:].reshape(1, (batch - full) * tokens, dim))
    routed = [assign(layer, part) for part in parts]
    fields = zip(*routed)  # gates, requested, processed, weights
    return SparseRouting(*(torch.cat([f.reshape(-1, tokens, f.shape[-1]) for f in field]) for field in fields))


def _gates(layer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.gate.weight.float()).softmax(dim=-1)  # eval: no noise


def _tokens_choice(layer: TokensChoiceMoE, x: torch.Tensor):
    groups, m, _ = x.shape
    experts, k, capacity = layer.num_experts, layer.k, layer.capacity(m)
    gates = _gates(layer, x)
    top_gate, top_expert = gates.topk(k, dim=-1)
    # Buffers fill choice rank by choice rank; within a rank in token order or, with BPR, by top-1 gate.
    if layer.bpr:
        order = torch.argsort(top_gate[..., 0], dim=1, descending=True, stable=True)
    else:
        order = torch.arange(m, device=x.device).expand(groups, m)
    by_rank = order.unsqueeze(-1).expand(groups, m, k)
    queue = top_expert.gather(1, by_rank).transpose(1, 2).reshape(groups, k * m)
    position = position_in_expert(queue, experts).reshape(groups, k, m).transpose(1, 2)
    position = torch.empty_like(position).scatter_(1, by_rank, position)
    kept = position < capacity
    requested = torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, top_expert, True)
    processed = torch.zeros_like(requested).scatter_(-1, top_expert, kept)
    weights = torch.zeros_like(gates).scatter_(-1, top_expert, top_gate * kept)
    return gates, requested, processed, weights


def _experts_choice(layer: ExpertsChoiceMoE, x: torch.Tensor):
    groups, m, _ = x.shape
    gates = _gates(layer, x)
    weight, token = gates.transpose(1, 2).topk(layer.capacity(m), dim=-1)  # (G, E, c)
    picked = torch.zeros_like(gates.transpose(1, 2), dtype=torch.bool).scatter_(-1, token, True).transpose(1, 2)
    weights = torch.zeros_like(gates.transpose(1, 2)).scatter_(-1, token, weight).transpose(1, 2)
    return gates, picked, picked, weights


@torch.no_grad()
def rebuild_output(layer: torch.nn.Module, x: torch.Tensor, routing: SoftRouting | SparseRouting) -> torch.Tensor:
    """The layer's output computed from ``routing`` alone (plus the experts), for checking it."""
    batch, m, dim = x.shape
    x32 = x.float()
    if isinstance(routing, SoftRouting):
        n, p = layer.num_experts, layer.slots_per_expert
        # From the weight matrices the pictures show (not the layer's shortcuts for uniform/identity).
        slot_in = routing.dispatch.transpose(1, 2) @ (routing.tokens if routing.tokens is not None else x32)
        expert_in = slot_in.reshape(batch, n, p, dim).transpose(0, 1).reshape(n, batch * p, dim)
        slot_out = layer.experts(expert_in).float().reshape(n, batch, p, dim).transpose(0, 1).reshape(batch, n * p, dim)
        return routing.combine @ slot_out
    # Every expert on every token (small batches only), then keep what the routing sends where.
    experts = routing.weights.shape[-1]
    flat = x32.reshape(1, batch * m, dim).expand(experts, -1, -1)
    out = layer.experts(flat).float()
    return torch.einsum("ne,end->nd", routing.weights.reshape(batch * m, experts), out).reshape(batch, m, dim)
