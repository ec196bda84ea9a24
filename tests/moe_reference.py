"""Slow, obviously-correct routers: explicit Python loops over tokens and experts.

They read the fast layers' own parameters and follow soft-moe.md line by line,
one token and one expert at a time. The fast layers must match them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert(layer, e: int, token: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of an ``Experts`` module on one token (d,)."""
    h = F.gelu(token @ layer.w1[e] + layer.b1[e])
    return h @ layer.w2[e] + layer.b2[e]


def capacity(tokens: int, experts: int, factor: float, k: int, rounding) -> int:
    raw = k * tokens * factor / experts
    if rounding == "ceil":
        c = math.ceil(round(raw, 9))
    elif rounding == "round":
        c = math.floor(raw + 0.5)
    else:
        c = math.ceil(round(raw, 9))
        while c % rounding:
            c += 1
    return max(1, min(c, tokens))


def soft_moe(layer, x: torch.Tensor) -> torch.Tensor:
    """Soft MoE, one example (group) at a time."""
    batch, m, d = x.shape
    n, p = layer.num_experts, layer.slots_per_expert
    slots = n * p
    out = torch.zeros_like(x)
    for b in range(batch):
        logits = torch.zeros(m, slots, dtype=x.dtype)
        for t in range(m):
            for s in range(slots):
                token, slot = x[b, t], layer.phi[:, s // p, s % p]
                if layer.normalize:
                    token = token / torch.sqrt((token**2).sum() + 1e-6)
                    slot = slot / torch.sqrt((slot**2).sum() + 1e-6)
                logits[t, s] = layer.scale * (token * slot).sum()
        if layer.dispatch == "soft":
            dispatch = torch.stack([torch.softmax(logits[:, s], 0) for s in range(slots)], 1)  # over tokens
        elif layer.dispatch == "uniform":
            dispatch = torch.full((m, slots), 1.0 / m, dtype=x.dtype)
        else:
            dispatch = torch.eye(m, dtype=x.dtype)
        if layer.combine == "soft":
            combine = torch.stack([torch.softmax(logits[t], 0) for t in range(m)], 0)  # over all slots
        elif layer.combine == "uniform":
            combine = torch.full((m, slots), 1.0 / slots, dtype=x.dtype)
        else:
            combine = torch.eye(m, dtype=x.dtype)
        slot_out = []
        for s in range(slots):
            slot_in = sum(dispatch[t, s] * x[b, t] for t in range(m))  # raw tokens
            slot_out.append(expert(layer.experts, s // p, slot_in))
        for t in range(m):
            out[b, t] = sum(combine[t, s] * slot_out[s] for s in range(slots))
    return out


def groups_of(batch: int, group_size: int) -> list[range]:
    """Consecutive examples; the last group may be smaller."""
    size = min(group_size, batch)
    return [range(start, min(start + size, batch)) for start in range(0, batch, size)]


def serve(layer, x, members, choices, order, cap, gates, out, dropped) -> None:
    """Fill the experts rank by rank (every first choice before any second), tokens in ``order``;
    a choice whose expert holds ``cap`` tokens is dropped; add each kept choice's gated output."""
    fill = [0] * layer.num_experts
    kept = {bt: [] for bt in members}
    for rank in range(layer.k):
        for bt in order:
            e = choices[bt][rank]
            if fill[e] < cap:
                fill[e] += 1
                kept[bt].append(e)
            else:
                dropped.add((bt[0], bt[1], e))
    for bt in members:
        for e in kept[bt]:
            out[bt] = out[bt] + gates[bt][e] * expert(layer.experts, e, x[bt])


def shared_experts(layer, token: torch.Tensor) -> torch.Tensor:
    """The K_s shared experts of a Tokens Choice layer on one token (d,), one expert at a time: expert j
    is the j-th block of hidden_dim units of the shared MLP; the MLP's one output bias is the sum of the
    experts' output biases, added once."""
    shared = layer.shared
    h = shared.hidden_dim
    out = shared.fc2.bias.clone()
    for j in range(shared.count):
        units = slice(j * h, (j + 1) * h)
        hidden = F.gelu(shared.fc1.weight[units] @ token + shared.fc1.bias[units])
        out = out + shared.fc2.weight[:, units] @ hidden
    return out


def tokens_choice(layer, x: torch.Tensor):
    """Tokens Choice in eval mode. Returns (output, dropped choices as a set of
    (example, token, expert)).

    With DeepSeek-V3's pieces (``gate``, ``routed_scaling``, the balancing bias, shared and
    fine-grained experts; routers-since-2023.md section 2): scores are the softmax or the sigmoid of
    the logits; each token's top-k experts are chosen by score + bias; BPR serves tokens by their top
    score + bias; a kept choice weighs its score (sigmoid: divided by the sum of the k chosen scores)
    times routed_scaling; shared experts add their output to every token. Dropless (MegaBlocks): no
    capacity, every choice is served."""
    batch, tokens, d = x.shape
    out = torch.zeros_like(x)
    dropped = set()
    sigmoid = getattr(layer, "gate_function", "softmax") == "sigmoid"
    bias = layer.selection_bias if getattr(layer, "bias_rate", 0) > 0 else torch.zeros(layer.num_experts)
    scaling = getattr(layer, "routed_scaling", 1.0)
    for group in groups_of(batch, layer.group_size):
        members = [(b, t) for b in group for t in range(tokens)]  # example-major token order
        cap = capacity(len(members), layer.num_experts, layer.capacity_factor, layer.k, layer.capacity_rounding)
        if getattr(layer, "dropless", False):
            cap = len(members)  # an expert can take every token of the group: no choice is ever dropped
        logits = {bt: layer.gate.weight @ x[bt] for bt in members}
        scores = {bt: torch.sigmoid(logits[bt]) if sigmoid else torch.softmax(logits[bt], 0) for bt in members}
        select = {bt: [float(scores[bt][e].detach()) + float(bias[e]) for e in range(layer.num_experts)] for bt in members}
        choices = {bt: sorted(range(layer.num_experts), key=lambda e: -select[bt][e])[:layer.k] for bt in members}
        gates = {}
        for bt in members:
            total = sum(scores[bt][e] for e in choices[bt]) if sigmoid else 1.0
            gates[bt] = {e: scores[bt][e] / total * scaling for e in choices[bt]}
        if layer.bpr:  # descending top selection score; ties keep token order (sorted is stable)
            order = sorted(members, key=lambda bt: -max(select[bt]))
        else:
            order = members
        serve(layer, x, members, choices, order, cap, gates, out, dropped)
        if getattr(layer, "shared", None) is not None:
            for bt in members:
                out[bt] = out[bt] + shared_experts(layer, x[bt])
    return out, dropped


def experts_choice(layer, x: torch.Tensor):
    """Experts Choice in eval mode. Returns (output, picks per (example, token))."""
    batch, tokens, d = x.shape
    out = torch.zeros_like(x)
    picks = {}
    for group in groups_of(batch, layer.group_size):
        members = [(b, t) for b in group for t in range(tokens)]
        c = capacity(len(members), layer.num_experts, layer.capacity_factor, 1, layer.capacity_rounding)
        gates = {bt: torch.softmax(layer.gate.weight @ x[bt], 0) for bt in members}
        for bt in members:
            picks[bt] = 0
        for e in range(layer.num_experts):
            column = torch.stack([gates[bt][e] for bt in members])
            for i in torch.topk(column, c).indices.tolist():
                bt = members[i]
                picks[bt] += 1
                out[bt] = out[bt] + gates[bt][e] * expert(layer.experts, e, x[bt])
    return out, picks


# ----------------------------------------------------------------------------- transport plans (Liu et al. 2024)

def sinkhorn(logits: torch.Tensor, iterations: int) -> list[list[float]]:
    """The authors' Sinkhorn (ott-jax, scaling form) for one group's logits (m, E), in plain floats:
    u = 1; each iteration v_j = (m/E) / sum_i K_ij u_i, then u_i = 1 / sum_j K_ij v_j; P = u K v."""
    m, experts = logits.shape
    K = [[math.exp(float(logits[i, j])) for j in range(experts)] for i in range(m)]
    u, v = [1.0] * m, [1.0] * experts
    for _ in range(iterations):
        v = [(m / experts) / sum(K[i][j] * u[i] for i in range(m)) for j in range(experts)]
        u = [1.0 / sum(K[i][j] * v[j] for j in range(experts)) for i in range(m)]
    return [[u[i] * K[i][j] * v[j] for j in range(experts)] for i in range(m)]


def simplex_projection(values: list[float]) -> list[float]:
    """Euclidean projection onto the probability simplex: the theta with sum(max(v - theta, 0)) = 1,
    found by trying each support size from the largest value down."""
    ordered = sorted(values, reverse=True)
    theta = ordered[0] - 1.0
    for size in range(1, len(ordered) + 1):
        candidate = (sum(ordered[:size]) - 1.0) / size
        if ordered[size - 1] - candidate > 0:
            theta = candidate
    return [max(v - theta, 0.0) for v in values]


def sparse_ot(scores: torch.Tensor, k: int, iterations: int, lr: float, tol: float = 1e-3) -> list[list[float]]:
    """The authors' sparsity-constrained plan for one group's scores (m, E): Adam on the semi-dual's
    alpha (optax defaults), each column the k-sparse simplex projection of (alpha + scores_j) / b,
    times b; a group stops once the gradient norm of its last step is <= tol (jaxopt)."""
    m, experts = scores.shape
    b = m / experts
    S = [[float(scores[i, j]) for j in range(experts)] for i in range(m)]

    def plan(alpha):
        P = [[0.0] * experts for _ in range(m)]
        for j in range(experts):
            column = [(alpha[i] + S[i][j]) / b for i in range(m)]
            top = sorted(range(m), key=lambda i: (-column[i], i))[:k]
            for i, p in zip(top, simplex_projection([column[i] for i in top])):
                P[i][j] = b * p
        return P

    alpha, first, second = [0.0] * m, [0.0] * m, [0.0] * m
    for step in range(1, iterations + 1):
        grad = [sum(row) - 1.0 for row in plan(alpha)]
        for i in range(m):
            first[i] = 0.9 * first[i] + 0.1 * grad[i]
            second[i] = 0.999 * second[i] + 0.001 * grad[i] ** 2
            update = (first[i] / (1 - 0.9**step)) / (math.sqrt(second[i] / (1 - 0.999**step)) + 1e-8)
            alpha[i] -= lr * update
        if math.sqrt(sum(g * g for g in grad)) <= tol:
            break
    return plan(alpha)


def group_plan(layer, logits: torch.Tensor, scores: torch.Tensor, capacity_: int) -> list[list[float]]:
    """The plan a router with ``layer.assignment`` computes for one group (m, E)."""
    if layer.assignment == "sinkhorn":
        return sinkhorn(logits, layer.plan_iterations)
    return sparse_ot(scores, capacity_, layer.plan_iterations, layer.plan_lr)


def sinkhorn_tokens_choice(layer, x: torch.Tensor):
    """Sinkhorn Tokens Choice in eval mode: every token's top-k experts by the group's plan (ties to
    the lower expert), BPR by the top plan entry, capacity as Tokens Choice, combine weights the
    softmax gates. Returns (output, dropped choices as a set of (example, token, expert))."""
    batch, tokens, d = x.shape
    out = torch.zeros_like(x)
    dropped = set()
    for group in groups_of(batch, layer.group_size):
        members = [(b, t) for b in group for t in range(tokens)]
        cap = capacity(len(members), layer.num_experts, layer.capacity_factor, layer.k, layer.capacity_rounding)
        if getattr(layer, "dropless", False):
            cap = len(members)
        logits = torch.stack([layer.gate.weight @ x[bt] for bt in members])
        plan = sinkhorn(logits.detach(), layer.plan_iterations)
        gates = {bt: torch.softmax(logits[i], 0) for i, bt in enumerate(members)}
        choices = {bt: sorted(range(layer.num_experts), key=lambda e: (-plan[i][e], e))[:layer.k]
                   for i, bt in enumerate(members)}
        top = {bt: max(plan[i]) for i, bt in enumerate(members)}
        order = sorted(members, key=lambda bt: -top[bt]) if layer.bpr else members
        serve(layer, x, members, choices, order, cap, gates, out, dropped)
    return out, dropped


def plan_experts_choice(layer, x: torch.Tensor):
    """Sinkhorn or sparsity-constrained Experts Choice in eval mode: every expert takes the c tokens
    with the largest plan entries of its column (ties to the lower token, as jax.lax.top_k), weighted
    by the softmax gate. Returns (output, picks per (example, token))."""
    batch, tokens, d = x.shape
    out = torch.zeros_like(x)
    picks = {}
    for group in groups_of(batch, layer.group_size):
        members = [(b, t) for b in group for t in range(tokens)]
        c = capacity(len(members), layer.num_experts, layer.capacity_factor, 1, layer.capacity_rounding)
        logits = torch.stack([layer.gate.weight @ x[bt] for bt in members])
        gates = torch.softmax(logits, -1)
        plan = group_plan(layer, logits.detach(), gates.detach(), c)
        for bt in members:
            picks[bt] = 0
        for e in range(layer.num_experts):
            for i in sorted(range(len(members)), key=lambda i: (-plan[i][e], i))[:c]:
                bt = members[i]
                picks[bt] += 1
                out[bt] = out[bt] + gates[i, e] * expert(layer.experts, e, x[bt])
    return out, picks


def remoe(layer, x: torch.Tensor):
    """ReMoE (Wang et al. 2025) on the whole batch, one token and one expert at a time: gate
    g_e = max(0, w_e . x); every expert with g_e > 0 adds g_e * expert_e(x). Returns (output, the
    load-balanced L1 penalty E / (k N^2) * sum_e (sum_t g_te) * #{t: g_te > 0})."""
    batch, tokens, d = x.shape
    out = torch.zeros_like(x)
    experts, n = layer.num_experts, batch * tokens
    gate_sums = [x.new_zeros(()) for _ in range(experts)]
    counts = [0] * experts
    for b in range(batch):
        for t in range(tokens):
            for e in range(experts):
                g = torch.relu(layer.gate.weight[e] @ x[b, t])
                gate_sums[e] = gate_sums[e] + g
                if g > 0:
                    counts[e] += 1
                    out[b, t] = out[b, t] + g * expert(layer.experts, e, x[b, t])
    penalty = sum(gate_sums[e] * counts[e] for e in range(experts)) * experts / (layer.k * n * n)
    return out, penalty
