"""Transport plans that choose token-expert pairs (Liu, Blondel, Riquelme, Puigcerver, TMLR 2024).

A routing group of m tokens and E experts is an optimal transport problem: each
token (row) ships a mass of 1, each expert (column) receives m / E, and moving a
token to an expert costs minus its router logit (or score). The plan P (m, E)
that solves it is balanced by construction; a router then picks its pairs by P
(each token its top-k, or each expert its top-c) and weights them by the
softmax of the logits, as the authors' routers do (google-research/vmoe,
``vmoe/projects/sparsity_constrained_ot/``).

Both solvers here run batched over groups in the caller's dtype (the routers'
float32), with no gradient: the plan only selects, so nothing differentiates it.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def sinkhorn_plan(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """Entropic OT plan (G, m, E) for logits (G, m, E): cost -logits, regularisation 1,
    row sums 1, column sums m / E.

    The authors run ott-jax's Sinkhorn in scaling form for exactly ``iterations``
    (20) iterations: u = 1; then each iteration v <- b / (K^T u), u <- a / (K v);
    P = diag(u) K diag(v) with K = exp(logits). These are the same iterates in the
    log domain (f = log u, g = log v), equal to them in exact arithmetic, where
    exp(logits) can neither overflow nor underflow. The last update is the rows', so
    rows sum to 1 up to rounding and columns approach m / E as iterations grow.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    groups, m, experts = logits.shape
    log_column_mass = math.log(m / experts)
    f = logits.new_zeros(groups, m, 1)  # log u (row mass 1: log a = 0)
    for _ in range(iterations):
        g = log_column_mass - torch.logsumexp(logits + f, dim=1, keepdim=True)  # (G, 1, E)
        f = -torch.logsumexp(logits + g, dim=2, keepdim=True)  # (G, m, 1)
    return torch.exp(logits + f + g)


def sorted_descending(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices of the last dim in descending order, ties in index order (as
    ``jax.lax.top_k``, which the authors' code uses; ``torch.topk`` leaves ties unspecified)."""
    return torch.sort(x, dim=-1, descending=True, stable=True)


def project_sparse_simplex(x: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean projection of each vector along the last dim onto the probability simplex with at
    most ``k`` non-zeros (Kyrillidis et al., 2013): its ``k`` largest entries projected onto the
    simplex, the rest 0. (``topk``, not a full sort: 5x faster inside the solver's loop; exact ties
    at the k-th value, which continuous scores do not produce, may keep either entry.)"""
    values, index = x.topk(min(k, x.shape[-1]), dim=-1)
    cumsum = values.cumsum(-1)
    rank = torch.arange(1, values.shape[-1] + 1, dtype=x.dtype, device=x.device)
    support = ((values - (cumsum - 1) / rank) > 0).sum(-1, keepdim=True)  # >= 1: the first entry always qualifies
    threshold = (cumsum.gather(-1, support - 1) - 1) / support
    return torch.zeros_like(x).scatter_(-1, index, (values - threshold).clamp_min(0))


@torch.no_grad()
def sparse_ot_plan(scores: torch.Tensor, k: int, iterations: int, lr: float, tol: float = 1e-3) -> torch.Tensor:
    """Sparsity-constrained OT plan (G, m, E) for scores (G, m, E): each expert's column has at most
    ``k`` non-zeros (Liu, Puigcerver, Blondel, ICLR 2023, "Sparsity-constrained optimal transport").

    The problem: min <P, -scores> + 1/2 ||P||^2 over plans with column sums b = m / E, row sums 1,
    and at most k non-zeros per column. The authors solve its semi-dual in alpha (one dual variable
    per token), F(alpha) = sum_j b * max_j(alpha + scores[:, j]) - sum_i alpha_i, where column j's
    regularised max takes p_j = the k-sparse simplex projection of (alpha + scores[:, j]) / b and
    its gradient is b * p_j; so grad F = P 1 - 1 with P[:, j] = b * p_j. Their solver (jaxopt's
    OptaxSolver with optax.adam(lr), 20 iterations, from alpha = 0) stops a group early once the
    gradient norm of its last step is <= ``tol`` (1e-3, jaxopt's default); so does this one.

    Columns sum to b exactly with at most k non-zeros whatever the iterations; rows reach 1 only
    at the optimum (``plan_balance`` measures how far they are).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    groups, m, experts = scores.shape
    column_mass = m / experts
    k = min(k, m)

    def plan(alpha: torch.Tensor) -> torch.Tensor:
        columns = (alpha.unsqueeze(-1) + scores).transpose(1, 2) / column_mass  # (G, E, m)
        return column_mass * project_sparse_simplex(columns, k).transpose(1, 2)

    # Adam as optax runs it (b1 0.9, b2 0.999, eps 1e-8 outside the square root), one per group.
    alpha = scores.new_zeros(groups, m)
    first, second = torch.zeros_like(alpha), torch.zeros_like(alpha)
    active = torch.ones(groups, 1, dtype=torch.bool, device=scores.device)
    for step in range(1, iterations + 1):
        grad = plan(alpha).sum(-1) - 1
        first = torch.where(active, 0.9 * first + 0.1 * grad, first)
        second = torch.where(active, 0.999 * second + 0.001 * grad * grad, second)
        # Every group still active has taken exactly `step` steps: one bias correction for all.
        update = (first / (1 - 0.9**step)) / ((second / (1 - 0.999**step)).sqrt() + 1e-8)
        alpha = torch.where(active, alpha - lr * update, alpha)
        active = active & (grad.norm(dim=-1, keepdim=True) > tol)
        if not active.any():
            break
    return plan(alpha)


@torch.no_grad()
def plan_balance(plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far a plan (G, m, E) is from its marginals: the largest relative deviation of a row sum
    from 1 and of a column sum from m / E, each averaged over groups (0 = exactly balanced)."""
    groups, m, experts = plan.shape
    rows = (plan.sum(-1) - 1).abs().amax(-1)
    columns = (plan.sum(1) / (m / experts) - 1).abs().amax(-1)
    return rows.mean(), columns.mean()


def plan_metrics(states: list[dict]) -> dict[str, torch.Tensor]:
    """The transport plan's balance over a forward's parts: worst row and column deviations from
    their targets (relative; 0 = balanced), averaged over the parts (see ``plans.plan_balance``)."""
    rows, columns = zip(*(s["plan_balance"] for s in states))
    return {"plan_row_error": torch.stack(rows).mean(), "plan_column_error": torch.stack(columns).mean()}


def plan_label(get) -> list[str]:
    """Arm label words of a router's assignment: none for softmax, else its name (and a
    non-default iteration count)."""
    assignment = get("assignment") or "softmax"
    if assignment == "softmax":
        return []
    iterations, lr = get("plan_iterations"), get("plan_lr") if assignment == "sparse_ot" else None
    return [assignment] + ([f"iters{iterations}"] if iterations not in (None, 20) else []) + \
        ([f"planlr{lr:g}"] if lr not in (None, 0.01) else [])
