"""What each MoE layer of a trained model did with a batch, from its input and parameters.

The layers keep only summary metrics after a forward (and none in eval mode),
so the per-token routing is computed again here: a forward hook captures each
MoE layer's input (the block's LayerNorm output) and its output, and the
layer's own ``routing(x)`` says what it dispatched where (from the same
routing code its forward runs: Soft MoE's ``routing``, Tokens/Experts Choice's
``route``). ``rebuild_output`` then turns the routing back into the
layer's output; it matching the captured output is the evidence that the
pictures show what the model did.

Sparse routers route groups of ``group_size`` consecutive examples of a
batch, so an image's routing depends on its batch neighbours: feed batches cut
as the run's evaluation cuts them (``data.eval_batch_size``) to see what the
evaluation saw.
"""

from __future__ import annotations

import torch

from ..moe import MoELayer
from ..moe.soft import SoftRouting
from ..moe.sparse import SparseRouting


def moe_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(module name, layer)`` of every MoE layer that routes (has ``routing(x)``), in block order
    (names as in metrics.jsonl)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, MoELayer) and callable(getattr(m, "routing", None))]


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
    """The layer's own routing of ``x``: what its forward computes with (``layer.routing``)."""
    return layer.routing(x)


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
    y = torch.einsum("ne,end->nd", routing.weights.reshape(batch * m, experts), out).reshape(batch, m, dim)
    shared = getattr(layer, "shared", None)  # Tokens Choice's shared experts: every token, outside the routing
    return y if shared is None else y + shared(x32).float()
