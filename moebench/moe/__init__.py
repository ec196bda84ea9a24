"""moebench.moe: Mixture-of-Experts layers for Vision Transformers.

Pure PyTorch (no Hydra, no W&B). Every layer maps (batch, tokens, dim) to the
same shape; after each forward ``layer.aux_loss`` (differentiable scalar, 0
where the router has none) and ``layer.metrics`` (detached routing stats) hold
that forward's values, and ``collect_aux_loss(model)`` /
``collect_metrics(model)`` gather them over a whole model::

    from moebench.moe import SoftMoE, collect_aux_loss
    mlp = SoftMoE(dim=192, hidden_dim=768, num_experts=128)
    y = mlp(x)                                  # x: (B, T, 192)
    loss = task_loss + collect_aux_loss(model)
"""

from .base import MoELayer, collect_aux_loss, collect_metrics, count_parameters
from .capacity import compute_capacity
from .dense import DenseMLP
from .experts import Experts
from .experts_choice import ExpertsChoiceMoE
from .parallel import ShardedExperts, expert_parallel_parameters, shard_experts
from .soft import SoftMoE
from .sparse import SparseMoE
from .tokens_choice import TokensChoiceMoE, position_in_expert

__all__ = [
    "DenseMLP", "Experts", "ExpertsChoiceMoE", "MoELayer", "ShardedExperts", "SoftMoE", "SparseMoE", "TokensChoiceMoE",
    "collect_aux_loss", "collect_metrics", "compute_capacity", "count_parameters", "expert_parallel_parameters", "position_in_expert",
    "shard_experts",
]
