"""`moebench train` on several processes: torchrun, DDP and expert parallelism.

torchrun starts one process per device and sets RANK, WORLD_SIZE and
LOCAL_RANK. ``setup()`` joins the process group before Hydra starts, so that
every rank agrees on one run dir (rank 0's timestamp) and only rank 0 writes
Hydra's files. Everything here is a no-op in a single process.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta

import torch
import torch.distributed as dist

if dist.is_available():
    # Imported before any process group exists, on purpose: this module binds ``group.WORLD`` into its functions'
    # default arguments when it is first imported. torch._dynamo imports it (torch.compile, the dropless expert
    # call); imported after ``init_process_group``, it would keep the group alive past ``destroy_process_group``,
    # and gloo's threads would then race interpreter shutdown ("terminate called without an active exception").
    import torch.distributed.nn.functional  # noqa: F401


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's place, from torchrun's environment variables."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return Ranks(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)),
                 int(env.get("LOCAL_WORLD_SIZE", world)))


_STAMP = datetime.now()


def run_stamp(fmt: str) -> str:
    """The run's start time, the same on every rank (the ``moebench_now`` resolver)."""
    return _STAMP.strftime(fmt)


def setup() -> list[str]:
    """Start a command: stamp its start time and, under torchrun, join the
    process group and share rank 0's stamp. Returns Hydra overrides for this rank.

    The backend follows the device: tensors on CUDA go through NCCL, tensors
    on the CPU through gloo (one process group serves both).
    """
    global _STAMP
    _STAMP = datetime.now()  # per command, like Hydra's ${now:}
    ranks = current()
    if not ranks.enabled:
        return []
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                timeout=collective_timeout())
    stamp = [_STAMP]
    dist.broadcast_object_list(stamp, src=0)
    _STAMP = stamp[0]
    if ranks.is_main:
        return []
    # Other ranks share rank 0's run dir but write nothing into it.
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def refusal(own: str | None, ranks: Ranks) -> str | None:
    """The command line's refusal that every rank agrees on: this rank's error (or None) in, the
    first rank's error out (prefixed ``rank N:`` when it is not rank 0's), None when no rank refused.

    Every rank calls this once after checking its command line, refused or not, so that no rank
    exits before rank 0 has the line to print: torchrun stops the remaining ranks as soon as one
    exits, and a rank 0 stopped before it printed would leave the user no error at all.
    """
    if not ranks.enabled:
        return own
    errors: list[str | None] = [None] * ranks.world_size
    dist.all_gather_object(errors, own)
    for rank, error in enumerate(errors):
        if error is not None:
            return error if rank == 0 else f"rank {rank}: {error}"
    return None


def collective_timeout() -> timedelta:
    """How long a collective waits for the other ranks before it fails (a hung or lost rank):
    ``MOEBENCH_COLLECTIVE_TIMEOUT_S``, default 10 minutes (torch's own default is 30)."""
    return timedelta(seconds=float(os.environ.get("MOEBENCH_COLLECTIVE_TIMEOUT_S", 600)))


def teardown(ok: bool = True) -> None:
    """Leave the process group together, after the objects that hold it (DDP's reducer) are gone:
    gloo threads still alive at interpreter shutdown can abort the process.

    After an error (``ok=False``) there is no together: the other ranks may be
    stuck in a collective or gone, so this process leaves at once (``abandon``).
    """
    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def abandon(code: int) -> None:
    """End this rank now, without waiting for the others (a barrier after an error would hang
    until the collective timeout). torchrun then stops the remaining ranks."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_PEER_FAILURE = re.compile(r"Connection (reset|closed) by peer|Broken pipe|remote process exited|"
                           r"NCCL communicator was aborted|Timed out|timed out|Socket Timeout|gloo/transport",
                           re.IGNORECASE)


def is_peer_failure(err: BaseException) -> bool:
    """An error that only says another rank failed (its own error is the one to report)."""
    return current().enabled and isinstance(err, RuntimeError) and bool(_PEER_FAILURE.search(str(err)))


def device_for(name: str, ranks: Ranks) -> str:
    """``auto`` -> cuda when there is CUDA, else cpu; under torchrun, ``cuda`` is this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{ranks.local_rank}" if name == "cuda" and ranks.enabled else name


def threads_for(setting, ranks: Ranks, jobs_in_parallel: int = 1) -> int | None:
    """torch intra-op threads per process: ``auto`` splits the cores between the
    processes of this machine (torchrun ranks, parallel launcher jobs)."""
    if setting in (None, "auto"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        sharing = ranks.local_world_size * max(1, jobs_in_parallel)
        return max(1, cores // sharing) if sharing > 1 else None
    return int(setting)


# ----------------------------------------------------------------------------- collectives for training

def mean_over_ranks(values: dict[str, float], ranks: Ranks, device) -> dict[str, float]:
    """Average a dict of floats (same keys on every rank) over the ranks."""
    if not ranks.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / ranks.world_size for k, v in zip(keys, t.tolist())}


def sum_over_ranks(values: list[float], ranks: Ranks, device) -> list[float]:
    if not ranks.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_over_ranks(values: list[float], ranks: Ranks, device) -> list[float]:
    """Element-wise maximum over the ranks: "did any rank see this?" for a list of flags."""
    if not ranks.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def agree(flag: bool, ranks: Ranks, device) -> bool:
    """Rank 0's decision, on every rank (e.g. stop at a time limit that clocks see differently)."""
    if not ranks.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        dist.barrier()


def clip_grad_norm(replicated: list, sharded: list, max_norm: float, ranks: Ranks) -> torch.Tensor:
    """Clip by the global norm of the whole model, whose sharded part lives on all ranks."""
    grads = [p.grad for p in replicated if p.grad is not None]
    shard_grads = [p.grad for p in sharded if p.grad is not None]
    sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    if shard_grads:
        shard_sq = torch.stack([g.detach().float().pow(2).sum() for g in shard_grads]).sum()
        if ranks.enabled:
            dist.all_reduce(shard_sq)
        sq = sq.to(shard_sq.device) + shard_sq
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads + shard_grads:
        g.mul_(scale.to(g.device, g.dtype))
    return norm


def gather_rng_states(ranks: Ranks) -> list[torch.Tensor]:
    state = torch.get_rng_state()
    if not ranks.enabled:
        return [state]
    states: list = [None] * ranks.world_size
    dist.all_gather_object(states, state)
    return states


def _sharded_moments(state: dict, optimizer: torch.optim.Optimizer, sharded: list):
    """(per-parameter state, key, tensor, parameter) for every moment tensor of a sharded parameter."""
    ids = {id(p) for p in sharded}
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    for index, p in enumerate(params):
        if id(p) in ids and index in state["state"]:
            entry = state["state"][index]
            for key, value in list(entry.items()):
                if torch.is_tensor(value) and value.ndim > 0:  # exp_avg, exp_avg_sq; not the step count
                    yield entry, key, value, p


def optimizer_state_full(optimizer: torch.optim.Optimizer, sharded: list, ranks: Ranks) -> dict:
    """``optimizer.state_dict()`` with the sharded parameters' moments gathered to full size."""
    state = optimizer.state_dict()
    if ranks.enabled:
        for entry, key, value, _ in _sharded_moments(state, optimizer, sharded):
            pieces = [torch.empty_like(value) for _ in range(ranks.world_size)]
            dist.all_gather(pieces, value.contiguous())
            entry[key] = torch.cat(pieces)
    return state


def optimizer_state_local(state: dict, optimizer: torch.optim.Optimizer, sharded: list, ranks: Ranks) -> dict:
    """The inverse: keep this rank's slice of full-size moments (a checkpoint from any world size)."""
    for entry, key, value, p in _sharded_moments(state, optimizer, sharded):
        n = p.shape[0]
        if value.shape[0] == n * ranks.world_size:
            entry[key] = value[ranks.rank * n:(ranks.rank + 1) * n]
    return state
