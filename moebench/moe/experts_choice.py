"""Experts Choice: each expert picks its top-c tokens of the group."""

from __future__ import annotations

import torch

from ..router_options import EXPERTS_CHOICE
from .capacity import Rounding, compute_capacity
from .plans import plan_balance, plan_label, plan_metrics, sinkhorn_plan, sorted_descending, sparse_ot_plan
from .registry import Router, register
from .sparse import SparseMoE, flat_token_index


class ExpertsChoiceMoE(SparseMoE):
    """Experts Choice routing (Zhou et al., 2022) as compared in the Soft MoE paper.

    Per group of ``group_size`` examples: gates = softmax over experts of a
    bias-free linear gate; every expert takes the ``c`` tokens with the largest
    gate in its column, c = round(group_tokens * capacity_factor / E) by
    default. A token's output sums the gate-weighted outputs of the experts
    that picked it; a token picked by none outputs 0. No auxiliary loss: the
    load is balanced by construction, token coverage is not (see metrics).

    ``assignment`` chooses the pairs another way (Liu et al., TMLR 2024; vmoe's
    ``vmoe/projects/sparsity_constrained_ot/``); the combine weights stay the
    softmax of the (noisy) logits at the chosen pairs:

    - ``"sinkhorn"``, Sinkhorn Expert Choice: every expert takes its top-c
      tokens by the group's balanced transport plan of the (noisy) logits
      (``plans.sinkhorn_plan``, ``plan_iterations`` iterations).
    - ``"sparse_ot"``, sparsity-constrained Expert Choice: the plan of the
      softmax scores with at most c tokens per expert (``plans.sparse_ot_plan``:
      ``plan_iterations`` Adam steps at ``plan_lr`` on its semi-dual). Every
      expert takes its top-c tokens by that plan; where a column has fewer than c
      non-zeros the rest of its c picks are the lowest-index tokens at 0, as
      ``jax.lax.top_k`` picks them in the authors' code (metric
      ``zero_plan_picks``). The authors' router adds no gate noise: set
      noise_std 0 for theirs (the preset does).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity_factor: float = 1.0,
        *,
        group_size: int = 8,
        noise_std: float = 0.0,
        capacity_rounding: Rounding = "round",
        identical_init: bool = False,
        assignment: str | None = "softmax",
        plan_iterations: int | None = 20,
        plan_lr: float | None = 0.01,
    ):
        # None (a config's null: the keys came later, and runs made before them pool with null ones) is the default
        assignment = "softmax" if assignment is None else assignment
        plan_iterations = 20 if plan_iterations is None else plan_iterations
        plan_lr = 0.01 if plan_lr is None else plan_lr
        super().__init__(
            dim, hidden_dim, num_experts, capacity_factor, group_size=group_size, noise_std=noise_std,
            capacity_rounding=capacity_rounding, identical_init=identical_init,
        )
        if assignment not in ("softmax", "sinkhorn", "sparse_ot"):
            raise ValueError(f"assignment must be 'softmax', 'sinkhorn' or 'sparse_ot', got {assignment!r}")
        if plan_iterations < 1:
            raise ValueError(f"plan_iterations must be >= 1, got {plan_iterations}")
        if plan_lr <= 0:
            raise ValueError(f"plan_lr must be > 0, got {plan_lr}")
        self.assignment, self.plan_iterations, self.plan_lr = assignment, plan_iterations, plan_lr

    def capacity(self, group_tokens: int) -> int:
        return compute_capacity(group_tokens, self.num_experts, self.capacity_factor, 1, self.capacity_rounding)

    def active_expert_fraction(self) -> float:
        return min(self.num_experts, self.capacity_factor) / self.num_experts

    def route(self, x: torch.Tensor):
        groups, m, dim = x.shape
        capacity = self.capacity(m)
        _, noisy, gates = self.gates(x)
        plan = None
        if self.assignment == "softmax":
            weight, token = gates.transpose(1, 2).topk(capacity, dim=-1)  # (G, E, c)
        else:
            if self.assignment == "sinkhorn":
                plan = sinkhorn_plan(noisy.detach(), self.plan_iterations)
            else:
                plan = sparse_ot_plan(gates.detach(), capacity, self.plan_iterations, self.plan_lr)
            token = sorted_descending(plan.transpose(1, 2))[1][..., :capacity]  # (G, E, c)
            weight = gates.transpose(1, 2).gather(-1, token)
        flat = token + flat_token_index(groups, m, x.device)
        # index_select, not advanced indexing: its backward (index_add) does not sort
        buffers = x.reshape(groups * m, dim).index_select(0, flat.transpose(0, 1).reshape(-1))
        state = {"flat": flat, "weight": weight, "gates": gates, "tokens": groups * m}
        if plan is not None and self.tracking:
            state["plan_balance"] = plan_balance(plan)
            state["zero_plan_picks"] = (plan.transpose(1, 2).gather(-1, token) == 0).float().mean()
        return buffers.view(self.num_experts, groups * capacity, dim), state

    chooser = "experts"

    def routed_pairs(self, state: dict):
        """Per token and expert (G, m, E): gates, picked (twice: requested and processed), weights."""
        gates = state["gates"]
        groups, m, _ = gates.shape
        token = state["flat"] - flat_token_index(groups, m, gates.device)  # (G, E, c) within each group
        by_expert = gates.transpose(1, 2)
        picked = torch.zeros_like(by_expert, dtype=torch.bool).scatter_(-1, token, True).transpose(1, 2)
        weights = torch.zeros_like(by_expert).scatter_(-1, token, state["weight"]).transpose(1, 2)
        return gates, picked, picked, weights

    def combine(self, expert_out: torch.Tensor, state: dict) -> torch.Tensor:
        groups, experts, capacity = state["flat"].shape
        dim = expert_out.shape[-1]
        # Weighted in the experts' own layout (E, G, c): no transposed copy of their outputs.
        weighted = expert_out.view(experts, groups, capacity, dim) * state["weight"].transpose(0, 1).unsqueeze(-1)
        y = weighted.new_zeros(groups * state["gates"].shape[1], dim)
        # a token may sum several experts
        y.index_add_(0, state["flat"].transpose(0, 1).reshape(-1), weighted.view(-1, dim))
        return y.view(groups, -1, dim)

    def summarize(self, states: list[dict]):
        if not self.tracking:  # no auxiliary loss: only statistics, and nobody asked for them
            return states[0]["gates"].new_zeros(()), {}
        with torch.no_grad():
            picks = torch.cat([
                torch.zeros(s["tokens"], device=s["flat"].device).index_add_(
                    0, s["flat"].reshape(-1), torch.ones(s["flat"].numel(), device=s["flat"].device)
                )
                for s in states
            ])
            metrics = {
                "tokens_0_experts": (picks == 0).float().mean(),
                "tokens_1_expert": (picks == 1).float().mean(),
                "tokens_2plus_experts": (picks >= 2).float().mean(),
                "gate_entropy": self.gate_entropy(states),
            }
            if "plan_balance" in states[0]:
                metrics.update(plan_metrics(states))
                metrics["zero_plan_picks"] = torch.stack([s["zero_plan_picks"] for s in states]).mean()
        return states[0]["gates"].new_zeros(()), metrics

    def extra_repr(self) -> str:
        if self.assignment == "softmax":
            return super().extra_repr()
        return f"assignment={self.assignment!r}, plan_iterations={self.plan_iterations}, plan_lr={self.plan_lr}, " \
            + super().extra_repr()


register(Router(
    name="experts_choice",
    build=lambda dim, hidden_dim, num_tokens, options: ExpertsChoiceMoE(dim, hidden_dim, **options),
    options=EXPERTS_CHOICE.options, ignored=EXPERTS_CHOICE.ignored,  # router_options.py
    label=lambda get: [f"E{get('num_experts')}", f"C{get('capacity_factor')}"] + plan_label(get),
    marker="^", order=2,
    # The bench's own experts_choice/E= rows time the softmax twin (same groups and capacity): the gap is the plan's cost.
    bench=lambda experts, tokens: {
        f"experts_choice_{assignment}/E={experts}": lambda d, h, assignment=assignment: ExpertsChoiceMoE(
            d, h, experts, capacity_factor=1.0, group_size=8, assignment=assignment)
        for assignment in ("sinkhorn", "sparse_ot")},
))
