"""Run dirs on disk, torch-free: where a command's paths lead and which checkpoint file a run holds.

The commands that read finished runs (``pareto``, ``measure``, ``inspect``, ``probe``) check their
paths with these before torch is imported (arguments.py), and use them again when they load the runs,
so a missing path is the same line either way.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

RUN_MARKERS = ("result.json", ".hydra")  # every finished run has the first; every Hydra job leaves the second


def checkpoint_path(run_dir: str | Path, checkpoint: str = "last.pt") -> Path:
    """``run_dir/checkpoint``, or CheckpointError saying what is missing and what the dir holds."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    path = run_dir / checkpoint
    if not path.is_file():
        present = sorted(p.name for p in run_dir.glob("*.pt"))
        hint = f"it holds {', '.join(present)}" if present else "it holds no checkpoint (train.save_checkpoints=false?)"
        raise CheckpointError(f"{run_dir}: no checkpoint {checkpoint}; {hint}")
    return path


def check_paths(paths: list[str]) -> None:
    """CheckpointError unless every path exists and at least one run (result.json or .hydra/) lies under them."""
    for path in map(Path, paths):
        if not path.exists():
            raise CheckpointError(f"{path}: no such run or sweep directory")
    if not any(next(Path(path).rglob(marker), None) for path in paths for marker in RUN_MARKERS):
        raise CheckpointError(f"no runs (result.json or .hydra/) under {', '.join(map(str, paths))}")


def find_run_dirs(paths: list[str]) -> list[Path]:
    """Run dirs (holding result.json, or .hydra/ for a job that has not finished) under ``paths``,
    sorted; a missing path is a user error."""
    check_paths(paths)
    found = set()
    for path in map(Path, paths):
        for marker in RUN_MARKERS:
            found.update(hit.parent.resolve() for hit in path.rglob(marker))
    return sorted(found)
