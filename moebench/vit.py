"""A small Vision Transformer whose MLP blocks can be swapped for MoE layers.

Pre-LayerNorm blocks, attention through ``scaled_dot_product_attention``,
learned position embeddings, global-average-pool head (the Soft MoE paper's
choice; a CLS token is optional). MoE layers replace the MLP of the blocks
chosen by ``moe_block_indices`` with the residual ``x + moe(norm(x))``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .moe import DenseMLP


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)); ``mlp`` is any (B, T, d) -> (B, T, d) module."""

    def __init__(self, dim: int, heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def moe_block_indices(depth: int, placement: str = "last", n: int | None = None,
                      layers: Sequence[int] | None = None) -> list[int]:
    """Indices (0-based) of the blocks whose MLP becomes an MoE layer.

    ``last``: the final ``n`` blocks (default: the second half, as in the
    paper); ``every``: every ``n``-th block counting from the first (block
    n-1, 2n-1, ...); ``list``: exactly ``layers``.
    """
    if placement == "last":
        n = depth // 2 if n is None else n
        if not 0 <= n <= depth:
            raise ValueError(f"model.moe.n must be in [0, depth={depth}] for placement 'last', got {n}")
        return list(range(depth - n, depth))
    if placement == "every":
        if n is None or n < 1:
            raise ValueError(f"model.moe.n must be >= 1 for placement 'every', got {n}")
        return list(range(n - 1, depth, n))
    if placement == "list":
        layers = sorted(set(layers or []))
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"model.moe.layers {bad} out of range: blocks are 0..{depth - 1}")
        return layers
    raise ValueError(f"model.moe.placement must be one of last, every, list; got {placement!r}")


class ViT(nn.Module):
    """ViT classifier. ``make_moe(block_index)`` builds the MLP of every block
    listed in ``moe_blocks``; the other blocks get a ``DenseMLP``."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        in_chans: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        moe_blocks: Sequence[int] = (),
        make_moe: Callable[[int], nn.Module] | None = None,
        pool: str = "gap",
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        if pool not in ("gap", "cls"):
            raise ValueError(f"pool must be 'gap' or 'cls', got {pool!r}")
        if moe_blocks and make_moe is None:
            raise ValueError("moe_blocks given without make_moe")
        self.pool = pool
        self.num_patches = (image_size // patch_size) ** 2
        self.num_tokens = self.num_patches + (pool == "cls")
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(dim, heads, make_moe(i) if i in moe_blocks else DenseMLP(dim, mlp_dim)) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)  # ViT's zero-init head: training starts at uniform predictions
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(1))
