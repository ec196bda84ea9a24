"""Stacked expert MLPs: all experts of a layer run in one batched matmul."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """``num_experts`` ViT MLPs (d -> h -> d, GELU) with stacked weights.

    ``forward`` takes one buffer per expert, shape (E, n, d), and returns
    (E, n, d). Two ``baddbmm`` calls cover every expert at once.

    Init follows the ViT MLP (xavier-uniform kernels, biases ~N(0, 1e-6)).
    ``identical_init`` draws one expert and copies it to all (what the Soft MoE
    reference code does); otherwise every expert gets its own draw.
    """

    matmul_kernels = ("w1", "w2")  # weight decay by role (moe/decay.py): b1, b2 are biases

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, identical_init: bool = False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.identical_init = identical_init
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        draws = 1 if self.identical_init else self.num_experts
        for w, fan_in, fan_out in ((self.w1, self.dim, self.hidden_dim), (self.w2, self.hidden_dim, self.dim)):
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w.copy_(torch.empty(draws, fan_in, fan_out).uniform_(-bound, bound).expand_as(w))
        for b in (self.b1, self.b2):
            b.copy_(torch.empty(draws, b.shape[1]).normal_(std=1e-6).expand_as(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):  # a bf16 model: the router's float32 output in bf16
            x = x.to(self.w1.dtype)
        h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), x, self.w1))
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)

    @torch.no_grad()
    def weight_similarity(self) -> torch.Tensor:
        """Mean pairwise cosine similarity of the experts' flattened (w1, w2) weights:
        1 while they are all equal (``identical_init``), near 0 for independent draws."""
        experts = self.num_experts
        if experts < 2:
            return torch.tensor(float("nan"))
        flat = [w.detach().float().reshape(experts, -1) for w in (self.w1, self.w2)]
        sq_norms = sum(torch.linalg.vector_norm(f, dim=1).pow(2) for f in flat)
        inv = torch.rsqrt(sq_norms.clamp_min(1e-24))
        # |sum of unit vectors|^2 minus the self terms: all pairs without an (E, E) matrix.
        total = sum((inv @ f).double().pow(2).sum() for f in flat)
        self_terms = (inv.pow(2) * sq_norms).double().sum()
        return ((total - self_terms) / (experts * (experts - 1))).float().clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}"


class SharedExperts(nn.Module):
    """``count`` always-on experts of hidden width ``hidden_dim`` each (DeepSeekMoE's shared experts),
    run as ONE dense MLP d -> count * hidden_dim -> d: the sum of ``count`` expert MLPs is that MLP
    with their hidden units side by side and their output biases summed into one (DeepSeek-V3's
    ``model.py`` builds its shared experts the same way: ``MLP(dim, n_shared_experts * moe_inter_dim)``).

    Init as ``count`` independent experts of ``Experts`` (xavier-uniform with each expert's own fans
    (d, hidden_dim), biases ~N(0, 1e-6)). Its ``nn.Linear`` weights are matmul kernels (weight decay).
    """

    def __init__(self, count: int, dim: int, hidden_dim: int):
        super().__init__()
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.count, self.dim, self.hidden_dim = count, dim, hidden_dim
        self.fc1 = nn.Linear(dim, count * hidden_dim)
        self.fc2 = nn.Linear(count * hidden_dim, dim)
        with torch.no_grad():
            bound = math.sqrt(6.0 / (dim + hidden_dim))
            for fc in (self.fc1, self.fc2):
                fc.weight.uniform_(-bound, bound)
                fc.bias.normal_(std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"count={self.count}, dim={self.dim}, hidden_dim={self.hidden_dim} each"
