"""`moebench train`: the Hydra app that builds, trains, evaluates and measures one model.

The only module that turns a config into objects. One call of ``run_job``
is one run: it leaves ``result.json``, ``metrics.jsonl``, checkpoints and a
W&B run in its run dir, whatever happens (status completed, failed or
interrupted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from . import cost, distributed
from .data import DataError, Loader, load_data
from .errors import CheckpointError, ConfigError, UserError
from .moe import DenseMLP, ExpertsChoiceMoE, MoELayer, SoftMoE, TokensChoiceMoE, collect_aux_loss, collect_metrics
from .moe import count_parameters, expert_parallel_parameters, shard_experts
from .moe.decay import weight_decay_split
from .progress import TrainProgress, announce_run, print_summary
from .tracking import RunRecorder, atomic_torch_save, run_name, sweep_group
from .vit import ViT, moe_block_indices
from . import probe  # eval.probe: few-shot probes after training

log = logging.getLogger("moebench")

ROUTERS = {"soft": SoftMoE, "tokens_choice": TokensChoiceMoE, "experts_choice": ExpertsChoiceMoE, "dense": DenseMLP}
# Config keys that must agree between a checkpoint and the run that resumes it.
RESUME_KEYS = ("model", "router", "data", "seed", "train.epochs", "train.lr", "train.schedule", "train.warmup_epochs")

FAILED_JOBS: list[str] = []  # run dirs of jobs that failed in this process (the CLI's exit code)


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
    if cfg.data.image_size % m.patch_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not divisible by model.patch_size={m.patch_size}"
        )
    if m.dim % m.heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.heads={m.heads}")
    if m.pool not in ("gap", "cls"):
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


def moe_blocks(cfg: DictConfig) -> list[int]:
    if cfg.router.name == "dense":
        return []
    moe = cfg.model.moe
    layers = list(moe.layers) if moe.layers is not None else None
    return moe_block_indices(cfg.model.depth, moe.placement, moe.n, layers)


def build_model(cfg: DictConfig, in_chans: int, num_classes: int) -> ViT:
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


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_path(resume: str) -> Path:
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"resume={resume}: no checkpoint at {path} (give a run dir holding last.pt, or a .pt file)")
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unpickling refused...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch", "config"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a moebench checkpoint (missing model/optimizer/epoch/config)")
    return ckpt


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(saved: dict, cfg: DictConfig, path: Path) -> None:
    """A resumed run must be the same experiment: compare the keys that define it."""
    old, new = flatten(saved), flatten(OmegaConf.to_container(cfg, resolve=True))
    for key in sorted(old.keys() | new.keys()):
        if key.startswith(RESUME_KEYS) and old.get(key) != new.get(key):
            raise CheckpointError(
                f"checkpoint {path} does not match this run: {key} was {old.get(key)}, now {new.get(key)}; "
                "resume with the original run's overrides"
            )


# ----------------------------------------------------------------------------- the run

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


def train_and_measure(cfg: DictConfig, run_dir: Path, recorder_cfg: dict, state: dict) -> dict:
    """Everything of one run after validation; fills ``state`` as it goes (for failure records).

    Under torchrun every rank runs this; rank 0 alone writes records and checkpoints.
    """
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
        ckpt = load_checkpoint(ckpt_file)
        check_resume_config(ckpt["config"], cfg, ckpt_file)
        run_dir = ckpt_file.parent
        state["run_dir"] = run_dir
    if ranks.is_main:
        announce_run(run_dir, resumed_epoch=ckpt["epoch"] if ckpt is not None else None)

    d = cfg.data
    data = load_data(
        d.name, root=d.root, image_size=d.image_size, download=d.download,
        num_train=d.num_train, num_test=d.num_test, seed=cfg.seed, val_fraction=d.val_fraction,
    )
    model = build_model(cfg, data.in_chans, data.num_classes).to(device)  # the same full model on every rank
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
        augment=OmegaConf.to_container(d.augment), seed=cfg.seed, **norm, **shard,
    )
    test_loader = Loader(data.test_images, data.test_labels, d.eval_batch_size, shuffle=False, drop_last=False,
                         **norm, **shard)
    val_loader = None
    if data.val_labels is not None:
        val_loader = Loader(data.val_images, data.val_labels, d.eval_batch_size, shuffle=False, drop_last=False,
                            **norm, **shard)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size={d.batch_size} exceeds the {len(data.train_labels)} training images")
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.train.warmup_epochs * steps_per_epoch)

    start_epoch, step, wandb_id = 0, 0, None
    # Model selection on the validation split: its best top-1, the epoch and that epoch's test scores.
    best = {"val_top1": -1.0, "epoch": None, "test": {}}
    throughput = cost.Throughput(skip=cfg.cost.skip_train_steps)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])  # full expert tensors: any world size, sharded or not
            optimizer.load_state_dict(distributed.optimizer_state_local(ckpt["optimizer"], optimizer, sharded, ranks))
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {cfg.resume} does not fit this model: {str(err).splitlines()[0]}") from None
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        best = ckpt.get("best", best)
        wandb_id = ckpt.get("wandb_id")
        throughput.load_state_dict(ckpt.get("throughput", {}))
        rank_states = ckpt["rng"].get("torch_ranks", [])
        same_world = len(rank_states) == ranks.world_size
        torch.set_rng_state(rank_states[ranks.rank] if same_world else ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])

    layout = f"; {ranks.world_size} processes{', experts sharded' if sharded else ''}" if ranks.enabled else ""
    log.info("model: %s router, %d params (%d active per token), MoE blocks %s, %d tokens%s",
             cfg.router.name, params["total"], params["active"], moe_blocks(cfg), model.num_tokens, layout)
    config = OmegaConf.to_container(cfg, resolve=True)
    recorder = None
    if ranks.is_main:
        recorder = RunRecorder(run_dir, config, wandb_cfg={**recorder_cfg, "id": wandb_id},
                               resume_step=step if ckpt is not None else None)
        state["recorder"] = recorder
    train_model = model
    if ranks.enabled:
        if sharded:  # each rank owns different experts: DDP must neither broadcast nor average them
            # (DDP's own way to exclude parameters; a private helper, so pinned by the torchrun tests)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [name for name, p in model.named_parameters() if id(p) in sharded_ids])
        r = cfg.router
        no_slot_logits = r.name == "soft" and "soft" not in (r.dispatch, r.combine)  # phi unused (Table 2 arms)
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=no_slot_logits,
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    started = time.monotonic()
    last_eval: dict[str, float] = {}
    epochs_done, stopped_early = start_epoch, False
    model.train()
    with TrainProgress(cfg.train.epochs, steps_per_epoch, start_epoch, enabled=ranks.is_main) as progress:
        for epoch in range(start_epoch, cfg.train.epochs):
            train_loader.set_epoch(epoch)
            for images, labels in train_loader:
                factor = lr_factor(step, warmup_steps, total_steps, cfg.train.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.train.lr * factor * group["lr_mult"]
                throughput.start()
                with autocast():
                    logits = train_model(images)
                    task_loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.train.label_smoothing)
                    aux_loss = collect_aux_loss(model).to(task_loss.device)
                loss = task_loss + aux_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for p in sharded:  # their gradient sums all ranks' losses; DDP averages the others
                    if p.grad is not None:
                        p.grad.div_(ranks.world_size)
                if cfg.train.grad_clip and sharded:
                    distributed.clip_grad_norm(replicated, sharded, cfg.train.grad_clip, ranks)
                elif cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                throughput.stop(labels.numel() * ranks.world_size)
                step += 1
                if step % cfg.train.log_every == 0 or step == total_steps:
                    metrics = distributed.mean_over_ranks({
                        "train/loss": task_loss.item(), "train/aux_loss": aux_loss.item(),
                        **{f"routing/{key}": value for key, value in collect_metrics(model).items()},
                    }, ranks, device)
                    metrics.update({"epoch": epoch + 1, "train/lr": cfg.train.lr * factor,
                                    "train/images_per_s": throughput.images_per_s})
                    if recorder:
                        recorder.log(metrics, step=step)
                progress.advance(loss=task_loss.item(), lr=cfg.train.lr * factor,
                                 images_per_s=throughput.images_per_s)

            last_eval = evaluate(model, test_loader, device, autocast, ranks)
            val_eval = evaluate(model, val_loader, device, autocast, ranks) if val_loader else {}
            is_best = bool(val_eval) and val_eval["top1"] > best["val_top1"]
            if is_best:
                best = {"val_top1": val_eval["top1"], "epoch": epoch + 1, "test": dict(last_eval)}
            if recorder:
                recorder.log({"epoch": epoch + 1, **{f"test/{k}": v for k, v in last_eval.items()},
                              **{f"val/{k}": v for k, v in val_eval.items()}}, step=step)
            epochs_done = epoch + 1
            timing = progress.end_epoch(epochs_done, last_eval["top1"])
            log.info("epoch %d/%d: test top1 %.2f%%, loss %.4f, %s", epoch + 1, cfg.train.epochs,
                     100 * last_eval["top1"], last_eval["loss"], timing)
            if cfg.train.save_checkpoints:
                save_checkpoint(run_dir, is_best and cfg.train.save_best, ranks, {
                    "model": model.state_dict(),  # collectives under expert parallelism: every rank calls them
                    "optimizer": distributed.optimizer_state_full(optimizer, sharded, ranks),
                    "rng": rng_state(device, ranks),
                    "epoch": epoch + 1, "step": step, "best": best, "config": config,
                    "wandb_id": recorder.wandb_run_id if recorder else None, "throughput": throughput.state_dict(),
                })
            limit = cfg.train.time_limit_min
            out_of_time = limit is not None and time.monotonic() - started >= 60 * limit
            if epoch + 1 < cfg.train.epochs and distributed.agree(out_of_time, ranks, device):
                log.warning("train.time_limit_min=%s reached after epoch %d: stopping; resume=%s continues",
                            limit, epoch + 1, run_dir)
                stopped_early = True
                break

    if not last_eval:  # resumed a run that had already finished: measure it as it is
        last_eval = evaluate(model, test_loader, device, autocast, ranks)
    measured = measure_cost(cfg, model, data, norm, params, throughput, device, ranks)
    quality = {
        "top1": last_eval.get("top1"),  # the final model on the test split
        "loss": last_eval.get("loss"),
        "top1_at_best_val": best["test"].get("top1"),  # the model of the best validation epoch, on test
        "val_top1_best": best["val_top1"] if best["epoch"] else None,
        "best_val_epoch": best["epoch"],
    }
    if "top5" in last_eval:
        quality["top5"] = last_eval["top5"]
    return {
        "config": config,
        "cost": measured,
        "quality": quality,
        "status": "interrupted" if stopped_early else "completed",
        "epochs_completed": epochs_done,
        "train_time_s": time.monotonic() - started,
        "device": str(device),
        "processes": ranks.world_size,
        "threads": torch.get_num_threads(),
        "expert_parallel": bool(sharded),
        "optimizer": optimizer_record(optimizer),
        "run_dir": str(run_dir),
    }


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
    if ranks.is_main:
        atomic_torch_save(ckpt_state, run_dir / "last.pt")
        if is_best:
            atomic_torch_save(ckpt_state, run_dir / "best.pt")


def measure_cost(cfg, model, data, norm, params, throughput, device, ranks: distributed.Ranks) -> dict | None:
    """Cost of the trained model as one process serves it (rank 0 measures, the others wait)."""
    if expert_parallel_parameters(model):  # measure the unsharded model: same weights, no collectives
        state = model.state_dict()  # a collective: every rank gathers
        if ranks.is_main:
            model = build_model(cfg, data.in_chans, data.num_classes).to(device)
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
    run is resumed from it.
    """
    if cfg.resume:
        return None
    result_file = run_dir / "result.json"
    if result_file.is_file():
        try:
            previous = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if previous.get("status") == "completed":
            check_resume_config(previous.get("config", {}), cfg, result_file)
            return previous
    if (run_dir / "last.pt").is_file():
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
    """One Hydra job. User errors end it with one line and status "failed";
    under -m the sweep goes on with the next job."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    state: dict = {"run_dir": run_dir}
    status, error, result, skipped = "failed", None, None, False
    try:
        validate(cfg)
        probe.check_config(cfg)
        previous = previous_result(cfg, run_dir)
        if previous is not None:  # its records are already on disk
            log.info("%s already holds this completed run: skipping it", run_dir)
            skipped = True
            return previous
        result = train_and_measure(cfg, run_dir, wandb_settings(cfg), state)
        probe.after_training(cfg, result, state["run_dir"])  # eval.probe: few-shot probes into the result
        status = result["status"]
        return result
    except (UserError, DataError) as err:
        error = str(err)
        if distributed.current().is_main:
            print(f"moebench: error: {error}", file=sys.stderr, flush=True)  # one plain line, never wrapped
        FAILED_JOBS.append(str(state["run_dir"]))
        if not multirun:
            raise SystemExit(2) from None
        return {"status": "failed", "error": error}
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except Exception as err:  # a bug: keep the traceback in the log, but let a sweep go on
        error = f"{type(err).__name__}: {err}"
        FAILED_JOBS.append(str(state["run_dir"]))
        if not multirun:
            raise
        log.exception("job failed: %s", error)
        return {"status": "failed", "error": error}
    finally:
        if not skipped and distributed.current().is_main:
            leave_record(cfg, state, result, status, error)


def leave_record(cfg: DictConfig, state: dict, result: dict | None, status: str, error: str | None) -> None:
    """Write result.json whatever happened (a failed or interrupted run too) and close the W&B run."""
    recorder = state.get("recorder")
    if result is None:
        result = {"config": resolved_or_raw(cfg), "status": status, "error": error}
        if recorder is None:
            recorder = RunRecorder(state["run_dir"], result["config"], wandb_cfg=None)
    recorder.write_result(result)
    recorder.finish(exit_code=0 if status == "completed" else 1)
    if status in ("completed", "interrupted") and result.get("cost"):
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
def _hydra_main(cfg: DictConfig) -> None:
    run_job(cfg)


def main(args: list[str]) -> int:
    """Run the Hydra app with ``args`` as its command line; returns the exit code."""
    FAILED_JOBS.clear()
    sys.argv = ["moebench train", *args, *distributed.setup()]  # under torchrun: join the ranks first
    try:
        _hydra_main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        distributed.teardown()
    return 1 if FAILED_JOBS else 0
