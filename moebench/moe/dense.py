"""The plain ViT MLP: the dense cost baseline."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import MoELayer


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
