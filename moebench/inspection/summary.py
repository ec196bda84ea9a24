"""Per-layer routing statistics over many images, and the experts' weight similarity.

``LayerSummary`` adds up recomputed routings batch by batch (a test split never
has to sit in memory at once) and reports:

- ``load_share``: the share of the layer's work each expert does. Tokens and
  Experts Choice: tokens processed; Soft MoE: combine weight (how much of the
  layer's output comes from the expert's slots). Sums to 1.
- ``first_choice_share``: the share of tokens whose largest gate (Soft MoE:
  largest combine weight) is that expert: the balance the router would have
  without capacity limits. Sums to 1.
- ``position_rate``: per token position, Tokens Choice: the share of token
  choices dropped; Experts Choice: the share of tokens no expert picked;
  Soft MoE (nothing is dropped): the dispatch weight a position receives over
  all slots, relative to uniform dispatch (1 = every slot takes it as much as
  any other token; 0 = no slot reads it).
"""

from __future__ import annotations

import torch

from .routing import SoftRouting, SparseRouting

POSITION_MEANING = {  # by the kind of routing: Soft MoE's, or a sparse one by who chooses (SparseRouting.chooser)
    "soft": "dispatch weight received over all slots, x tokens/slots (1 = uniform; nothing is dropped)",
    "tokens": "share of token choices dropped (expert full)",
    "experts": "share of tokens picked by no expert",
}


class LayerSummary:
    def __init__(self, router: str, num_experts: int, num_tokens: int):
        self.router, self.num_experts, self.num_tokens = router, num_experts, num_tokens
        self.kind = "soft"  # POSITION_MEANING's key, from the routings added
        self.images = 0
        self.load = torch.zeros(num_experts, dtype=torch.float64)
        self.first_choice = torch.zeros(num_experts, dtype=torch.float64)
        self.position_num = torch.zeros(num_tokens, dtype=torch.float64)
        self.position_den = torch.zeros(num_tokens, dtype=torch.float64)
        self.extra: dict[str, float] = {}  # sums of per-token scalars (divided by token count at the end)

    def _add_extra(self, key: str, total: float) -> None:
        self.extra[key] = self.extra.get(key, 0.0) + float(total)

    @torch.no_grad()
    def add(self, routing: SoftRouting | SparseRouting) -> None:
        if isinstance(routing, SoftRouting):
            self._add_soft(routing)
        else:
            self._add_sparse(routing)

    def _add_soft(self, r: SoftRouting) -> None:
        batch, m, slots = r.combine.shape
        self.images += batch
        per_slot = r.combine.double().sum((0, 1))
        self.load += per_slot.view(self.num_experts, -1).sum(-1)
        top_expert = r.expert_of_slot(r.combine.argmax(-1)).reshape(-1)
        self.first_choice += torch.bincount(top_expert, minlength=self.num_experts).double()
        self.position_num += r.dispatch.double().sum((0, 2))
        self.position_den += batch * slots / m
        self._add_extra("dispatch_max", r.dispatch.amax(1).sum() * m / slots)  # per slot; rescaled below
        self._add_extra("combine_max", r.combine.amax(-1).sum())

    def _add_sparse(self, r: SparseRouting) -> None:
        batch, m, _ = r.gates.shape
        self.images += batch
        self.load += r.processed.double().sum((0, 1))
        self.first_choice += torch.bincount(r.gates.argmax(-1).reshape(-1), minlength=self.num_experts).double()
        self.kind = r.chooser
        if r.chooser == "tokens":
            self.position_num += (r.requested & ~r.processed).double().sum((0, 2))
            self.position_den += r.requested.double().sum((0, 2))
            self._add_extra("dropped_choices", (r.requested & ~r.processed).sum() / r.requested.sum() * batch * m)
            self._add_extra("tokens_fully_dropped", (~r.processed.any(-1)).sum())
        else:
            picks = r.processed.sum(-1)
            self.position_num += (picks == 0).double().sum(0)
            self.position_den += batch
            self._add_extra("tokens_0_experts", (picks == 0).sum())
            self._add_extra("tokens_2plus_experts", (picks >= 2).sum())

    def result(self) -> dict:
        tokens = max(1, self.images * self.num_tokens)
        load = self.load / self.load.sum().clamp_min(1e-12)
        mean = load.mean()
        return {
            "router": self.router,
            "images": self.images,
            "load_share": load.tolist(),
            "load_cv": float(load.std(correction=0) / mean),
            "load_max_over_mean": float(load.max() / mean),
            "first_choice_share": (self.first_choice / self.first_choice.sum().clamp_min(1)).tolist(),
            "position_rate": (self.position_num / self.position_den.clamp_min(1e-12)).tolist(),
            "position_meaning": POSITION_MEANING[self.kind],
            **{key: value / tokens for key, value in self.extra.items()},
        }


@torch.no_grad()
def expert_similarity(layer: torch.nn.Module) -> torch.Tensor:
    """(E, E) cosine similarity of the experts' flattened weights (w1, b1, w2, b2)."""
    experts = layer.experts
    flat = torch.cat([getattr(experts, name).detach().float().reshape(experts.num_experts, -1)
                      for name in ("w1", "b1", "w2", "b2")], dim=1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T
