"""moebench.moe: Mixture-of-Experts layers for Vision Transformers.

Pure PyTorch (no Hydra, no W&B). Every layer maps (batch, tokens, dim) to the
same shape. Routers compute in float32 even under bf16 autocast (the experts
follow the autocast). In training mode each forward leaves ``layer.aux_loss``
(differentiable scalar, 0 where the router has none);
``collect_aux_loss(model)`` sums the last forward's losses. Routing
statistics cost time, so they are computed only when asked:
``track_routing(model, "train")`` adds every training forward's statistics to
running sums (``True``: every forward, e.g. on test data), and
``collect_metrics(model)`` returns their means since its previous call.
``collect_diagnostics(model)`` measures the weights (similarity of experts
and slots: do they diverge?). Tokens Choice with ``bias_rate`` > 0 balances its
load with a bias instead of a loss: call ``update_balancing_bias(model)``
after each optimizer step (it sums the load over torch.distributed ranks); ReMoE adapts its L1
coefficient the same way, with ``update_l1_coefficient(model)`` after each step::

    from moebench.moe import SoftMoE, collect_aux_loss, collect_metrics, track_routing
    mlp = SoftMoE(dim=192, hidden_dim=768, num_experts=128)
    track_routing(model, "train")               # optional: statistics of training forwards
    y = mlp(x)                                  # x: (B, T, 192)
    loss = task_loss + collect_aux_loss(model)
    log(collect_metrics(model))                 # every N steps: means over those N steps

In eval mode nothing is computed (aux_loss is 0, no statistics) unless
tracking is ``True``.

Each routed layer says what it dispatches where with ``layer.routing(x)``
(``SoftRouting`` or ``SparseRouting``: what `moebench inspect` draws), and
each router's module registers a ``Router`` (``registry``): its layer builder,
option schema, cross-key rules and arm label, all moebench's harness needs to
train, aggregate, inspect and bench it. A new router is one module that
defines its layer and calls ``register``.

Importing this package changes nothing global. On Linux/glibc,
``tune_cpu_allocator()`` makes the process keep freed memory for reuse instead
of unmapping it and page-faulting it in again (up to 2x on the weight gradients
of hundreds of experts; see ``moebench.allocator``); the process then keeps its
peak memory reserved. The ``moebench`` command calls it; call it yourself for
the same speed (``MOEBENCH_MALLOC_TUNING=0`` in the environment turns it into
a no-op). It returns whether the tuning is in force.
"""

from ..allocator import tune_cpu_allocator
from .base import (
    MoELayer, collect_aux_loss, collect_diagnostics, collect_metrics, count_parameters, discard_balancing_load,
    track_routing, update_balancing_bias,
)
from .capacity import compute_capacity
from .decay import matmul_kernel_names, weight_decay_split
from .dense import DenseMLP
from .experts import Experts, SharedExperts
from .experts_choice import ExpertsChoiceMoE
from .parallel import ShardedExperts, expert_parallel_parameters, shard_experts
from .remoe import ReMoE, discard_gate_counts, update_l1_coefficient
from . import registry  # routers by name: each router's module registers itself (registry.Router)
from .registry import Router, register
from .soft import SoftMoE, SoftRouting
from .sparse import SparseMoE, SparseRouting
from .tokens_choice import TokensChoiceMoE, position_in_expert

__all__ = [
    "DenseMLP", "Experts", "ExpertsChoiceMoE", "MoELayer", "ReMoE", "Router", "ShardedExperts", "SoftMoE",
    "SoftRouting", "SharedExperts", "SparseMoE", "SparseRouting", "TokensChoiceMoE",
    "collect_aux_loss", "collect_diagnostics", "collect_metrics", "compute_capacity", "count_parameters",
    "discard_balancing_load", "discard_gate_counts", "expert_parallel_parameters", "matmul_kernel_names",
    "position_in_expert", "register", "registry",
    "shard_experts", "track_routing", "tune_cpu_allocator", "update_balancing_bias", "update_l1_coefficient",
    "weight_decay_split",
]
