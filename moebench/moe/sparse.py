"""What Tokens Choice and Experts Choice share: the gate, groups and one expert call.

A batch (B, T, d) is cut into groups of ``group_size`` consecutive examples.
When B is not a multiple of the group size (the last batch of an epoch), the
leftover examples form one smaller group with its own capacity. Each part
(full groups, leftover group) is routed into per-expert buffers; the buffers of
both parts are concatenated so that all experts still run in ONE batched call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..router_options import GROUPED_OPTIONS
from .base import MoELayer
from .capacity import Rounding, compute_capacity
from .experts import Experts
from .metrics import mean_entropy, mean_pairwise_cosine
from .precision import as_float32, routing_precision


class SparseMoE(MoELayer):
    """Base of the routers with a learned gate and fixed-size expert buffers.

    Subclasses implement ``route(x) -> (buffers (E, rows, d), state)`` for one
    part of shape (G, m, d), and ``combine(expert_out (E, rows, d), state) ->
    (G, m, d)``; ``route`` may append per-group auxiliary losses and metric
    pieces to ``state`` when ``self.computes_losses``, and ``summarize(states)``
    turns them into (aux_loss, metrics), called only then; it computes metrics
    only when ``self.tracking`` (an empty dict otherwise). Gates, routing and
    combine run in float32 with autocast off (see ``precision``); only the
    experts run under the caller's autocast.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity_factor: float,
        *,
        group_size: int,
        noise_std: float,
        capacity_rounding: Rounding,
        identical_init: bool,
    ):
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.group_size, self.noise_std, self.capacity_rounding = group_size, noise_std, capacity_rounding
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden_dim, identical_init=identical_init)

    def capacity(self, group_tokens: int) -> int:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and noisy gate logits.

        Training-time noise has std ``noise_std / num_experts`` (V-MoE); in
        eval mode, or with noise_std 0, the noisy logits are the clean ones.
        """
        logits = F.linear(x, as_float32(self.gate.weight))
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + torch.randn_like(logits) * (self.noise_std / self.num_experts)
        return logits, noisy

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean logits, noisy logits and the softmax gates used for routing (see ``logits``)."""
        logits, noisy = self.logits(x)
        return logits, noisy, noisy.softmax(dim=-1)

    def parts(self, x32: torch.Tensor) -> list[torch.Tensor]:
        """The batch (B, T, d) cut into routing groups of ``group_size`` images, (G, size * T, d); a
        remainder of fewer images is one more, smaller part."""
        batch, tokens, dim = x32.shape
        size = min(self.group_size, batch)
        full = batch - batch % size
        parts = [x32[:full].reshape(full // size, size * tokens, dim)]
        if full < batch:
            parts.append(x32[full:].reshape(1, (batch - full) * tokens, dim))
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        with routing_precision(x):
            x32 = as_float32(x)
            routed = [self.route(part) for part in self.parts(x32)]
        rows = [buffers.shape[1] for buffers, _ in routed]
        # One expert call for all parts; a single part (the usual case) needs no concatenation.
        buffers = routed[0][0] if len(routed) == 1 else torch.cat([buffers for buffers, _ in routed], dim=1)
        expert_out = self.experts(buffers)  # under the caller's autocast, if any
        with routing_precision(x):
            pieces = as_float32(expert_out).split(rows, dim=1)
            outputs = [self.combine(out, state) for out, (_, state) in zip(pieces, routed)]
            outputs = [out.reshape(-1, tokens, dim) for out in outputs]  # parts: (G, m, d) with m = images * tokens
            y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
            if self.computes_losses:
                self.aux_loss, metrics = self.summarize([state for _, state in routed])
            else:
                self.aux_loss, metrics = x32.new_zeros(()), {}
            if self.tracking:
                self.record_metrics(metrics)
            else:
                self.metrics = {}
        return y.to(x.dtype)

    def diagnostics(self) -> dict[str, float]:
        return {
            "expert_similarity": float(self.experts.weight_similarity()),
            "gate_similarity": float(mean_pairwise_cosine(self.gate.weight.detach())),
        }

    @torch.no_grad()
    def routing(self, x: torch.Tensor) -> "SparseRouting":
        """Which expert processes which token of ``x`` (B, T, d) and with what weight, per token:
        the batch cut into routing groups as ``forward`` cuts it, each part routed by ``route`` (forward's
        own routing) and read out by ``routed_pairs``
        (float32, no graph; training-mode gate noise as in forward). `moebench inspect` draws it."""
        tokens = x.shape[1]
        with routing_precision(x):
            routed = [self.routed_pairs(self.route(part)[1]) for part in self.parts(as_float32(x))]
        fields = [torch.cat([f.reshape(-1, tokens, f.shape[-1]) for f in field]) for field in zip(*routed)]
        return SparseRouting(*fields, chooser=self.chooser)

    chooser = "tokens"  # SparseRouting.chooser: who picks whom

    def routed_pairs(self, state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``route`` decided for one part, per token and expert: (gates, requested, processed,
        weights), each (G, m, E); see SparseRouting."""
        raise NotImplementedError

    def route(self, x: torch.Tensor):
        raise NotImplementedError

    def combine(self, expert_out: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError

    def summarize(self, states: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @staticmethod
    @torch.no_grad()
    def gate_entropy(states: list[dict]) -> torch.Tensor:
        """Mean entropy of the per-token gate distributions over all parts."""
        weights = [s["gates"].shape[0] * s["gates"].shape[1] for s in states]
        values = [mean_entropy(s["gates"].detach()) for s in states]
        return sum(w * v for w, v in zip(weights, values)) / sum(weights)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor}, "
            f"group_size={self.group_size}, noise_std={self.noise_std}, "
            f"capacity_rounding={self.capacity_rounding!r}"
        )


@dataclass
class SparseRouting:
    """One batch's routing of a router that sends each token to a few experts, per token and expert
    (B, m, E); what `moebench inspect` draws. A plugin router returns one from its ``routing(x)``."""
    gates: torch.Tensor  # softmax over experts per token (a router without gates: its combine weights)
    requested: torch.Tensor  # bool: the token chose the expert (Experts Choice: the expert chose it)
    processed: torch.Tensor  # bool: the expert processed the token (requested minus drops)
    weights: torch.Tensor  # combine weight: the gate where processed, else 0
    chooser: str = "tokens"  # "tokens": each token requests experts, full ones drop it (Tokens Choice);
    # "experts": each expert picks its tokens, a token may get none or several (Experts Choice)

    def take(self, n: int) -> "SparseRouting":
        """The routing of the first ``n`` examples."""
        return dataclasses.replace(self, **{f: getattr(self, f)[:n] for f in SPARSE_FIELDS})

    @staticmethod
    def concat(parts: list["SparseRouting"]) -> "SparseRouting":
        """The routing of several batches, one after the other."""
        return dataclasses.replace(parts[0], **{f: torch.cat([getattr(p, f) for p in parts]) for f in SPARSE_FIELDS})


SPARSE_FIELDS = ("gates", "requested", "processed", "weights")


def flat_token_index(groups: int, group_tokens: int, device) -> torch.Tensor:
    """Offsets that turn per-group token indices (G, ...) into indices of the flat (G*m) tokens."""
    return torch.arange(groups, device=device).view(groups, 1, 1) * group_tokens


__all__ = ["GROUPED_OPTIONS", "SparseMoE", "SparseRouting", "compute_capacity", "flat_token_index"]
