"""Tokens Choice: each token picks its top-k experts; full experts drop the rest."""

from __future__ import annotations

import math

import torch

from ..router_options import TOKENS_CHOICE, tokens_choice_problem
from .capacity import Rounding, compute_capacity
from .dropless import MATMULS, combine_rows, expert_rows, select_matmul, sort_pairs
from .experts import SharedExperts
from .metrics import cv_squared, load_stats
from .plans import plan_balance, plan_label, plan_metrics, sinkhorn_plan, sorted_descending
from .registry import Router, register
from .precision import as_float32, routing_precision
from .sparse import SparseMoE


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

    The pieces of DeepSeek-V3's router (routers-since-2023.md, section 2), each off by default:

    - ``gate="sigmoid"`` (DeepSeek-V3, arXiv 2412.19437, and its ``model.py`` ``Gate``): scores
      s = sigmoid(noisy logits) instead of the softmax; each token's top-k experts are chosen by s
      (plus the balancing bias); its gate values are the chosen scores renormalised to sum to 1 over
      the k chosen (dropped ones included: capacity drops after the gates are set), times
      ``routed_scaling``. Over one routed choice that is 1 for every token, so the loss gives the
      router no gradient (as in V3's ``Gate``; the CLI warns: ``router_options.tokens_choice_caveat``).
      ``routed_scaling`` multiplies the softmax gate's values too (as ``Gate`` does for both score
      functions; V2's softmax gates are not renormalised). BPR serves tokens by
      their top selection score (score plus bias). The statistics and the losses that need a
      distribution over experts (importance, Switch, gate entropy, ``routing().gates``) read the
      normalised scores s / sum(s) (V3's s' of its sequence-wise balance loss); V-MoE's load loss
      (the chance that an expert makes the top-k under fresh noise) is the same event for the
      sigmoid as for the softmax, since both are increasing in the logit; the z-loss reads the logits.
    - ``bias_rate`` u > 0, auxiliary-loss-free balancing (Wang et al., arXiv 2408.15664): a
      per-expert bias (buffer ``selection_bias``: in ``state_dict``, not trained) is added to the
      scores to choose the experts and nowhere else (gate values, BPR aside, never see it).
      ``update_balancing_bias(model)`` after each optimizer step moves it by
      b_i <- b_i + u * sign(mean load - load_i), with load_i the choices (all k per token, dropped
      ones included) of expert i in the training forwards since the previous update, summed over
      the data-parallel ranks. Eval forwards count nothing and change nothing. V-MoE's load loss
      asks about a selection without the bias, so it is not defined here (load_weight must be 0;
      its metric reads 0).
    - ``granularity`` m and ``shared_experts`` K_s (DeepSeekMoE, arXiv 2401.06066): the E experts
      of width h become E*m routed experts of width h/m, and each token's k choices become
      k*m - K_s routed choices plus K_s shared experts of width h/m that every token passes
      through (one dense MLP of width K_s*h/m, ``SharedExperts``), their output added to the routed
      output. A token's expert FLOPs stay those of k experts of width h (capacity rounding aside);
      the shared experts add K_s*h/m hidden units of parameters (the routed experts stay E*m, as in
      DeepSeek-V3, rather than DeepSeekMoE's mN - K_s, which would turn E*m = 128 into 127 and
      round every capacity up). ``num_experts``, ``k`` and the metrics then count routed
      fine-grained experts.

    ``dropless=True`` is dropless Tokens Choice (MegaBlocks, arXiv 2211.15841; routers-since-2023.md
    section 2): the same choices and gate values, but no capacity: every one of the k choices per token
    is processed (``capacity_factor``, ``capacity_rounding`` and ``bpr`` then change nothing; the
    metric ``dropped`` reads 0). The batch's choices are sorted by expert and run in one dropless
    expert call (``dropless.py``: ``torch._grouped_mm`` by default, exactly tokens * k expert rows;
    ``dropless_matmul="padded"`` pads every expert to the largest load). The groups still set what
    the auxiliary losses average over. Routing metrics add ``padding``, the share of padded rows.
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
        gate: str | None = "softmax",
        routed_scaling: float | None = 1.0,
        bias_rate: float | None = 0.0,
        shared_experts: int | None = 0,
        granularity: int | None = 1,
        dropless: bool | None = False,
        dropless_matmul: str | None = None,
    ):
        # None (a config's null: the keys came later, and runs made before them pool with null ones) is the
        # option's default
        assignment = "softmax" if assignment is None else assignment
        plan_iterations = 20 if plan_iterations is None else plan_iterations
        gate = "softmax" if gate is None else gate
        routed_scaling = 1.0 if routed_scaling is None else routed_scaling
        bias_rate = 0.0 if bias_rate is None else bias_rate
        shared_experts = 0 if shared_experts is None else shared_experts
        granularity = 1 if granularity is None else granularity
        dropless = bool(dropless)
        problem = tokens_choice_problem(dict(
            num_experts=num_experts, k=k, assignment=assignment, gate=gate, routed_scaling=routed_scaling,
            bias_rate=bias_rate, shared_experts=shared_experts, granularity=granularity, load_weight=load_weight,
        ), hidden_dim)
        if problem:
            raise ValueError(problem)
        super().__init__(
            dim, hidden_dim // granularity, num_experts * granularity, capacity_factor, group_size=group_size,
            noise_std=noise_std, capacity_rounding=capacity_rounding, identical_init=identical_init,
        )
        if plan_iterations < 1:
            raise ValueError(f"plan_iterations must be >= 1, got {plan_iterations}")
        self.k, self.bpr = k * granularity - shared_experts, bpr  # routed choices per token
        self.assignment, self.plan_iterations = assignment, plan_iterations
        self.gate_function, self.routed_scaling = gate, routed_scaling
        self.bias_rate, self.granularity, self.num_shared = bias_rate, granularity, shared_experts
        if dropless_matmul not in (None, *MATMULS):
            raise ValueError(f"dropless_matmul must be grouped, padded or None, got {dropless_matmul!r}")
        self.dropless, self.dropless_matmul = dropless, dropless_matmul
        self.loss_weights = {
            "importance": importance_weight, "load": load_weight, "switch": switch_weight, "z": z_loss_weight,
        }
        # Always-on experts of the fine-grained width; None without (no new parameters, old state dicts load).
        self.shared = SharedExperts(shared_experts, dim, hidden_dim // granularity) if shared_experts else None
        if bias_rate > 0:  # persistent: checkpoints carry it; absent at 0, so older state dicts still load
            self.register_buffer("selection_bias", torch.zeros(self.num_experts))
        self._load_counts: torch.Tensor | None = None  # choices per expert since the last bias update

    def capacity(self, group_tokens: int) -> int:
        return compute_capacity(group_tokens, self.num_experts, self.capacity_factor, self.k, self.capacity_rounding)

    def active_expert_fraction(self) -> float:
        return self.k / self.num_experts  # of the routed experts; the shared ones are always active

    @property
    def balancing(self) -> bool:
        """Whether the auxiliary-loss-free bias chooses the experts (``bias_rate`` > 0)."""
        return self.bias_rate > 0

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The gate's distribution over experts: the softmax, or the normalised sigmoid scores."""
        if self.gate_function == "sigmoid":
            scores = logits.sigmoid()
            return scores / scores.sum(-1, keepdim=True)
        return logits.softmax(-1)

    def select(self, noisy: torch.Tensor):
        """Every token's top-k experts: (gates (G, m, E) for statistics, top selection scores, top experts,
        their gate values), each of the last three (G, m, k)."""
        k = self.k
        if self.gate_function == "softmax" and not self.balancing:  # V-MoE's gate (bit-identical to before)
            gates = noisy.softmax(-1)
            top_gate, top_expert = gates.topk(k, dim=-1)  # (G, m, k)
            top_score = top_gate
        else:
            scores = noisy.sigmoid() if self.gate_function == "sigmoid" else noisy.softmax(-1)
            gates = scores / scores.sum(-1, keepdim=True) if self.gate_function == "sigmoid" else scores
            chooser = scores + self.selection_bias.to(scores.dtype) if self.balancing else scores
            top_score, top_expert = chooser.topk(k, dim=-1)
            top_gate = scores.gather(-1, top_expert)  # the bias never reaches a gate value
            if self.gate_function == "sigmoid":
                top_gate = top_gate / top_gate.sum(-1, keepdim=True)
        return gates, top_score, top_expert, top_gate

    def choose(self, x: torch.Tensor):
        """Every token's choices for one part (G, m, d): (logits, noisy logits, gates, combine gates, the plan or
        None, top selection scores, top experts, their gate values), the last three (G, m, k)."""
        k = self.k
        logits, noisy = self.logits(x)
        plan = None
        if self.assignment == "sinkhorn":
            gates = noisy.softmax(dim=-1)
            plan = sinkhorn_plan(noisy.detach(), self.plan_iterations)
            top_score, top_expert = (t[..., :k] for t in sorted_descending(plan))
            combine_gates = gates if noisy is logits else logits.softmax(-1)
            top_gate = combine_gates.gather(-1, top_expert)
        else:
            gates, top_score, top_expert, top_gate = self.select(noisy)
            combine_gates = gates
        if self.routed_scaling != 1.0:
            top_gate = top_gate * self.routed_scaling
        return logits, noisy, gates, combine_gates, plan, top_score, top_expert, top_gate

    def route(self, x: torch.Tensor):
        if self.dropless:
            return None, self.route_dropless(x)
        groups, m, dim = x.shape
        experts, k, capacity = self.num_experts, self.k, self.capacity(m)
        logits, noisy, gates, combine_gates, plan, top_score, top_expert, top_gate = self.choose(x)

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

    def route_dropless(self, x: torch.Tensor) -> dict:
        """One part's choices without capacity: every choice is kept (no BPR: nothing is dropped)."""
        logits, noisy, gates, combine_gates, plan, _, top_expert, top_gate = self.choose(x)
        state = {"weight": top_gate, "gates": combine_gates, "kept": torch.ones_like(top_expert, dtype=torch.bool),
                 "choices": top_expert}
        if self.computes_losses:
            state["losses"] = self.aux_losses(logits, noisy, gates, top_expert[..., 0])
        if plan is not None and self.tracking:
            state["plan_balance"] = plan_balance(plan)
        return state

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

        clean = gates if noisy is logits else self.distribution(logits)  # without noise the gates are the clean ones
        importance = term("importance", lambda: cv_squared(clean.sum(1)))
        if self.training and self.noise_std > 0 and not self.balancing:
            # P(expert e would make token t's top-k under fresh noise), V-MoE's load. The sigmoid is
            # increasing, so its top-k are the top-k noisy logits, as the softmax's are.
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

    def choice_counts(self, states: list[dict]) -> torch.Tensor:
        """Choices (all k per token, dropped ones included) per expert over a forward's parts, float32 (E,)."""
        # scatter_add, not bincount: a fixed output shape keeps torch.compile from breaking the graph
        with torch.no_grad():
            return sum(
                torch.zeros(self.num_experts, device=s["choices"].device).scatter_add_(
                    0, s["choices"].reshape(-1), torch.ones(s["choices"].numel(), device=s["choices"].device))
                for s in states
            )

    def summarize(self, states: list[dict]):
        losses = {
            name: torch.cat([s["losses"][name] for s in states]).mean()
            for name in self.loss_weights if states[0]["losses"][name] is not None
        }
        aux = sum((self.loss_weights[name] * value for name, value in losses.items()), states[0]["gates"].new_zeros(()))
        load = None
        if self.balancing and self.training:  # the bias update's load: training forwards only
            load = self.choice_counts(states)
            # rebound, not updated in place (as record_metrics' sums: no guard on an in-place counter)
            self._load_counts = load if self._load_counts is None else self._load_counts + load
        if not self.tracking:
            return aux, {}
        with torch.no_grad():
            kept = sum(s["kept"].sum() for s in states)
            choices = sum(s["kept"].numel() for s in states)
            load = self.choice_counts(states) if load is None else load
            metrics = {"dropped": 1.0 - kept / choices, **load_stats(load), "gate_entropy": self.gate_entropy(states)}
            if "plan_balance" in states[0]:
                metrics.update(plan_metrics(states))
            metrics.update({f"{name}_loss": value.detach() for name, value in losses.items()})
            if self.balancing:  # the bias trajectory (its values at this forward)
                bias = self.selection_bias.float()
                metrics.update({"bias_min": bias.min(), "bias_max": bias.max(), "bias_spread": bias.max() - bias.min()})
        return aux, metrics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropless_forward(x) if self.dropless else super().forward(x)
        if self.shared is not None:  # under the caller's autocast, as the routed experts
            y = y + self.shared(x)
        return y

    def dropless_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every choice processed (MegaBlocks): the parts' choices sorted by expert, one dropless expert call."""
        batch, tokens, dim = x.shape
        with routing_precision(x):
            x32 = as_float32(x)
            states = [self.route_dropless(part) for part in self.parts(x32)]
            choices = torch.cat([s["choices"].reshape(-1, self.k) for s in states])  # the parts in batch order
            weight = torch.cat([s["weight"].reshape(-1, self.k) for s in states])
            token = torch.arange(choices.shape[0], device=x.device).repeat_interleave(self.k)
            pairs = sort_pairs(token, choices.reshape(-1), weight.reshape(-1), self.num_experts)
            flat = x32.reshape(batch * tokens, dim)
        out, padding = expert_rows(self.experts, flat, pairs, select_matmul(self.dropless_matmul, self.experts, x))
        with routing_precision(x):
            y = combine_rows(flat, as_float32(out), pairs).view(batch, tokens, dim)
            if self.computes_losses:
                self.aux_loss, metrics = self.summarize(states)
            else:
                self.aux_loss, metrics = x32.new_zeros(()), {}
            if self.tracking:
                self.record_metrics({**metrics, "padding": x32.new_tensor(padding)})
            else:
                self.metrics = {}
        return y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        """``to``/``cuda``/``half``...: the bias follows the device but stays float32 (or wider) in a bf16 or fp16
        model, where steps of bias_rate (0.001) would round away once |b| passes ~0.25 (it is routing state:
        the router computes in float32 anyway)."""
        bias = self._buffers.get("selection_bias")
        out = super()._apply(fn, recurse)
        moved = self._buffers.get("selection_bias")
        if bias is not None and moved is not None and moved.dtype not in (torch.float32, torch.float64):
            self._buffers["selection_bias"] = bias.to(device=moved.device, dtype=torch.float32)
        return out

    @torch.no_grad()
    def take_load(self) -> torch.Tensor:
        """The choices per expert counted since the last call (zeros if none), and start a new count."""
        counts, self._load_counts = self._load_counts, None
        if counts is None:
            return torch.zeros(self.num_experts, device=self.selection_bias.device)
        return counts.to(self.selection_bias.device)

    @torch.no_grad()
    def apply_load(self, load: torch.Tensor) -> None:
        """b_i <- b_i + u * sign(mean load - load_i) (Wang et al. 2024, Algorithm 1); nothing for an empty load."""
        load = load.to(torch.float64)
        if load.sum() > 0:
            step = self.bias_rate * torch.sign(load.mean() - load)
            self.selection_bias.add_(step.to(self.selection_bias.dtype))

    def extra_repr(self) -> str:
        plan = f"assignment={self.assignment!r}, plan_iterations={self.plan_iterations}, " \
            if self.assignment != "softmax" else ""
        deepseek = "".join(f"{name}={value!r}, " for name, value, default in (
            ("gate", self.gate_function, "softmax"), ("routed_scaling", self.routed_scaling, 1.0),
            ("bias_rate", self.bias_rate, 0.0), ("granularity", self.granularity, 1),
            ("shared_experts", self.num_shared, 0), ("dropless", self.dropless, False)) if value != default)
        return f"k={self.k}, bpr={self.bpr}, {plan}{deepseek}" + super().extra_repr()


def _label(get) -> list[str]:
    # dropless: no capacity, and no drop for BPR to order
    words = [f"E{get('num_experts')}", f"k{get('k')}"] + (["dropless"] if get("dropless") else (
        [f"C{get('capacity_factor')}"] + ([] if get("bpr") else ["noBPR"]))) + plan_label(get)
    # DeepSeek's pieces, each only when not its default (older labels stay as they were)
    if get("gate") not in (None, "softmax"):
        words.append(get("gate"))
    if get("routed_scaling") not in (None, 1, 1.0):
        words.append(f"scale{get('routed_scaling'):g}")
    if get("bias_rate"):
        words.append(f"bias{get('bias_rate'):g}")
        # beside the bias, V-MoE's gate noise and importance loss are additions (DeepSeek-V3 has neither); without
        # it they are the softmax router's defaults and stay unnamed
        words += [f"{name}{get(key):g}" for name, key in (("noise", "noise_std"), ("importance", "importance_weight"))
                  if get(key)]
    if get("granularity") not in (None, 1):
        words.append(f"m{get('granularity')}")
    if get("shared_experts"):
        words.append(f"shared{get('shared_experts')}")
    return words


register(Router(
    name="tokens_choice",
    build=lambda dim, hidden_dim, num_tokens, options: TokensChoiceMoE(dim, hidden_dim, **options),
    options=TOKENS_CHOICE.options, check=TOKENS_CHOICE.check, check_sizes=TOKENS_CHOICE.check_sizes,  # router_options.py
    ignored=TOKENS_CHOICE.ignored, caveat=TOKENS_CHOICE.caveat,
    label=_label, marker="s", order=1,
    # The bench's own tokens_choice/E= rows time the softmax twin (same k, capacity, no noise): the gap is the plan's
    # cost, or that of DeepSeek's pieces (variant tc_deepseek_e32's router: split 4 ways when the width allows).
    bench=lambda experts, tokens: {
        f"tokens_choice_sinkhorn/E={experts}": lambda d, h: TokensChoiceMoE(
            d, h, experts, k=1, capacity_factor=1.0, noise_std=0.0, assignment="sinkhorn"),
        f"tokens_choice_deepseek/E={experts}": lambda d, h: TokensChoiceMoE(
            d, h, experts, k=1, capacity_factor=1.0, noise_std=0.0, gate="sigmoid", bias_rate=0.001, load_weight=0.0,
            importance_weight=0.0, granularity=math.gcd(h, 4), shared_experts=1 if h % 2 == 0 else 0),
        # dropless against the bench's capacity-based tokens_choice/E= rows (same k, no noise): each expert call
        **{f"tokens_choice_dropless_{matmul}/E={experts}": (lambda matmul: lambda d, h: TokensChoiceMoE(
            d, h, experts, k=1, capacity_factor=1.0, noise_std=0.0, dropless=True, dropless_matmul=matmul))(matmul)
           for matmul in MATMULS}},
))
