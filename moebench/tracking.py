"""Run records: ``metrics.jsonl`` and ``result.json`` on disk, mirrored to W&B.

The files are written whatever the W&B mode, so sweeps can be aggregated,
resumed and audited without W&B. Writes that replace a file are atomic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import faults


def _atomic_write(path: Path, write, keep_previous: Path | None = None) -> None:
    """Write through a temp file in the same dir, then rename: readers never see half a file.
    ``keep_previous``: the file being replaced stays there (a hard link, itself renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; records follow the user's umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            faults.hit(f"write:{path.name}")  # the tests' kill -9 in the middle of a write
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            replace_with_copy(path, Path(keep_previous))
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a crash too
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk or a removed dir: the write's own error matters
            os.unlink(tmp)
        raise


def replace_with_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` in one rename (a hard link where the file system has them)."""
    tmp = Path(dst).with_name(f".{Path(dst).name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: Path, keep_previous: Path | None = None) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f), keep_previous)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _scalar(value):
    value = value.item() if isinstance(value, torch.Tensor) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl; a damaged line (cut short, overwritten) is skipped with one warning."""
    lines, damaged = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        line = line.strip().strip("\0")  # NUL bytes: a hole another writer left in the file
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            lines.append(record)
        else:
            damaged.append(number)
    if damaged:
        shown = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
        print(f"moebench: warning: {path}: skipped {len(damaged)} damaged line(s) ({shown})", file=sys.stderr)
    return lines


class RunRecorder:
    """Appends metric lines, writes the result, and mirrors both to a W&B run.

    ``wandb_cfg``: ``mode`` (offline, online, disabled), ``project``, ``entity``,
    ``group``, ``name``, ``tags``, ``job_type``, ``id`` (resume that W&B run);
    None means no W&B. ``resume_step``: a resumed run drops the metric lines
    logged after its checkpoint's step, so the file has each step once; a run
    that starts afresh (None) drops every line an earlier, killed attempt in the
    same run dir left before its first checkpoint.
    """

    def __init__(self, run_dir: Path, config: dict, *, wandb_cfg: dict | None = None, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.metrics_path.exists():
            kept = [line for line in read_metrics(self.metrics_path) if line.get("step", 0) <= resume_step]
            data = "".join(json.dumps(line) + "\n" for line in kept).encode()
            _atomic_write(self.metrics_path, lambda f: f.write(data))
        # Only ever appended to (O_APPEND: every line lands at the end, whatever else opened the file);
        # a fresh start truncates it first (the run dir's lock holder only: train.run_job).
        self._file = open(self.metrics_path, "a")
        if resume_step is None:
            self._file.truncate(0)
        self.wandb_run = None
        if wandb_cfg and wandb_cfg.get("mode", "disabled") != "disabled":
            self.wandb_run = self._init_wandb(config, wandb_cfg)

    def _init_wandb(self, config: dict, cfg: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        return wandb.init(
            project=cfg.get("project"), entity=cfg.get("entity"), group=cfg.get("group"), name=cfg.get("name"),
            tags=list(cfg.get("tags") or []), job_type=cfg.get("job_type", "train"), config=config,
            dir=str(self.run_dir), mode=cfg["mode"], id=cfg.get("id"), resume="allow" if cfg.get("id") else None,
            reinit="finish_previous",  # one W&B run per Hydra job, also under -m
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True),
        )

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        clean = {key: _scalar(value) for key, value in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.run_dir / "result.json", result)
        if self.wandb_run is not None:
            summary = {"status": result.get("status")}
            for section in ("cost", "quality"):
                for key, value in (result.get(section) or {}).items():
                    summary[f"{section}/{key}"] = _scalar(value)
            self.wandb_run.summary.update(summary)

    def finish(self, exit_code: int = 0) -> None:
        if not self._file.closed:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


# ----------------------------------------------------------------------------- W&B names

CLOCK_STAMP = re.compile(r"\d{2}-\d{2}-\d{2}")  # the last part of the default sweep dir: HH-MM-SS
NAME_NOISE = ("wandb.", "hydra.", "hydra/")  # overrides that say how a run is logged or launched, not what runs


def sweep_group(sweep_dir: str | Path) -> str:
    """W&B group of a sweep: its dir name, with the date in front when that name is only a
    clock time (multirun/2026-11-25/15-20-32 -> 2026-11-25_15-20-32): sweeps started at the
    same time on different days must not share a group."""
    path = Path(sweep_dir)
    if CLOCK_STAMP.fullmatch(path.name) and path.parent.name:
        return f"{path.parent.name}_{path.name}"
    return path.name


def run_name(overrides: list[str], exclude_keys=()) -> str:
    """W&B run name: the user's overrides as given, without W&B and Hydra settings and without
    the keys left out of run dir names (paths such as data.root)."""
    excluded = set(exclude_keys)
    kept = [override for override in overrides
            if not (key := override.lstrip("+~").split("=", 1)[0]).startswith(NAME_NOISE) and key not in excluded]
    return ",".join(kept) or "default"


def runs_wandb_mode(configs: list[dict]) -> str:
    """The W&B mode that matches runs' own: disabled when none logged to W&B (aggregating
    them must not create a W&B run), online when all were online, else offline."""
    modes = {(config.get("wandb") or {}).get("mode") or "disabled" for config in configs}
    if modes <= {"disabled"}:
        return "disabled"
    return "online" if modes == {"online"} else "offline"
