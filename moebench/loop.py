"""One run of `moebench train` from its config to its measured record: ``build`` -> ``fit`` -> ``measure``
around one ``RunState`` (what a checkpoint saves, what ``fit`` advances, what the records report).

Under torchrun every rank runs it; rank 0 alone writes records and checkpoints. The Hydra app
(train.py) calls ``train_and_measure``; nothing here knows about Hydra's jobs but ``parallel_jobs``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, cost, distributed, faults, status
from . import upcycle  # init_from: sparse upcycling from a dense run
from .build import build_model, load_cfg_data, make_optimizer, moe_blocks, router_of, router_options
from .checkpoint import check_resume_config, checkpoint_path
from .data import Loader
from .errors import CheckpointError, ConfigError, RecordError
from .moe import collect_aux_loss, collect_diagnostics, collect_metrics, track_routing
from .moe import discard_balancing_load, discard_gate_counts, update_balancing_bias, update_l1_coefficient
from .moe import count_parameters, expert_parallel_parameters, shard_experts
from .preemption import StopRequest
from .progress import TrainProgress, announce_run
from .run_records import record_so_far
from .tracking import RunRecorder, atomic_torch_save

log = logging.getLogger("moebench")


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
    started: float = field(default_factory=time.monotonic)  # this process's start (train.time_limit_min counts from it)
    time_before_s: float = 0.0  # training seconds of the processes this run resumed from, up to their checkpoint
    time_partial: bool = False  # some of those processes' time is unknown (a checkpoint older than 9963816)
    start_step: int = 0  # the step this process started training from (a resume's checkpoint step)
    last_checkpoint: float = field(default_factory=time.monotonic)

    def process_time_s(self) -> float:
        """This process's share of the training time; none if it trained no step (a finished run
        resumed is measured again, not trained again)."""
        return time.monotonic() - self.started if self.step > self.start_step else 0.0

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

    ckpt = resume_checkpoint(cfg, ranks) if cfg.resume else None
    if ckpt is not None:
        run_dir = state["run_dir"] = checkpoint_path(cfg.resume).parent
    if ranks.is_main:
        announce_run(run_dir, resumed=ckpt)
    data = load_cfg_data(cfg)
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
    train_loader, test_loader, val_loader = loaders(cfg, data, norm, ranks)
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
    run.train_model = model_as_trained(cfg, model, sharded_ids, device, ranks)
    return run


def resume_checkpoint(cfg: DictConfig, ranks: distributed.Ranks) -> dict:
    """The checkpoint ``cfg.resume`` names, checked against ``cfg`` (a damaged last.pt: the one before it)."""
    ckpt_file = checkpoint_path(cfg.resume)
    ckpt, used, damaged = checkpoint.load_with_fallback(ckpt_file)
    check_resume_config(ckpt["config"], cfg, used)
    if damaged and ranks.is_main:  # last.pt damaged: continue from the one before it (one line says so)
        checkpoint.announce_fallback(damaged, used, ckpt)
        checkpoint.reinstate_previous(ckpt_file)
    return ckpt


def loaders(cfg: DictConfig, data, norm: dict, ranks: distributed.Ranks) -> tuple[Loader, Loader, Loader | None]:
    """Train, test and validation loaders of this rank (validation: None without a split)."""
    d = cfg.data
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
    return train_loader, test_loader, val_loader


def model_as_trained(cfg: DictConfig, model: torch.nn.Module, sharded_ids: set, device: torch.device,
                     ranks: distributed.Ranks) -> torch.nn.Module:
    """``model`` as the steps call it: DDP-wrapped under torchrun, compiled with ``compile=true``."""
    trained = model
    if ranks.enabled:
        if sharded_ids:  # each rank owns different experts: DDP must neither broadcast nor average them
            # (DDP's own way to exclude parameters; a private helper, so pinned by the torchrun tests)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [name for name, p in model.named_parameters() if id(p) in sharded_ids])
        unused = router_of(cfg).unused_parameters(router_options(cfg))  # e.g. Soft MoE's phi in Table 2 arms
        trained = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused,
        )
    if cfg.compile:
        trained = torch.compile(trained)
    return trained


def restore(run: RunState, ckpt: dict) -> None:
    """Continue where the checkpoint stopped: weights, optimizer, position, RNG streams."""
    try:
        run.model.load_state_dict(ckpt["model"])  # full expert tensors: any world size, sharded or not
        run.optimizer.load_state_dict(
            distributed.optimizer_state_local(ckpt["optimizer"], run.optimizer, run.sharded, run.ranks))
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {run.cfg.resume} does not fit this model: {str(err).splitlines()[0]}") from None
    run.epoch, run.batch, run.step = ckpt["epoch"], ckpt.get("batch", 0), ckpt["step"]
    run.start_step = run.step
    run.best = ckpt.get("best", run.best)
    run.last_eval = ckpt.get("last_eval", {})
    run.skipped_steps = ckpt.get("skipped_steps", 0)
    run.time_before_s = ckpt.get("train_time_s", 0.0)
    run.time_partial = "train_time_s" not in ckpt or bool(ckpt.get("train_time_s_partial"))
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
    with TrainProgress(cfg.train.epochs, steps_per_epoch, run.epoch, enabled=run.ranks.is_main,
                       start_batch=run.batch) as progress:
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
                    discard_balancing_load(run.model)  # a skipped step moves no balancing bias either
                    discard_gate_counts(run.model)  # nor ReMoE's L1 coefficient
                    log.warning("step %d: non-finite loss or gradient: skipped (%d of train.skip_nonfinite_steps=%d)",
                                run.step + 1, run.skipped_steps, cfg.train.skip_nonfinite_steps)
                else:
                    run.optimizer.step()
                    update_balancing_bias(run.model)  # aux-loss-free routers: the step's load, summed over ranks
                    update_l1_coefficient(run.model)  # ReMoE: the step's sparsity, summed over ranks
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
        "init_from": run.init_from, "train_time_s": run.time_before_s + run.process_time_s(),
        "train_time_s_partial": run.time_partial,
    })
    run.last_checkpoint = time.monotonic()


def measure(run: RunState) -> dict:
    """The trained model's cost, and the final record."""
    if not run.last_eval:  # resumed a run that had already finished: measure it as it is
        run.last_eval = evaluate(run.model, run.test_loader, run.device, run.autocast, run.ranks)
    images = run.step * run.cfg.data.batch_size  # training compute: what --include-init-cost adds an init run's to
    measured = measure_cost(run.cfg, run.model, run.data, run.norm, run.params, run.throughput, run.device, run.ranks,
                            train_images=images)
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


def measure_cost(cfg, model, data, norm, params, throughput, device, ranks: distributed.Ranks,
                 train_images: int = 0) -> dict | None:
    """Cost of the trained model as one process serves it (rank 0 measures, the others wait), and of its
    training on ``train_images`` images."""
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
        module_flops = cost.flops_by_module(model, example)
        measured = {
            "params_total": params["total"],
            "params_active": params["active"],
            "gflops_per_image": module_flops[""] / 1e9,
            "train_images": train_images,
            "train_gflops_total": cost.train_gflops_total(module_flops[""] / 1e9, train_images, model, module_flops),
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
