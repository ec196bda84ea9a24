"""Checkpoints of a run and what may change when it is resumed; the run dir's lock.

``last.pt`` holds everything resuming needs: model, optimizer, RNG states, the
position in the data order (``epoch`` epochs done plus ``batch`` batches of the
next one), and the config. It is written atomically (tracking.py), so a kill at
any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import CheckpointError, UserError

LOCK_NAME = ".moebench.lock"

# Settings that may differ between a checkpoint and the run that resumes it: they
# change how long a run goes, where it logs and on what hardware, never the numbers
# it trains to. Every other key must be equal.
RESUME_MAY_DIFFER = (
    "train.epochs", "train.time_limit_min", "train.checkpoint_every_min", "train.checkpoint_every_steps",
    "train.log_every", "train.save_checkpoints", "train.save_best", "train.preempt_signals",
    "wandb.", "device", "threads", "resume", "expert_parallel", "data.root", "data.download",
    "data.eval_batch_size", "search.",
)
# The command-line shortcuts count through the router keys they feed (a dense run ignores them).
SHORTCUTS = ("experts", "slots", "k", "capacity_factor")


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
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0]}; "
                              "remove it to start the run afresh") from None
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


def may_differ(key: str) -> bool:
    return key in SHORTCUTS or any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUME_MAY_DIFFER)


def check_resume_config(saved: dict, cfg: DictConfig | dict, path: Path) -> None:
    """A resumed run must be the same experiment: every key that changes the result must agree."""
    new = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    old, new = flatten(saved), flatten(new)
    for key in sorted(old.keys() | new.keys()):
        if not may_differ(key) and old.get(key) != new.get(key):
            raise CheckpointError(
                f"{path} does not match this run: {key} was {old.get(key)}, now {new.get(key)}; "
                f"resume with the original run's overrides (only {', '.join(k.rstrip('.') for k in RESUME_MAY_DIFFER)} "
                "may differ)"
            )


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of atomic writes cut short by a kill (the files they were replacing are intact)."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


# ----------------------------------------------------------------------------- one run per run dir

_held: dict[str, int] = {}  # run dir -> fd of its lock file, held by this process


def lock_run_dir(run_dir: Path) -> None:
    """Hold the run dir for this process until it exits (the OS drops the lock even on kill -9).
    A second run into the same dir refuses instead of interleaving checkpoints and records."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"cannot use run dir {run_dir}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES):
            holder = _lock_holder(run_dir)
            raise UserError(f"run dir {run_dir} is in use by another run{holder}; wait for it to end "
                            "or choose another hydra.run.dir") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def _lock_holder(run_dir: Path) -> str:
    try:
        pid = (run_dir / LOCK_NAME).read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid else ""


def unlock_run_dir(run_dir: Path) -> None:
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)
