"""Tokens Choice: each token picks its top-k experts; full experts drop the rest."""

from __future__ import annotations

import torch

from ..schema import BOOL, Choice, Float, Int
from .capacity import Rounding, compute_capacity
from .metrics import cv_squared, load_stats
from .plans import plan_balance, plan_label, plan_metrics, sinkhorn_plan, sorted_descending
from .registry import Router, register
from .sparse import GROUPED_OPTIONS, SparseMoE


def position_in_expert(choices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each entry of a (G, L) queue of expert ids, how many earlier entries
    of its row chose the same expert: its slot in that expert's buffer.

    A stable sort by expert keeps queue order inside each expert, so the rank
    within the sorted run is the buffer position; O(L log L), no (L, E) one-hot.
    """
    groups, length = choices.shape
    sorted_experts, perm = choices.sort(dim=1, stable=True)
    counts = torch.zeros(groups, num_experts, dtype=torch.long, device=choices.device)
    counts.scatter_add_(1, choices, torch.ones_like(choices))
    run_start = (counts.cumsum(1) - counts).gather(1, sorted_experts)
    rank = torch.arange(length, device=choices.device).expand(groups, length) - run_start
    return torch.empty_like(choices).scatter_(1, perm, rank)


class TokensChoiceMoE(SparseMoE):
    """Top-k routing with expert capacity and Batch Priority Routing (V-MoE).

    Per group of ``group_size`` examples: a bias-free gate and a softmax over
    experts; each token picks its top-k experts. Buffers are filled rank by
    rank (all first choices before any second choice); within a rank tokens
    are served in order or, with ``bpr``, by descending top-1 gate. A choice
    whose expert already holds ``capacity`` tokens is dropped. A token's
    output is the sum of its kept experts' outputs weighted by their gate
    values (not renormalised); a token dropped everywhere outputs 0.

    capacity = ceil(k * group_tokens * capacity_factor / E), see
    ``compute_capacity`` for ``capacity_rounding``.

    Auxiliary losses (each per group, averaged over groups, summed with its
    weight): importance and load (V-MoE; load needs training-time noise),
    Switch/GShard, and router z-loss (ST-MoE).

    ``assignment="sinkhorn"`` is Sinkhorn Token Choice (Liu et al., TMLR 2024;
    vmoe's ``KLProjectionNoisyTopExpertsPerItemRouter``): each token picks its
    top-k experts by the group's balanced transport plan of the (noisy) logits
    (``plans.sinkhorn_plan``, ``plan_iterations`` Sinkhorn iterations), BPR
    serves tokens by their top plan entry, capacity applies as above, and the
    combine weights are the softmax of the *clean* logits at the chosen pairs
    (the authors' code takes the noise-free softmax here, unlike its Expert
    Choice twin). The router learns only through those weights.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.0,
        bpr: bool = True,
        *,
        group_size: int = 8,
        noise_std: float = 1.0,
        capacity_rounding: Rounding = "ceil",
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        switch_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        identical_init: bool = False,
        assignment: str | None = "softmax",
        plan_iterations: int | None = 20,
    ):
        # None (a config's null: the keys came later, and runs made before them pool with null ones) is the default
        assignment = "softmax" if assignment is None else assignment
        plan_iterations = 20 if plan_iterations is None else plan_iterations
        super().__init__(
            dim, hidden_dim, num_experts, capacity_factor, group_size=group_size, noise_std=noise_std,
            capacity_rounding=capacity_rounding, identical_init=identical_init,
        )
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if assignment not in ("softmax", "sinkhorn"):
            raise ValueError(f"assignment must be 'softmax' or 'sinkhorn', got {assignment!r}")
        if plan_iterations < 1:
            raise ValueError(f"plan_iterations must be >= 1, got {plan_iterations}")
        self.k, self.bpr = k, bpr
        self.assignment, self.plan_iterations = assignment, plan_iterations
        self.loss_weights = {
            "importance": importance_weight, "load": load_weight, "switch": switch_weight, "z": z_loss_weight,
        }

    def capacity(self, group_tokens: int) -> int:
        return compute_capacity(group_tokens, self.num_experts, self.capacity_factor, self.k, self.capacity_rounding)

    def active_expert_fraction(self) -> float:
        return self.k / self.num_experts

    def route(self, x: torch.Tensor):
        groups, m, dim = x.shape
        experts, k, capacity = self.num_experts, self.k, self.capacity(m)
        logits, noisy, gates = self.gates(x)
        plan = None
        if self.assignment == "sinkhorn":
            plan = sinkhorn_plan(noisy.detach(), self.plan_iterations)
            top_score, top_expert = (t[..., :k] for t in sorted_descending(plan))
            combine_gates = gates if noisy is logits else logits.softmax(-1)
            top_gate = combine_gates.gather(-1, top_expert)
        else:
            combine_gates = gates
            top_gate, top_expert = gates.topk(k, dim=-1)  # (G, m, k)
            top_score = top_gate

        if self.bpr:
            order = torch.argsort(top_score[..., 0].detach(), dim=1, descending=True, stable=True)
        else:
            order = torch.arange(m, device=x.device).expand(groups, m)
        by_rank = order.unsqueeze(-1).expand(groups, m, k)
        queue = top_expert.gather(1, by_rank).transpose(1, 2).reshape(groups, k * m)
        position = position_in_expert(queue, experts).reshape(groups, k, m).transpose(1, 2)
        position = torch.empty_like(position).scatter_(1, by_rank, position)  # back to token order
        kept = position < capacity

        # Row of every kept choice in the stacked buffers (E, G*capacity). A row
        # no choice fills reads token 0: its expert output is never combined, so
        # its value is irrelevant and its gradient exactly zero. That spares a
        # zero-padded copy of the tokens, and index_select's backward (index_add)
        # does not sort, unlike advanced indexing's.
        rows = experts * groups * capacity
        group_offset = torch.arange(groups, device=x.device).view(groups, 1, 1) * capacity
        row = top_expert * (groups * capacity) + group_offset + position
        token = torch.arange(groups * m, device=x.device).view(groups, m, 1).expand(groups, m, k)
        source = torch.zeros(rows + 1, dtype=torch.long, device=x.device)  # the last entry takes the drops
        source.scatter_(0, torch.where(kept, row, rows).reshape(-1), token.reshape(-1))
        buffers = x.reshape(groups * m, dim).index_select(0, source[:rows]).view(experts, groups * capacity, dim)

        # A dropped choice reads row 0 with weight 0: it adds exactly nothing, and
        # its gate gets no gradient through the weight (top_gate * kept).
        state = {
            "row": torch.where(kept, row, 0), "weight": top_gate * kept, "gates": combine_gates, "kept": kept,
            "choices": top_expert,
        }
        if self.computes_losses:
            state["losses"] = self.aux_losses(logits, noisy, gates, top_expert[..., 0])
        if plan is not None and self.tracking:
            state["plan_balance"] = plan_balance(plan)
        return buffers, state

    def routed_pairs(self, state: dict):
        """Per token and expert (G, m, E): gates, chosen, processed (chosen and not dropped), weights."""
        gates, choices, kept = state["gates"], state["choices"], state["kept"]
        requested = torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, choices, True)
        processed = torch.zeros_like(requested).scatter_(-1, choices, kept)
        weights = torch.zeros_like(gates).scatter_(-1, choices, state["weight"])
        return gates, requested, processed, weights

    def combine(self, expert_out: torch.Tensor, state: dict) -> torch.Tensor:
        dim = expert_out.shape[-1]
        groups, m, k = state["row"].shape
        picked = expert_out.reshape(-1, dim).index_select(0, state["row"].reshape(-1)).view(groups, m, k, dim)
        weight = state["weight"].unsqueeze(-1)
        if k == 1:
            return picked.squeeze(2) * weight.squeeze(2)
        return (picked * weight).sum(2)

    def aux_losses(self, logits: torch.Tensor, noisy: torch.Tensor, gates: torch.Tensor, top1: torch.Tensor) -> dict:
        """Per-group auxiliary losses, each of shape (G,); ``top1`` is every token's first
        choice. A loss with weight 0 is only a metric: computed without a graph (backward
        skips it) while tracking, and not at all otherwise (None)."""
        groups, m, experts = logits.shape

        def term(name: str, compute):
            if self.loss_weights[name]:
                return compute()
            if not self.tracking:
                return None
            with torch.no_grad():
                return compute()

        clean = gates if noisy is logits else logits.softmax(-1)  # without noise the gates are the clean softmax
        importance = term("importance", lambda: cv_squared(clean.sum(1)))
        if self.training and self.noise_std > 0:
            # P(expert e would make token t's top-k under fresh noise), V-MoE's load.
            sigma = self.noise_std / experts
            threshold = noisy.topk(self.k, dim=-1).values[..., -1:]
            load = term("load", lambda: cv_squared(torch.special.ndtr((logits - threshold) / sigma).mean(1)))
        else:
            load = logits.new_zeros(groups)

        def switch_loss():
            # The routing's own first choice is the argmax of the gates: no second pass over them.
            share = torch.zeros_like(gates[:, 0]).scatter_add_(1, top1, torch.full_like(gates[..., 0], 1.0 / m))
            return experts * (share * gates.mean(1)).sum(-1)

        switch = term("switch", switch_loss)
        z = term("z", lambda: torch.logsumexp(logits, dim=-1).pow(2).mean(1))
        return {"importance": importance, "load": load, "switch": switch, "z": z}

    def summarize(self, states: list[dict]):
        losses = {
            name: torch.cat([s["losses"][name] for s in states]).mean()
            for name in self.loss_weights if states[0]["losses"][name] is not None
        }
        aux = sum((self.loss_weights[name] * value for name, value in losses.items()), states[0]["gates"].new_zeros(()))
        if not self.tracking:
            return aux, {}
        with torch.no_grad():
            kept = sum(s["kept"].sum() for s in states)
            choices = sum(s["kept"].numel() for s in states)
            # scatter_add, not bincount: a fixed output shape keeps torch.compile from breaking the graph
            load = sum(
                torch.zeros(self.num_experts, device=s["choices"].device).scatter_add_(
                    0, s["choices"].reshape(-1), torch.ones(s["choices"].numel(), device=s["choices"].device))
                for s in states
            )
            metrics = {"dropped": 1.0 - kept / choices, **load_stats(load), "gate_entropy": self.gate_entropy(states)}
            if "plan_balance" in states[0]:
                metrics.update(plan_metrics(states))
            metrics.update({f"{name}_loss": value.detach() for name, value in losses.items()})
        return aux, metrics

    def extra_repr(self) -> str:
        plan = f"assignment={self.assignment!r}, plan_iterations={self.plan_iterations}, " \
            if self.assignment != "softmax" else ""
        return f"k={self.k}, bpr={self.bpr}, {plan}" + super().extra_repr()


def _check(r) -> str | None:
    """The rule between options (each option's type and range: the specs below)."""
    if not 1 <= r["k"] <= r["num_experts"]:
        return f"k (router.k) must be in [1, experts={r['num_experts']}], got {r['k']}"
    return None


def _label(get) -> list[str]:
    return [f"E{get('num_experts')}", f"k{get('k')}", f"C{get('capacity_factor')}"] + \
        ([] if get("bpr") else ["noBPR"]) + plan_label(get)


register(Router(
    name="tokens_choice",
    build=lambda dim, hidden_dim, num_tokens, options: TokensChoiceMoE(dim, hidden_dim, **options),
    options={**GROUPED_OPTIONS, "k": Int(1), "bpr": BOOL, "importance_weight": Float(0), "load_weight": Float(0),
             "switch_weight": Float(0), "z_loss_weight": Float(0), "assignment": Choice("softmax", "sinkhorn", nullable=True),
             "plan_iterations": Int(1, nullable=True)},
    label=_label, check=_check, marker="s", order=1,
    # The bench's own tokens_choice/E= rows time the softmax twin (same k, capacity, no noise): the gap is the plan's cost.
    bench=lambda experts, tokens: {f"tokens_choice_sinkhorn/E={experts}": lambda d, h: TokensChoiceMoE(
        d, h, experts, k=1, capacity_factor=1.0, noise_std=0.0, assignment="sinkhorn")},
))
