"""`moebench train`: the Hydra app that builds, trains, evaluates and measures one model.

The only module that turns a config into objects. One call of ``run_job``
is one run: it leaves ``result.json``, ``metrics.jsonl``, checkpoints and a
W&B run in its run dir, whatever happens (status completed, stopped,
preempted, diverged or failed: status.py), once it holds the dir's lock (a job
refused there because another run holds it writes nothing). ``train_and_measure`` is
``build`` -> ``fit`` -> ``measure`` around one ``RunState``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, cost, distributed, faults, memory, preflight, schema, search, status
from . import upcycle  # init_from: sparse upcycling from a dense run
from .checkpoint import check_resume_config, checkpoint_path, flatten, load_checkpoint  # noqa: F401 (API)
from .data import DataError, Loader, load_data
from .errors import CheckpointError, ConfigError, RecordError, UserError
from .moe import DenseMLP, ExpertsChoiceMoE, MoELayer, SoftMoE, TokensChoiceMoE, collect_aux_loss, collect_metrics
from .moe import collect_diagnostics, track_routing
from .moe import count_parameters, expert_parallel_parameters, shard_experts
from .moe.decay import weight_decay_split
from .preemption import DEFAULT_SIGNALS, StopRequest
from .progress import TrainProgress, announce_run, print_summary
from .tracking import RunRecorder, atomic_torch_save, run_name, sweep_group
from .vit import ViT, moe_block_indices
from . import probe  # eval.probe: few-shot probes after training
from . import timm_backbone  # model=timm: a timm ViT with moebench routers

log = logging.getLogger("moebench")

ROUTERS = {"soft": SoftMoE, "tokens_choice": TokensChoiceMoE, "experts_choice": ExpertsChoiceMoE, "dense": DenseMLP}
FAILED_JOBS = status.FAILED_JOBS  # run dirs of jobs that did not end well (the CLI's exit code)
COMMAND: preflight.Command | None = None  # this process's checked command line (main)
STARTUP_STOP = StopRequest()  # signals before and between jobs (main): remembered for the next job


# ----------------------------------------------------------------------------- config -> objects

def validate(cfg: DictConfig) -> None:
    """Reject bad values with one line naming the key and what is allowed."""
    r = cfg.router
    if r.name not in ROUTERS:
        raise ConfigError(f"router.name={r.name!r} is unknown; allowed: {', '.join(ROUTERS)}")
    if r.name == "dense" and not r.get("mlp_mult", 1) > 0:
        raise ConfigError(f"router.mlp_mult must be > 0, got {r.mlp_mult}")
    if r.name != "dense":
        if r.num_experts < 1:
            raise ConfigError(f"experts (router.num_experts) must be >= 1, got {r.num_experts}")
    if r.name == "soft":
        if r.slot_factor is None and r.slots_per_expert < 1:
            raise ConfigError(f"slots (router.slots_per_expert) must be >= 1, got {r.slots_per_expert}")
        if r.slot_factor is not None and r.slot_factor <= 0:
            raise ConfigError(f"router.slot_factor must be > 0, got {r.slot_factor}")
        for key in ("dispatch", "combine"):
            if r[key] not in ("soft", "uniform", "identity"):
                raise ConfigError(f"router.{key}={r[key]!r} is unknown; allowed: soft, uniform, identity")
    if r.name == "tokens_choice" and not 1 <= r.k <= r.num_experts:
        raise ConfigError(f"k (router.k) must be in [1, experts={r.num_experts}], got {r.k}")
    if r.name in ("tokens_choice", "experts_choice"):
        if r.capacity_factor <= 0:
            raise ConfigError(f"capacity_factor (router.capacity_factor) must be > 0, got {r.capacity_factor}")
        if r.group_size < 1:
            raise ConfigError(f"router.group_size must be >= 1, got {r.group_size}")
        rounding = r.capacity_rounding
        if rounding not in ("ceil", "round") and not (isinstance(rounding, int) and rounding >= 1):
            raise ConfigError(f"router.capacity_rounding={rounding!r}; allowed: ceil, round or an int >= 1")
    m = cfg.model
    own_vit = not timm_backbone.is_timm(cfg)  # model=timm: timm_backbone.validate checks the model
    null = [key for key in ("patch_size", "dim", "depth", "heads", "mlp_dim", "pool") if m.get(key) is None]
    if own_vit and null:
        raise ConfigError(f"model.{null[0]}=null: moebench's ViT needs a value (null means the model's own "
                          "only with model=timm)")
    if not own_vit:
        timm_backbone.validate(cfg)
    if own_vit and cfg.data.image_size % m.patch_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not divisible by model.patch_size={m.patch_size}"
        )
    if own_vit and m.dim % m.heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.heads={m.heads}")
    if own_vit and m.pool not in ("gap", "cls"):
        raise ConfigError(f"model.pool={m.pool!r}; allowed: gap, cls")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={cfg.precision!r}; allowed: fp32, bf16")
    if cfg.train.schedule not in ("cosine", "rsqrt", "constant"):
        raise ConfigError(f"train.schedule={cfg.train.schedule!r}; allowed: cosine, rsqrt, constant")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    try:
        moe_blocks(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    world = distributed.current().world_size
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible "
                          f"by the {world} processes")
    if cfg.expert_parallel and r.name != "dense" and r.num_experts % world:
        raise ConfigError(f"expert_parallel=true needs experts ({r.num_experts}) divisible by the {world} processes")
    if cfg.threads not in (None, "auto") and not (isinstance(cfg.threads, int) and cfg.threads >= 1):
        raise ConfigError(f"threads={cfg.threads!r}; allowed: auto or an int >= 1")
    check_fits(cfg)


def check_fits(cfg: DictConfig) -> None:
    """Refuse, before anything is allocated, a run whose estimated memory exceeds the device's (memory.py)."""
    try:
        blocks = len(moe_blocks(cfg))
    except Exception:  # validate names what is wrong with the blocks
        return
    memory.check(cfg, build_model, blocks)


def moe_blocks(cfg: DictConfig) -> list[int]:
    if cfg.router.name == "dense":
        return []
    moe = cfg.model.moe
    layers = list(moe.layers) if moe.layers is not None else None
    depth = timm_backbone.depth(cfg) if timm_backbone.is_timm(cfg) else cfg.model.depth
    return moe_block_indices(depth, moe.placement, moe.n, layers)


def build_model(cfg: DictConfig, in_chans: int, num_classes: int,
                load_pretrained: bool = True) -> torch.nn.Module:
    """``load_pretrained=False``: the weights come from a checkpoint next, so model=timm's
    ``model.pretrained`` downloads nothing."""
    if timm_backbone.is_timm(cfg):
        return timm_backbone.build(cfg, in_chans, num_classes, router_layer(cfg), load_pretrained=load_pretrained)
    m, r = cfg.model, cfg.router
    # Every router key is a constructor argument of its layer, but for the optimizer's.
    kwargs = {key: value for key, value in OmegaConf.to_container(r, resolve=True).items()
              if key not in ("name", "lr_mult")}
    num_tokens = (cfg.data.image_size // m.patch_size) ** 2 + (m.pool == "cls")
    if r.name == "soft":
        kwargs["num_tokens"] = num_tokens

    blocks = moe_blocks(cfg)
    if r.name == "dense" and kwargs.get("mlp_mult", 1) != 1:
        # A capacity control: the blocks an MoE would replace get a wider dense MLP instead.
        moe = m.moe
        blocks = moe_block_indices(m.depth, moe.placement, moe.n, list(moe.layers) if moe.layers is not None else None)

    def make_moe(_: int) -> torch.nn.Module:
        if r.name == "dense":
            return DenseMLP(m.dim, round(m.mlp_dim * kwargs.get("mlp_mult", 1)))
        return ROUTERS[r.name](m.dim, m.mlp_dim, **kwargs)

    return ViT(
        image_size=cfg.data.image_size, patch_size=m.patch_size, in_chans=in_chans, num_classes=num_classes,
        dim=m.dim, depth=m.depth, heads=m.heads, mlp_dim=m.mlp_dim, pool=m.pool,
        moe_blocks=blocks, make_moe=make_moe,
    )


def router_layer(cfg: DictConfig):
    """``make(dim, hidden_dim, num_tokens)``: the MLP replacement of one MoE block as ``cfg.router`` says
    (model=timm: its sizes come from the timm model)."""
    r = cfg.router
    kwargs = {key: value for key, value in OmegaConf.to_container(r, resolve=True).items()
              if key not in ("name", "lr_mult")}

    def make(dim: int, hidden_dim: int, num_tokens: int) -> torch.nn.Module:
        if r.name == "dense":
            return DenseMLP(dim, round(hidden_dim * kwargs.get("mlp_mult", 1)))
        extra = {"num_tokens": num_tokens} if r.name == "soft" else {}
        return ROUTERS[r.name](dim, hidden_dim, **kwargs, **extra)

    return make


def select_device(name: str, ranks: distributed.Ranks) -> torch.device:
    device = torch.device(distributed.device_for(name, ranks))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=auto or device=cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine to 0, rsqrt or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "rsqrt":
        return math.sqrt(max(1, warmup_steps) / (step + 1))
    return 1.0


def router_parameter_names(model: torch.nn.Module) -> set[str]:
    """Every parameter of an MoE layer outside its experts: Soft MoE's phi and
    scale, the Tokens/Experts Choice gate."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, MoELayer) and hasattr(module, "experts"):
            expert_ids = {id(p) for p in module.experts.parameters()}
            names.update(f"{module_name}.{name}" for name, p in module.named_parameters()
                         if id(p) not in expert_ids)
    return names


def optimizer_groups(model: torch.nn.Module, cfg: DictConfig) -> list[dict]:
    """AdamW parameter groups: weight decay on matmul kernels only (by role, as the
    Soft MoE authors do: moe/decay.py), and ``router.lr_mult`` on router parameters.
    Each group carries its parameter ``names`` (recorded in result.json)."""
    decay, _ = weight_decay_split(model)
    decay = set(decay)
    router = router_parameter_names(model)
    lr_mult = float(cfg.router.get("lr_mult", 1.0) or 1.0)
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        key = (name in decay, name in router and lr_mult != 1.0)
        group = groups.setdefault(key, {
            "params": [], "names": [], "weight_decay": cfg.train.weight_decay if key[0] else 0.0,
            "lr_mult": lr_mult if key[1] else 1.0,
        })
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def make_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.train.lr, betas=tuple(cfg.train.betas))


def optimizer_record(optimizer: torch.optim.Optimizer) -> dict:
    """Which parameters were decayed, and which had a learning-rate multiplier (result.json)."""
    groups = optimizer.param_groups
    record = {
        "decay": [n for g in groups if g["weight_decay"] for n in g["names"]],
        "no_decay": [n for g in groups if not g["weight_decay"] for n in g["names"]],
    }
    lr_mult = {n: g["lr_mult"] for g in groups if g["lr_mult"] != 1.0 for n in g["names"]}
    if lr_mult:
        record["lr_mult"] = lr_mult
    return record


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, loader, device, autocast, ranks: distributed.Ranks) -> dict[str, float]:
    """Test loss, top-1 and top-5 over the whole split (each rank scores its part; label -1 is padding)."""
    model.eval()
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    with torch.no_grad(), autocast():
        for images, labels in loader:
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum", ignore_index=-1).item()
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += (ranked[:, 0] == labels).sum().item()
            top5 += (ranked == labels[:, None]).any(1).sum().item()
            total += (labels >= 0).sum().item()
    model.train()
    total, loss_sum, top1, top5 = distributed.sum_over_ranks([total, loss_sum, top1, top5], ranks, device)
    out = {"top1": top1 / total, "loss": loss_sum / total}
    if logits.shape[1] > 5:
        out["top5"] = top5 / total
    return out


# ----------------------------------------------------------------------------- the run: build, fit, measure

@dataclass
class RunState:
    """One run between ``build`` and ``measure``: its objects and its position in training
    (what a checkpoint saves, what ``fit`` advances, what the records report)."""
    cfg: DictConfig
    run_dir: Path
    ranks: distributed.Ranks
    device: torch.device
    data: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sharded: list
    replicated: list
    params: dict
    norm: dict
    train_loader: Loader
    test_loader: Loader
    val_loader: Loader | None
    config: dict
    throughput: cost.Throughput
    amp_dtype: torch.dtype | None = None
    train_model: torch.nn.Module | None = None  # the model as trained: DDP-wrapped, compiled
    recorder: RunRecorder | None = None
    epoch: int = 0  # epochs done...
    batch: int = 0  # ...plus the batches of the next one done
    step: int = 0
    best: dict = field(default_factory=lambda: {"val_top1": -1.0, "epoch": None, "test": {}})
    last_eval: dict = field(default_factory=dict)
    skipped_steps: int = 0  # non-finite steps skipped (train.skip_nonfinite_steps)
    last_finite_loss: float | None = None
    outcome: str = status.COMPLETED  # how fit() ended
    signum: int | None = None  # the signal that preempted it
    diverged: dict | None = None  # where and how it diverged
    init_from: dict | None = None  # the run it started from (init_from), and that run's training cost
    started: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def total_steps(self) -> int:
        return self.cfg.train.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return round(self.cfg.train.warmup_epochs * self.steps_per_epoch)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def train_and_measure(cfg: DictConfig, run_dir: Path, recorder_cfg: dict, state: dict,
                      stopper: StopRequest | None = None) -> dict:
    """Everything of one run after validation; fills ``state`` as it goes (for failure records).

    Under torchrun every rank runs this; rank 0 alone writes records and checkpoints.
    """
    run = build(cfg, run_dir, recorder_cfg, state)
    fit(run, stopper or StopRequest(()))
    if run.outcome in (status.PREEMPTED, status.DIVERGED):
        return record_so_far(run)  # the rest would take time a preempted job does not have
    return measure(run)


def build(cfg: DictConfig, run_dir: Path, recorder_cfg: dict, state: dict) -> RunState:
    """Data, model, optimizer and loaders; the checkpoint's state when resuming; records opened."""
    ranks = distributed.current()
    device = select_device(cfg.device, ranks)
    threads = distributed.threads_for(cfg.threads, ranks, parallel_jobs())
    if threads:
        torch.set_num_threads(threads)
    cost.reset_peak_memory(device)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(cfg.deterministic)  # set both ways: a sweep reuses the process

    ckpt = None
    if cfg.resume:
        ckpt_file = checkpoint_path(cfg.resume)
        ckpt, used, damaged = checkpoint.load_with_fallback(ckpt_file)
        check_resume_config(ckpt["config"], cfg, used)
        if damaged and ranks.is_main:  # last.pt damaged: continue from the one before it (one line says so)
            checkpoint.announce_fallback(damaged, used, ckpt)
            checkpoint.reinstate_previous(ckpt_file)
        run_dir = ckpt_file.parent
        state["run_dir"] = run_dir
    if ranks.is_main:
        announce_run(run_dir, resumed_epoch=ckpt["epoch"] if ckpt is not None else None)
    d = cfg.data
    data = load_data(
        d.name, root=d.root, image_size=d.image_size, download=d.download,
        num_train=d.num_train, num_test=d.num_test, seed=cfg.seed, val_fraction=d.val_fraction,
    )
    # the same full model on every rank; a resumed run's weights are in its checkpoint
    model = build_model(cfg, data.in_chans, data.num_classes, load_pretrained=ckpt is None).to(device)
    track_routing(model, "train")  # routing statistics of every training step, none of evaluation
    init_from = None
    if cfg.get("init_from") and ckpt is None:  # a resumed run continues its own weights, never re-initialised
        init_from = upcycle.init_model(model, cfg.init_from, OmegaConf.to_container(cfg, resolve=True))
        log.info("init_from %s: %d weights copied, MoE layers %s upcycled (experts = the dense MLP), "
                 "fresh: %s", init_from["path"], init_from["copied"], init_from["upcycled"] or "none",
                 ", ".join(init_from["fresh"]) or "none")
    params = count_parameters(model)
    if cfg.expert_parallel and ranks.enabled:
        shard_experts(model)
    sharded = expert_parallel_parameters(model)
    sharded_ids = {id(p) for p in sharded}
    replicated = [p for p in model.parameters() if id(p) not in sharded_ids]
    if ranks.rank > 0:  # own routing-noise stream per rank; rank 0 continues the single-process one
        torch.manual_seed(cfg.seed + 1_000_003 * ranks.rank)
    optimizer = make_optimizer(model, cfg)
    norm = {"mean": data.mean, "std": data.std, "device": device}
    shard = {"rank": ranks.rank, "world_size": ranks.world_size}
    train_loader = Loader(
        data.train_images, data.train_labels, d.batch_size, shuffle=True, drop_last=True,
        augment=OmegaConf.to_container(d.augment), seed=cfg.seed, num_classes=data.num_classes, **norm, **shard,
    )
    test_loader = Loader(data.test_images, data.test_labels, d.eval_batch_size, shuffle=False, drop_last=False,
                         **norm, **shard)
    val_loader = None
    if data.val_labels is not None:
        val_loader = Loader(data.val_images, data.val_labels, d.eval_batch_size, shuffle=False, drop_last=False,
                            **norm, **shard)
    if len(train_loader) == 0:
        raise ConfigError(f"data.batch_size={d.batch_size} exceeds the {len(data.train_labels)} training images")
    run = RunState(
        cfg=cfg, run_dir=run_dir, ranks=ranks, device=device, data=data, model=model, optimizer=optimizer,
        sharded=sharded, replicated=replicated, params=params, norm=norm, train_loader=train_loader,
        test_loader=test_loader, val_loader=val_loader, config=OmegaConf.to_container(cfg, resolve=True),
        throughput=cost.Throughput(skip=cfg.cost.skip_train_steps),
        amp_dtype=torch.bfloat16 if cfg.precision == "bf16" else None, init_from=init_from,
    )
    state["run"] = run
    if ckpt is not None:
        restore(run, ckpt)

    layout = f"; {ranks.world_size} processes{', experts sharded' if sharded else ''}" if ranks.enabled else ""
    log.info("model: %s router, %d params (%d active per token), MoE blocks %s, %d tokens%s",
             cfg.router.name, params["total"], params["active"], moe_blocks(cfg), model.num_tokens, layout)
    if ranks.is_main:
        checkpoint.remove_stale_temp_files(run_dir)
        run.recorder = RunRecorder(run_dir, run.config, wandb_cfg={**recorder_cfg, "id": (ckpt or {}).get("wandb_id")},
                                   resume_step=run.step if ckpt is not None else None)
        state["recorder"] = run.recorder
    run.train_model = model
    if ranks.enabled:
        if sharded:  # each rank owns different experts: DDP must neither broadcast nor average them
            # (DDP's own way to exclude parameters; a private helper, so pinned by the torchrun tests)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [name for name, p in model.named_parameters() if id(p) in sharded_ids])
        r = cfg.router
        no_slot_logits = r.name == "soft" and "soft" not in (r.dispatch, r.combine)  # phi unused (Table 2 arms)
        run.train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=no_slot_logits,
        )
    if cfg.compile:
        run.train_model = torch.compile(run.train_model)
    return run


def restore(run: RunState, ckpt: dict) -> None:
    """Continue where the checkpoint stopped: weights, optimizer, position, RNG streams."""
    try:
        run.model.load_state_dict(ckpt["model"])  # full expert tensors: any world size, sharded or not
        run.optimizer.load_state_dict(
            distributed.optimizer_state_local(ckpt["optimizer"], run.optimizer, run.sharded, run.ranks))
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {run.cfg.resume} does not fit this model: {str(err).splitlines()[0]}") from None
    run.epoch, run.batch, run.step = ckpt["epoch"], ckpt.get("batch", 0), ckpt["step"]
    run.best = ckpt.get("best", run.best)
    run.last_eval = ckpt.get("last_eval", {})
    run.skipped_steps = ckpt.get("skipped_steps", 0)
    run.last_finite_loss = ckpt.get("last_finite_loss")
    run.init_from = ckpt.get("init_from")
    run.throughput.load_state_dict(ckpt.get("throughput", {}))
    rank_states = ckpt["rng"].get("torch_ranks", [])
    same_world = len(rank_states) == run.ranks.world_size
    torch.set_rng_state(rank_states[run.ranks.rank] if same_world else ckpt["rng"]["torch"])
    if run.device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])


def fit(run: RunState, stopper: StopRequest) -> None:
    """Train from the run's position to the last epoch, or until a signal, the time limit or
    divergence stops it (``run.outcome``). The data order of an epoch depends on (seed, epoch)
    only, so a resumed epoch replays it and skips the batches already trained on."""
    cfg = run.cfg
    steps_per_epoch = run.steps_per_epoch
    run.model.train()
    with TrainProgress(cfg.train.epochs, steps_per_epoch, run.epoch, enabled=run.ranks.is_main) as progress:
        for epoch in range(run.epoch, cfg.train.epochs):
            run.train_loader.set_epoch(epoch)
            batches = iter(run.train_loader)
            for _ in range(run.batch):  # the same shuffle and augmentation draws as an uninterrupted run
                next(batches)
            for images, labels in batches:
                task_loss, aux_loss, grad_norm = forward_backward(run, images, labels)
                signum, checkpoint_due, nonfinite = agree_after_step(run, stopper, task_loss, grad_norm)
                if nonfinite and run.skipped_steps >= cfg.train.get("skip_nonfinite_steps", 0):
                    run.outcome, run.diverged = status.DIVERGED, {
                        "step": run.step + 1, "epoch": epoch + 1, "loss": str(task_loss.item()),
                        "grad_norm": str(float(grad_norm)), "last_finite_loss": run.last_finite_loss,
                    }
                    return  # the weights stay those of the last finite step
                if nonfinite:
                    run.skipped_steps += 1
                    run.optimizer.zero_grad(set_to_none=True)
                    log.warning("step %d: non-finite loss or gradient: skipped (%d of train.skip_nonfinite_steps=%d)",
                                run.step + 1, run.skipped_steps, cfg.train.skip_nonfinite_steps)
                else:
                    run.optimizer.step()
                    run.last_finite_loss = task_loss.item()
                if run.device.type == "cuda":
                    torch.cuda.synchronize()
                run.throughput.stop(len(labels) * run.ranks.world_size)  # images (mixed labels are 2-D)
                run.step += 1
                run.batch += 1
                log_step(run, epoch, task_loss, aux_loss, progress)
                mid_epoch = run.batch < steps_per_epoch  # at an epoch's end its own checkpoint follows
                if signum and mid_epoch:
                    save_run_checkpoint(run)
                    run.outcome, run.signum = status.PREEMPTED, signum
                    return
                if checkpoint_due and mid_epoch:
                    save_run_checkpoint(run)
            end_epoch(run, epoch, progress)
            signum = int(distributed.max_over_ranks([float(stopper.signum or 0)], run.ranks, run.device)[0])
            if signum:
                run.outcome, run.signum = status.PREEMPTED, signum
                return
            limit = cfg.train.time_limit_min
            out_of_time = limit is not None and time.monotonic() - run.started >= 60 * limit
            if epoch + 1 < cfg.train.epochs and distributed.agree(out_of_time, run.ranks, run.device):
                log.warning("train.time_limit_min=%s reached after epoch %d: stopping (status stopped, resumable)",
                            limit, epoch + 1)
                run.outcome = status.STOPPED
                return


def forward_backward(run: RunState, images, labels):
    """One step's loss and gradients (not applied yet); returns (task loss, aux loss, gradient norm)."""
    cfg, optimizer = run.cfg, run.optimizer
    factor = lr_factor(run.step, run.warmup_steps, run.total_steps, cfg.train.schedule)
    for group in optimizer.param_groups:
        group["lr"] = cfg.train.lr * factor * group["lr_mult"]
    run.throughput.start()
    with run.autocast():
        logits = run.train_model(images)
        task_loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.train.label_smoothing)
        aux_loss = collect_aux_loss(run.model).to(task_loss.device)
    if faults.hit("step"):
        task_loss = task_loss * float("nan")
    loss = task_loss + aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p in run.sharded:  # their gradient sums all ranks' losses; DDP averages the others
        if p.grad is not None:
            p.grad.div_(run.ranks.world_size)
    max_norm = cfg.train.grad_clip or math.inf  # inf: the norm only (divergence check), grads unchanged
    if run.sharded:
        grad_norm = distributed.clip_grad_norm(run.replicated, run.sharded, max_norm, run.ranks)
    elif cfg.train.grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
    return task_loss, aux_loss, grad_norm


def agree_after_step(run: RunState, stopper: StopRequest, task_loss, grad_norm) -> tuple[int, bool, bool]:
    """What every rank does after this step: (signal number or 0, write a step checkpoint, non-finite).
    One small collective under torchrun, so that all ranks stop, save or skip at the same step."""
    every = run.cfg.train
    due = False
    if run.ranks.is_main and every.get("save_checkpoints", True):
        steps, minutes = every.get("checkpoint_every_steps"), every.get("checkpoint_every_min")
        due = bool(steps and (run.step + 1) % steps == 0) or \
            bool(minutes and time.monotonic() - run.last_checkpoint >= 60 * minutes)
    nonfinite = not (math.isfinite(task_loss.item()) and math.isfinite(float(grad_norm)))
    flags = distributed.max_over_ranks([float(stopper.signum or 0), float(due), float(nonfinite)],
                                       run.ranks, run.device)
    return int(flags[0]), flags[1] > 0, flags[2] > 0


def log_step(run: RunState, epoch: int, task_loss, aux_loss, progress) -> None:
    cfg, step = run.cfg, run.step
    lr = cfg.train.lr * lr_factor(step - 1, run.warmup_steps, run.total_steps, cfg.train.schedule)
    if step % cfg.train.log_every == 0 or step == run.total_steps:
        metrics = distributed.mean_over_ranks({
            "train/loss": task_loss.item(), "train/aux_loss": aux_loss.item(),
            **{f"routing/{key}": value for key, value in collect_metrics(run.model).items()},
        }, run.ranks, run.device)
        metrics.update({"epoch": epoch + 1, "train/lr": lr, "train/images_per_s": run.throughput.images_per_s})
        if run.skipped_steps:
            metrics["train/skipped_nonfinite_steps"] = run.skipped_steps
        if run.recorder:
            run.recorder.log(metrics, step=step)
    progress.advance(loss=task_loss.item(), lr=lr, images_per_s=run.throughput.images_per_s)


def end_epoch(run: RunState, epoch: int, progress) -> None:
    """Evaluate, keep the best validation epoch, log, and write the epoch's checkpoint."""
    cfg, ranks, recorder = run.cfg, run.ranks, run.recorder
    run.last_eval = last_eval = evaluate(run.model, run.test_loader, run.device, run.autocast, ranks)
    val_eval = evaluate(run.model, run.val_loader, run.device, run.autocast, ranks) if run.val_loader else {}
    is_best = bool(val_eval) and val_eval["top1"] > run.best["val_top1"]
    if is_best:
        run.best = {"val_top1": val_eval["top1"], "epoch": epoch + 1, "test": dict(last_eval)}
    if recorder:  # diagnostics: do experts, slots and gates diverge? (weights only: cheap per epoch)
        recorder.log({"epoch": epoch + 1, **{f"test/{k}": v for k, v in last_eval.items()},
                      **{f"val/{k}": v for k, v in val_eval.items()},
                      **{f"diagnostics/{k}": v for k, v in collect_diagnostics(run.model).items()}}, step=run.step)
    timing = progress.end_epoch(epoch + 1, last_eval["top1"])
    log.info("epoch %d/%d: test top1 %.2f%%, loss %.4f, %s", epoch + 1, cfg.train.epochs,
             100 * last_eval["top1"], last_eval["loss"], timing)
    run.epoch, run.batch = epoch + 1, 0
    save_run_checkpoint(run, is_best=is_best and cfg.train.save_best)


def save_run_checkpoint(run: RunState, is_best: bool = False) -> None:
    """last.pt (and best.pt) at the run's position; every rank takes part (collectives), rank 0 writes."""
    if not run.cfg.train.save_checkpoints:
        return
    save_checkpoint(run.run_dir, is_best, run.ranks, {
        "model": run.model.state_dict(),  # collectives under expert parallelism: every rank calls them
        "optimizer": distributed.optimizer_state_full(run.optimizer, run.sharded, run.ranks),
        "rng": rng_state(run.device, run.ranks),
        "epoch": run.epoch, "batch": run.batch, "step": run.step, "best": run.best, "last_eval": run.last_eval,
        "skipped_steps": run.skipped_steps, "last_finite_loss": run.last_finite_loss, "config": run.config,
        "wandb_id": run.recorder.wandb_run_id if run.recorder else None, "throughput": run.throughput.state_dict(),
        "init_from": run.init_from,
    })
    run.last_checkpoint = time.monotonic()


def record_so_far(run: RunState) -> dict:
    """The run's record with what it has measured up to now (any status)."""
    last_eval, best = run.last_eval, run.best
    quality = {
        "top1": last_eval.get("top1"),  # the final model on the test split
        "loss": last_eval.get("loss"),
        "top1_at_best_val": best["test"].get("top1"),  # the model of the best validation epoch, on test
        "val_top1_best": best["val_top1"] if best["epoch"] else None,
        "best_val_epoch": best["epoch"],
    }
    if "top5" in last_eval:
        quality["top5"] = last_eval["top5"]
    record = {
        "config": run.config,
        "cost": {"params_total": run.params["total"], "params_active": run.params["active"],
                 "train_images_per_s": run.throughput.images_per_s},
        "quality": quality,
        "status": run.outcome,
        "epochs_completed": run.epoch,
        "position": {"epoch": run.epoch, "batch": run.batch, "step": run.step},
        "train_time_s": time.monotonic() - run.started,
        "device": str(run.device),
        "processes": run.ranks.world_size,
        "threads": torch.get_num_threads(),
        "expert_parallel": bool(run.sharded),
        "optimizer": optimizer_record(run.optimizer),
        "run_dir": str(run.run_dir),
    }
    if run.skipped_steps:
        record["skipped_nonfinite_steps"] = run.skipped_steps
    if run.signum:
        record["signal"] = status.signal_name(run.signum)
    if run.diverged:
        record["diverged"] = run.diverged
    if run.init_from:
        record["init_from"] = run.init_from
    return record


def measure(run: RunState) -> dict:
    """The trained model's cost, and the final record."""
    if not run.last_eval:  # resumed a run that had already finished: measure it as it is
        run.last_eval = evaluate(run.model, run.test_loader, run.device, run.autocast, run.ranks)
    measured = measure_cost(run.cfg, run.model, run.data, run.norm, run.params, run.throughput, run.device, run.ranks)
    if measured is not None:  # training compute: what --include-init-cost adds an init run's to
        images = run.step * run.cfg.data.batch_size
        measured.update(train_images=images,
                        train_gflops_total=cost.train_gflops_total(measured["gflops_per_image"], images))
    return {**record_so_far(run), "cost": measured}


def parallel_jobs() -> int:
    """How many jobs a parallel launcher (joblib's n_jobs) runs at once on this machine."""
    n_jobs = HydraConfig.get().launcher.get("n_jobs") if HydraConfig.initialized() else None
    if not n_jobs:
        return 1
    return n_jobs if n_jobs > 0 else os.cpu_count() or 1  # joblib: -1 means one job per core


def rng_state(device: torch.device, ranks: distributed.Ranks) -> dict:
    rank_states = distributed.gather_rng_states(ranks)
    rng = {"torch": rank_states[0], "torch_ranks": rank_states}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_checkpoint(run_dir: Path, is_best: bool, ranks: distributed.Ranks, ckpt_state: dict) -> None:
    if not ranks.is_main:
        return
    ckpt_state = checkpoint.with_checksum(ckpt_state)  # verified on load (checkpoint.verify)
    for name in ("last.pt", "best.pt") if is_best else ("last.pt",):
        keep = checkpoint.previous_path(run_dir / name) if name == "last.pt" else None
        try:
            atomic_torch_save(ckpt_state, run_dir / name, keep_previous=keep)
        except OSError as err:  # the previous checkpoint is intact: the write went to a temp file
            raise RecordError(f"cannot write checkpoint {run_dir / name}: {err.strerror or err}; "
                              "the previous checkpoint is intact") from None


def measure_cost(cfg, model, data, norm, params, throughput, device, ranks: distributed.Ranks) -> dict | None:
    """Cost of the trained model as one process serves it (rank 0 measures, the others wait)."""
    if expert_parallel_parameters(model):  # measure the unsharded model: same weights, no collectives
        state = model.state_dict()  # a collective: every rank gathers
        if ranks.is_main:
            model = build_model(cfg, data.in_chans, data.num_classes, load_pretrained=False).to(device)
            model.load_state_dict(state)
    measured = None
    if ranks.is_main:
        n, b = cfg.cost.batch_size, cfg.data.batch_size
        example = next(iter(Loader(data.test_images[:n], data.test_labels[:n], n, shuffle=False,
                                   drop_last=False, **norm)))[0]
        batch, labels = next(iter(Loader(data.train_images[:b], data.train_labels[:b], b, shuffle=False,
                                         drop_last=False, **norm)))  # a training batch, for its memory
        timed = {"warmup": cfg.cost.warmup, "repeats": cfg.cost.repeats, "precision": cfg.precision,
                 "compiled": torch.compile(model) if cfg.compile else None}  # served as it was trained
        measured = {
            "params_total": params["total"],
            "params_active": params["active"],
            "gflops_per_image": cost.flops_per_image(model, example) / 1e9,
            "train_images_per_s": throughput.images_per_s,
            **cost.measure_inference(model, example, **timed),
            "latency_ms": cost.measure_inference(model, example[:1], **timed)["infer_ms_per_image"],
            "precision": cfg.precision,
            "compile": bool(cfg.compile),
            "train_peak_mb": cost.train_peak_mb(model, batch, labels, cfg.precision),  # the model's own memory
            "infer_peak_mb": cost.infer_peak_mb(model, example, cfg.precision),
            "peak_memory_mb": cost.peak_memory_mb(device),  # the whole process, data included
        }
    distributed.barrier(ranks)
    return measured


def previous_result(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Make re-running a cut-off sweep (same sweep dir) pick up where it stopped.

    A run dir that already holds a completed run of this config is not trained
    again (its result is returned); one that holds a checkpoint of an unfinished
    run (stopped, preempted, killed...) is resumed from it.
    """
    if cfg.resume:
        return None
    result_file = run_dir / "result.json"
    last = run_dir / "last.pt"
    if result_file.is_file():
        try:
            previous = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if previous.get("status") == status.COMPLETED:
            check_resume_config(previous.get("config", {}), cfg, result_file)
            if previous.get("epochs_completed", 0) >= cfg.train.epochs or not last.is_file():
                return previous
    if last.is_file():
        log.info("%s holds an unfinished run: resuming it", run_dir)
        cfg.resume = str(run_dir)
    return None


def wandb_settings(cfg: DictConfig) -> dict:
    """W&B run identity: group = the sweep (dated) under -m, name = the user's overrides."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = cfg.wandb.group or (sweep_group(hc.sweep.dir) if multirun else None)
    name = cfg.wandb.name or run_name(list(hc.overrides.task), hc.job.config.override_dirname.exclude_keys)
    tags = [cfg.router.name, cfg.data.name, *cfg.wandb.tags]
    return {"mode": cfg.wandb.mode, "project": cfg.wandb.project, "entity": cfg.wandb.entity,
            "group": group, "name": name, "tags": tags, "job_type": "train"}


def run_job(cfg: DictConfig) -> dict:
    """One Hydra job. User errors end it with one line and status "failed", divergence with
    status "diverged"; under -m the sweep goes on with the next job. A signal ends it with
    status "preempted" after a checkpoint, and ends the command (a sweep too)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    ranks = distributed.current()
    state: dict = {"run_dir": run_dir}
    outcome, error, result, skipped = status.FAILED, None, None, False
    stopper = StopRequest(cfg.train.get("preempt_signals") or DEFAULT_SIGNALS)
    stopper.signum = STARTUP_STOP.signum  # a signal while the command started: stop after the first step
    held = False  # this process holds the run dir's lock: only then may it write there
    try:
        with stopper:
            if ranks.is_main:  # first: a job refused here (another run holds the dir) writes nothing into it
                try:
                    checkpoint.lock_run_dir(run_dir)
                except UserError:
                    release_log_file(run_dir)  # Hydra's train.log handler: not ours to write to
                    raise
            held = True
            validate(cfg)
            schema.check(OmegaConf.to_container(cfg, resolve=True))
            probe.check_config(cfg)
            previous = previous_result(cfg, run_dir)
            if previous is not None:  # its records are already on disk
                log.info("%s already holds this completed run: skipping it", run_dir)
                skipped, outcome = True, status.COMPLETED
                return previous
            result = train_and_measure(cfg, run_dir, wandb_settings(cfg), state, stopper)
            probe.after_training(cfg, result, state["run_dir"])  # eval.probe: few-shot probes into the result
            search.record(result, cfg, hc)  # under hydra/sweeper=optuna: what the study searched and saw
            outcome = result["status"]
            return result
    except (UserError, DataError, OSError) as err:  # OSError: a full disk, a dir made read-only...
        error = str(err) if not isinstance(err, OSError) else f"{err.filename or state['run_dir']}: {err.strerror}"
        if ranks.is_main:
            print(f"moebench: error: {error}", file=sys.stderr, flush=True)  # one plain line, never wrapped
        if not multirun:
            bad_input = not isinstance(err, (OSError, RecordError))
            raise SystemExit(status.EXIT_BAD_INPUT if bad_input else status.EXIT_FAILED) from None
        return {"status": status.FAILED, "error": error}
    except KeyboardInterrupt:  # a second Ctrl-C: out now, with the last checkpoint written
        outcome, error = status.PREEMPTED, "KeyboardInterrupt (SIGINT twice): stopped mid-step"
        state["signum"] = signal.SIGINT
        return {}
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        if ranks.enabled:  # one line per failing rank, and no waiting for the others (see main)
            if distributed.is_peer_failure(err):
                error = f"another rank failed ({error.splitlines()[0]})"
            else:
                print(f"moebench: error: rank {ranks.rank}: {error.splitlines()[0]}", file=sys.stderr, flush=True)
            raise SystemExit(status.EXIT_FAILED) from None
        if not multirun:
            raise  # a bug: the traceback helps
        log.exception("job failed: %s", error)  # keep the traceback in the log, but let a sweep go on
        return {"status": status.FAILED, "error": error}
    finally:
        run = state.get("run")
        if not skipped:
            status.note(str(state["run_dir"]), outcome)
            if ranks.is_main and held:  # a job that does not hold the dir (another run does) leaves no record
                leave_record(cfg, state, result, outcome, error)
        if ranks.is_main and held:
            checkpoint.unlock_run_dir(state["run_dir"])
        if outcome == status.PREEMPTED:
            signum = (run.signum if run is not None and run.signum else None) or state.get("signum") or signal.SIGTERM
            if ranks.is_main:
                announce_stop(state["run_dir"], signum, run, multirun)
            raise SystemExit(status.exit_code(status.PREEMPTED, signum))  # the sweep stops too


def release_log_file(run_dir: Path) -> None:
    """Close the log handlers Hydra opened on files in ``run_dir`` (its ``train.log``): a job refused
    there must not log into another run's file (the next job's launch line would go there)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == Path(os.path.abspath(run_dir)):
            root.removeHandler(handler)
            handler.close()


def announce_stop(run_dir: Path, signum: int, run: "RunState | None", multirun: bool) -> None:
    """Where the preempted run is and the exact command that continues it (stderr: logs of batch jobs)."""
    where = f"step {run.step} (epoch {run.epoch + 1}, batch {run.batch}/{run.steps_per_epoch})" if run else "startup"
    print(f"moebench: {status.signal_name(signum)}: preempted at {where}; run dir: {run_dir}", file=sys.stderr)
    print(f"moebench: resume with: {resume_command(run_dir, multirun)}", file=sys.stderr, flush=True)


def resume_command(run_dir: Path, multirun: bool) -> str:
    if COMMAND is not None:
        return COMMAND.resume_command(run_dir)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    return shlex.join(["moebench", "train", *overrides, f"resume={run_dir}"])


def leave_record(cfg: DictConfig, state: dict, result: dict | None, outcome: str, error: str | None) -> None:
    """Write result.json whatever happened (with what the run had measured so far) and close the W&B run."""
    recorder = state.get("recorder")
    run = state.get("run")
    if not result:
        result = record_so_far(run) if run is not None else {"config": resolved_or_raw(cfg)}
        result.update({"status": outcome, "error": error})
        if state.get("signum"):
            result["signal"] = status.signal_name(state["signum"])
    if outcome == status.DIVERGED and result.get("diverged"):
        d = result["diverged"]
        print(f"moebench: diverged at step {d['step']} (loss {d['loss']}, gradient norm {d['grad_norm']}; "
              f"last finite loss {d['last_finite_loss']}); record: {state['run_dir']}/result.json",
              file=sys.stderr, flush=True)
    try:
        if recorder is None:
            recorder = RunRecorder(state["run_dir"], result["config"], wandb_cfg=None)
        recorder.write_result(result)
    except OSError as err:  # e.g. the disk filled up: what was written before stays as it was
        if outcome != status.FAILED:
            print(f"moebench: error: cannot write {state['run_dir']}/result.json: {err.strerror}", file=sys.stderr)
    finally:
        if recorder is not None:
            recorder.finish(exit_code=0 if outcome in (status.COMPLETED, status.STOPPED) else 1)
    if outcome in (status.COMPLETED, status.STOPPED) and result.get("cost"):
        print_summary(result)


def resolved_or_raw(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # a broken interpolation is itself the reason the job failed
        return OmegaConf.to_container(cfg, resolve=False)


def dirname_label(override_dirname: str, limit: int = 120) -> str:
    """A sweep job's dir label: its overrides, one path component (no "/"), shortened
    with a hash past ``limit`` characters (file names stop at 255)."""
    override_dirname = override_dirname.replace("/", "_")
    if len(override_dirname) <= limit:
        return override_dirname or "default"
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return f"{override_dirname[:limit].rsplit(',', 1)[0]},...{digest}"


OmegaConf.register_new_resolver("moebench_label", dirname_label, replace=True)
OmegaConf.register_new_resolver("moebench_now", distributed.run_stamp, replace=True)  # one stamp for all ranks


def conf_dir() -> str:
    """conf/ ships inside the installed package as moebench/conf; in a source
    checkout (editable install) it is the repository's top-level conf/."""
    installed = Path(__file__).resolve().parent / "conf"
    return str(installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> list[float] | None:
    result = run_job(cfg)
    hc = HydraConfig.get()
    if search.in_study(hc):  # the values the study records; a run that did not complete: a failed trial
        return search.objective_values(result, list(cfg.search.objectives), hc.runtime.output_dir)
    return None


def main(args: list[str]) -> int:
    """Run the Hydra app with ``args`` as its command line; returns the exit code (status.py)."""
    global COMMAND
    status.clear()
    status.start_launch()  # this command's id: its jobs write it into their lock files
    STARTUP_STOP.signum = None
    extra = distributed.setup()  # under torchrun: join the ranks first
    ranks = distributed.current()
    code = status.EXIT_OK
    try:
        try:
            search.prepare_preset(args)  # hydra/sweeper=optuna: moebench's preset (conf/hydra/sweeper/optuna.yaml)
            COMMAND = preflight.prepare(args, conf_dir(), validate, check_fits)
            if ranks.is_main:
                for warning in COMMAND.warnings:
                    print(f"moebench: warning: {warning}", file=sys.stderr, flush=True)
            if COMMAND.run_dir is not None and ranks.is_main:
                checkpoint.lock_run_dir(COMMAND.run_dir)
        except UserError as err:  # nothing was written
            if ranks.is_main:
                print(f"moebench: error: {err}", file=sys.stderr, flush=True)
            code = status.EXIT_BAD_INPUT
            return code
        sys.argv = ["moebench train", *COMMAND.args, *extra]
        try:
            with STARTUP_STOP:
                _hydra_main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            return code
        code = status.command_exit_code(COMMAND.multirun)
        if STARTUP_STOP.signum:  # e.g. Ctrl-C while launcher workers ran the jobs: they stopped, so did we
            code = status.exit_code(status.PREEMPTED, STARTUP_STOP.signum)
        return code
    finally:
        distributed.teardown(ok=code == status.EXIT_OK)
        if code != status.EXIT_OK and ranks.enabled:
            distributed.abandon(code)  # the other ranks may be anywhere: no barrier, no waiting
        if code > 128:  # preempted, records written: the scheduler's grace period is not for interpreter teardown
            distributed.abandon(code)
