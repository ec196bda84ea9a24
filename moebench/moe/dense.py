"""The plain ViT MLP: the dense cost baseline."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..router_options import DENSE
from .base import MoELayer
from .registry import Router, register


class DenseMLP(MoELayer):
    """Linear(d, h) -> GELU -> Linear(h, d); no routing, no auxiliary loss."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        with torch.no_grad():  # same init as one expert of Experts
            for fc in (self.fc1, self.fc2):
                bound = math.sqrt(6.0 / (fc.in_features + fc.out_features))
                fc.weight.uniform_(-bound, bound)
                fc.bias.normal_(std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux_loss = x.new_zeros(())
        return self.fc2(self.act(self.fc1(x)))


register(Router(
    name="dense",
    # router.mlp_mult: a capacity control, the MLP x mlp_mult wide in the blocks an MoE would replace
    build=lambda dim, hidden_dim, num_tokens, options: DenseMLP(dim, round(hidden_dim * options.get("mlp_mult", 1))),
    options=DENSE.options,  # router_options.py
    label=lambda get: [f"MLPx{get('mlp_mult'):g}"] if get("mlp_mult") not in (None, 1, 1.0) else [],
    routed=False, replaces_blocks=lambda options: options.get("mlp_mult", 1) != 1, marker="D", order=3,
))
