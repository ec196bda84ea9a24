"""A run's record, whatever happened: ``result.json`` from what the run had measured so far, and
the W&B run closed (``leave_record``, called by the app once per job).
"""

from __future__ import annotations

import logging
import sys

import torch
from omegaconf import DictConfig, OmegaConf

from . import status
from .build import optimizer_record
from .progress import print_summary
from .tracking import RunRecorder

log = logging.getLogger("moebench")


def record_so_far(run) -> dict:
    """The record of ``run`` (a loop.RunState) with what it has measured up to now (any status)."""
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
    this_process = run.process_time_s()
    record = {
        "config": run.config,
        "cost": {"params_total": run.params["total"], "params_active": run.params["active"],
                 "train_images_per_s": run.throughput.images_per_s},
        "quality": quality,
        "status": run.outcome,
        "epochs_completed": run.epoch,
        "position": {"epoch": run.epoch, "batch": run.batch, "step": run.step},
        # the training behind this result, summed over the processes it resumed from (work a kill lost after the
        # last checkpoint is not counted: it was done again), and this process's share
        "train_time_s": run.time_before_s + this_process,
        "train_time_s_this_process": this_process,
        "device": str(run.device),
        "processes": run.ranks.world_size,
        "threads": torch.get_num_threads(),
        "expert_parallel": bool(run.sharded),
        "optimizer": optimizer_record(run.optimizer),
        "run_dir": str(run.run_dir),
    }
    if run.time_partial:  # resumed from a checkpoint written before checkpoints carried the time
        record["train_time_s_partial"] = True
    if run.skipped_steps:
        record["skipped_nonfinite_steps"] = run.skipped_steps
    if run.signum:
        record["signal"] = status.signal_name(run.signum)
    if run.diverged:
        record["diverged"] = run.diverged
    if run.init_from:
        record["init_from"] = run.init_from
    return record


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
