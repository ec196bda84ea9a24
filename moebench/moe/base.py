"""The MoE layer contract and helpers that walk a model's MoE layers.

Every layer maps (batch, tokens, dim) -> (batch, tokens, dim). After each
forward it leaves two things on itself, which a training loop collects:

- ``aux_loss``: a differentiable 0-dim tensor (0 for routers without one);
- ``metrics``: a small dict of detached 0-dim tensors (routing health).
"""

from __future__ import annotations

import torch
from torch import nn


class MoELayer(nn.Module):
    """Base class of the token-mixing MLP replacements (dense included)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.metrics: dict[str, torch.Tensor] = {}

    def active_expert_fraction(self) -> float:
        """Share of this layer's expert parameters one token passes through."""
        return 1.0


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of every MoE layer's last forward."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoELayer)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


def collect_metrics(model: nn.Module) -> dict[str, float]:
    """Routing metrics of the last forward as ``{"<module name>/<key>": float}``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            for key, value in module.metrics.items():
                out[f"{name}/{key}"] = float(value)
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters, and the "active" ones a single token passes through.

    Active counts every non-expert parameter once, plus each MoE layer's expert
    parameters scaled by the share of experts a token reaches (Soft MoE: all of
    them, every token feeds every slot; Tokens Choice: k/E; Experts Choice: C/E
    in expectation). This is the usual "active parameters" of the MoE literature.
    """
    from .experts import Experts  # local: avoid an import cycle

    total = sum(p.numel() for p in model.parameters())
    active = float(total)
    for module in model.modules():
        if isinstance(module, MoELayer):
            expert_params = sum(
                p.numel() for m in module.modules() if isinstance(m, Experts) for p in m.parameters()
            )
            active -= expert_params * (1.0 - module.active_expert_fraction())
    return {"total": int(total), "active": int(round(active))}
