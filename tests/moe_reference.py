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


def tokens_choice(layer, x: torch.Tensor):
    """Tokens Choice in eval mode. Returns (output, dropped choices as a set of
    (example, token, expert))."""
    batch, tokens, d = x.shape
    out = torch.zeros_like(x)
    dropped = set()
    for group in groups_of(batch, layer.group_size):
        members = [(b, t) for b in group for t in range(tokens)]  # example-major token order
        cap = capacity(len(members), layer.num_experts, layer.capacity_factor, layer.k, layer.capacity_rounding)
        gates = {bt: torch.softmax(layer.gate.weight @ x[bt], 0) for bt in members}
        choices = {bt: torch.topk(gates[bt], layer.k).indices.tolist() for bt in members}
        if layer.bpr:  # descending top-1 gate; ties keep token order (sorted is stable)
            order = sorted(members, key=lambda bt: -gates[bt].max().item())
        else:
            order = members
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
