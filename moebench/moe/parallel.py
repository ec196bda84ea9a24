"""Expert parallelism: each rank of a process group holds E/W experts of every MoE layer.

The router (Soft MoE's slot parameters, the Tokens/Experts Choice gate) stays
replicated and runs on each rank's own examples, exactly as in one process.
Only the expert call changes: the per-expert buffers (E, rows, d) a layer
builds (Soft MoE's slots, the capacity buffers of the sparse routers) are
exchanged with ``all_to_all`` so that rank r receives, from every rank, the rows
of the experts it owns; it runs them in one batched matmul and sends the
outputs back. Outputs and gradients equal those of the unsharded layer applied
to the concatenation of all ranks' inputs.

Gradient convention: the gradient of a sharded expert weight is that of the
SUM of all ranks' losses (every rank's rows flow through it). Data-parallel
training averages the replicated gradients over ranks, so divide the sharded
ones by the world size to match (``expert_parallel_parameters`` lists them).

``state_dict`` gathers the shards, so a checkpoint holds full (E, ...) tensors
and loads into an unsharded model; ``load_state_dict`` takes full tensors and
keeps this rank's slice. Both are collectives: call them on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .base import MoELayer
from .experts import Experts

PARAM_NAMES = ("w1", "b1", "w2", "b2")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 whose backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, send_sizes: list[int], recv_sizes: list[int], group):
        ctx.sizes, ctx.group = (send_sizes, recv_sizes), group
        out = x.new_empty((sum(recv_sizes), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_sizes, recv_sizes = ctx.sizes
        out = grad.new_empty((sum(send_sizes), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send_sizes, recv_sizes, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group=None) -> torch.Tensor:
    """Differentiable all-to-all of the rows of ``x``: ``send_sizes[j]`` rows go to rank j."""
    return _AllToAll.apply(x, send_sizes, recv_sizes, group)


class ShardedExperts(Experts):
    """The experts ``[rank * E/W, (rank + 1) * E/W)`` of an ``Experts`` module.

    ``forward`` takes and returns the same (E, rows, d) buffers as ``Experts``
    (all E experts, this rank's rows); ``rows`` may differ between ranks.
    """

    def __init__(self, experts: Experts, group=None):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if experts.num_experts % world:
            raise ValueError(f"expert parallelism needs num_experts ({experts.num_experts}) divisible by "
                             f"the number of ranks ({world})")
        local = experts.num_experts // world
        with torch.random.fork_rng(devices=[]):  # the init draw below is overwritten: leave the RNG as it was
            super().__init__(local, experts.dim, experts.hidden_dim, identical_init=experts.identical_init)
        self.to(device=experts.w1.device, dtype=experts.w1.dtype)
        self.group, self.world, self.rank = group, world, rank
        self.global_experts = experts.num_experts
        with torch.no_grad():
            for name in PARAM_NAMES:
                getattr(self, name).copy_(getattr(experts, name)[rank * local:(rank + 1) * local])
        self.register_state_dict_post_hook(_gather_shards)
        self.register_load_state_dict_pre_hook(_keep_own_shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts, rows, dim = x.shape
        if experts != self.global_experts:
            raise ValueError(f"expected buffers for {self.global_experts} experts, got {experts}")
        local = self.num_experts
        # Every rank's row count, so that uneven batches (a last eval batch) work.
        counts = torch.tensor([rows], device=x.device)
        all_counts = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(all_counts, counts, group=self.group)
        all_rows = [int(c) for c in all_counts]
        send = [local * rows] * self.world  # (E, rows, d) is W blocks of (E/W, rows, d)
        recv = [local * r for r in all_rows]
        received = all_to_all(x.reshape(experts * rows, dim), send, recv, self.group)
        # [(E/W, rows_j, d) from rank j] -> (E/W, sum_j rows_j, d): one batched call.
        pieces = [p.view(local, r, dim) for p, r in zip(received.split(recv), all_rows)]
        out = super().forward(torch.cat(pieces, dim=1))
        back = torch.cat([p.reshape(-1, dim) for p in out.split(all_rows, dim=1)])
        return all_to_all(back, recv, send, self.group).view(experts, rows, dim)

    def extra_repr(self) -> str:
        return (f"local experts {self.rank * self.num_experts}..{(self.rank + 1) * self.num_experts - 1} "
                f"of {self.global_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}")


def _gather_shards(module: ShardedExperts, state_dict, prefix, local_metadata) -> None:
    for name in PARAM_NAMES:
        shard = state_dict[prefix + name].detach().contiguous()
        shards = [torch.empty_like(shard) for _ in range(module.world)]
        dist.all_gather(shards, shard, group=module.group)
        state_dict[prefix + name] = torch.cat(shards)


def _keep_own_shard(module: ShardedExperts, state_dict, prefix, *args) -> None:
    local = module.num_experts
    for name in PARAM_NAMES:
        full = state_dict.get(prefix + name)
        if full is not None and full.shape[0] == module.global_experts:
            state_dict[prefix + name] = full[module.rank * local:(module.rank + 1) * local]


def shard_experts(model: nn.Module, group=None) -> nn.Module:
    """Replace the ``experts`` of every MoE layer of ``model`` by this rank's shard (in place).

    Call it on every rank, after building the same full model on each (same
    seed), so that the shards together are the full layer.
    """
    for module in model.modules():
        if isinstance(module, MoELayer) and type(getattr(module, "experts", None)) is Experts:
            module.experts = ShardedExperts(module.experts, group)
    return model


def expert_parallel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded (per-rank) parameters of ``model``."""
    return [p for m in model.modules() if isinstance(m, ShardedExperts) for p in m.parameters()]
