"""Routing-health statistics: cheap, detached, a bounded set of keys per layer."""

from __future__ import annotations

import torch


@torch.no_grad()
def mean_entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean entropy (nats) of the distributions along ``dim``."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim).mean()


@torch.no_grad()
def load_stats(load: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coefficient of variation and max/mean of a per-expert load vector."""
    load = load.float()
    mean = load.mean().clamp_min(1e-9)
    return {"load_cv": load.std(correction=0) / mean, "load_max_over_mean": load.max() / mean}


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 over the last axis, population std; differentiable."""
    return (x.std(dim=-1, correction=0) / x.mean(dim=-1)) ** 2
