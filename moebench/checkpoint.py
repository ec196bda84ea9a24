"""Checkpoints of a run and what may change when it is resumed; the run dir's lock.

``last.pt`` holds everything resuming needs: model, optimizer, RNG states, the
position in the data order (``epoch`` epochs done plus ``batch`` batches of the
next one), and the config. It is written atomically (tracking.py), so a kill at
any moment leaves the previous checkpoint loadable. It carries a sha256 of its
contents (``checksum``), verified on every load; the checkpoint it replaced is kept
as ``last.pt.prev`` and used, with one line saying so, when ``last.pt`` is damaged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import schema, status
from .errors import CheckpointError, UserError
from .tracking import replace_with_copy

LOCK_NAME = ".moebench.lock"  # holds "PID\nLAUNCH\n" of the process that last held it
LOCK_ATTEMPTS = 10
CHECKSUM = "checksum"  # the key of a checkpoint's sha256 (digest)
PREVIOUS_SUFFIX = ".prev"  # last.pt.prev: the checkpoint the newest last.pt replaced

# Settings that may differ between a checkpoint and the run that resumes it: its length and
# bookkeeping (schema.ROLES, the table `moebench pareto`'s arm grouping uses too). Every other
# key must be equal.
RESUME_MAY_DIFFER = schema.keys_with(schema.LENGTH, schema.BOOKKEEPING)


def checkpoint_path(resume: str) -> Path:
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"resume={resume}: no checkpoint at {path} (give a run dir holding last.pt, or a .pt file)")
    return path


# ----------------------------------------------------------------------------- checksums

def digest(state: dict) -> str:
    """sha256 of a checkpoint's contents (every tensor's dtype, shape and bytes, every other value's
    repr, in key order), ``checksum`` itself left out. Computed on what was saved and on what
    was loaded, so it does not depend on how torch lays out the file."""
    h = hashlib.sha256()
    _feed(h, {key: value for key, value in state.items() if key != CHECKSUM})
    return h.hexdigest()


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):  # a tuple may come back as a list: same bytes
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def with_checksum(state: dict) -> dict:
    return {**state, CHECKSUM: digest(state)}


def verify(ckpt: dict, path: Path) -> None:
    """Raise CheckpointError when a checkpoint's contents differ from what was saved. Checkpoints
    written before checksums existed have none: they load as they always did."""
    saved = ckpt.get(CHECKSUM)
    if saved is not None and saved != digest(ckpt):
        raise CheckpointError(f"checkpoint {path} fails its checksum (its contents changed after it was written)")


def previous_path(path: Path) -> Path:
    """Where the checkpoint a new ``last.pt`` replaced is kept: ``last.pt.prev``."""
    return Path(path).with_name(Path(path).name + PREVIOUS_SUFFIX)


# ----------------------------------------------------------------------------- loading

def read_verified(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unpickling refused...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0]}; "
                              "remove it to start the run afresh") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch", "config"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a moebench checkpoint (missing model/optimizer/epoch/config)")
    verify(ckpt, path)
    return ckpt


def load_with_fallback(path: Path) -> tuple[dict, Path, str | None]:
    """(checkpoint, the file it came from, why ``path`` was not used). When ``path`` cannot be read or
    fails its checksum, the previous checkpoint (``last.pt.prev``) is used if it passes; else the
    error about ``path`` stands."""
    path = Path(path)
    try:
        return read_verified(path), path, None
    except CheckpointError as err:
        previous = previous_path(path)
        if not previous.is_file():
            raise
        try:
            return read_verified(previous), previous, str(err).split("; remove it")[0]
        except CheckpointError:
            raise err from None


def load_checkpoint(path: Path, quiet: bool = False) -> dict:
    """A verified checkpoint; the previous one, with one line saying so, if ``path`` is damaged."""
    ckpt, used, why = load_with_fallback(path)
    if why and not quiet:
        announce_fallback(why, used, ckpt)
    return ckpt


def announce_fallback(why: str, used: Path, ckpt: dict) -> None:
    print(f"moebench: warning: {why}; using the previous checkpoint {used} (step {ckpt.get('step')}) instead",
          file=sys.stderr, flush=True)


def reinstate_previous(path: Path) -> None:
    """Make the previous checkpoint ``path`` again (run dir's lock holder only), keeping the damaged
    file as ``last.pt.damaged``; ``path`` exists at every moment, so a kill here loses nothing."""
    path = Path(path)
    with contextlib.suppress(OSError):
        replace_with_copy(path, path.with_name(path.name + ".damaged"))
    replace_with_copy(previous_path(path), path)


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
    return schema.role(key) in (schema.LENGTH, schema.BOOKKEEPING)


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
    for attempt in range(LOCK_ATTEMPTS):  # a reader's probe (lock_state) holds it for microseconds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if attempt + 1 == LOCK_ATTEMPTS:
                os.close(fd)
                holder = _lock_holder(run_dir)
                raise UserError(f"run dir {run_dir} is in use by another run{holder}; wait for it to end "
                                "or choose another hydra.run.dir") from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n{status.this_launch() or ''}\n".encode())  # who runs it, for which launch
    _held[key] = fd


def lock_state(run_dir: Path) -> tuple[bool, str | None]:
    """(a process holds the run dir now, the launch that last held it: status.this_launch)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            held = False
        except OSError as err:
            held = err.errno in (errno.EAGAIN, errno.EACCES)
        lines = os.read(fd, 4096).decode(errors="replace").split("\n")
    finally:
        os.close(fd)
    return held, (lines[1].strip() or None) if len(lines) > 1 else None


def _lock_holder(run_dir: Path) -> str:
    try:
        pid = (run_dir / LOCK_NAME).read_text().split("\n")[0].strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid else ""


def unlock_run_dir(run_dir: Path) -> None:
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)
