"""Routing-health statistics: cheap, detached, a bounded set of keys per layer."""

from __future__ import annotations

import torch


@torch.no_grad()
def mean_entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean entropy (nats) of the distributions along ``dim``."""
    return torch.special.entr(probs).sum(dim).mean()  # entr: -p log p, 0 at p = 0; one temporary


@torch.no_grad()
def load_stats(load: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coefficient of variation and max/mean of a per-expert load vector."""
    load = load.float()
    mean = load.mean().clamp_min(1e-9)
    return {"load_cv": load.std(correction=0) / mean, "load_max_over_mean": load.max() / mean}


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 over the last axis, population std; differentiable."""
    return (x.std(dim=-1, correction=0) / x.mean(dim=-1)) ** 2


@torch.no_grad()
def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all ordered pairs i != j of the rows of ``vectors``
    (..., N, D), averaged over the leading axes; NaN for N < 2.

    The sum over pairs is |sum_i u_i|^2 - sum_i |u_i|^2 for unit rows u_i, so this
    costs O(N D) instead of the O(N^2 D) of a similarity matrix: cheap enough for
    256 experts of a ViT-Ti layer every epoch.
    """
    n = vectors.shape[-2]
    if n < 2:
        return vectors.new_full((), float("nan"))
    v = vectors.float()
    unit = v * torch.rsqrt(v.pow(2).sum(-1, keepdim=True).clamp_min(1e-24))
    total = unit.sum(-2).double().pow(2).sum(-1)
    self_terms = unit.pow(2).sum((-2, -1)).double()
    return ((total - self_terms) / (n * (n - 1))).mean().float().clamp(-1.0, 1.0)  # rounding may pass 1
