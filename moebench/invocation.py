"""The name of the `moebench` command as this user can type it, for the hints moebench prints.

After `make` the command is `.venv/bin/moebench`: a bare `moebench` works only with the venv
activated (or installed on PATH some other way). A hint such as `resume with: moebench train ...`
that the user's shell cannot find is the first thing a newcomer trips on, so hints name the
command that started this process, shortened to `moebench` only when PATH leads to that same
script.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

_ARGV0: str | None = None  # sys.argv[0] when the CLI started (train.main replaces sys.argv for Hydra)


def remember(argv0: str) -> None:
    """Called by the CLI before anything rewrites ``sys.argv``."""
    global _ARGV0
    _ARGV0 = argv0


def command(argv0: str | None = None, executable: str | None = None, cwd: str | None = None,
            path: str | None = None) -> str:
    """`moebench` if PATH finds the running script, else the script's path (relative when under
    ``cwd``), else `PYTHON -m moebench`. The arguments default to this process's."""
    argv0 = argv0 if argv0 is not None else (_ARGV0 if _ARGV0 is not None else sys.argv[0])
    executable = executable or sys.executable
    cwd = cwd or os.getcwd()
    if Path(argv0).name == "moebench":  # the console script
        script = Path(cwd, argv0)
    else:  # python -m moebench (torchrun, the tests): the script installed beside this interpreter
        script = Path(executable).parent / "moebench"
        if not script.is_file():
            return f"{shlex.quote(executable)} -m moebench"
    found = shutil.which("moebench", path=path)
    try:
        if found and os.path.samefile(found, script):
            return "moebench"
    except OSError:
        pass
    absolute, here = Path(os.path.normpath(script)), Path(os.path.normpath(cwd))
    # relative inside the working dir (the clone's `.venv/bin/moebench`), whole anywhere else
    shown = str(absolute.relative_to(here)) if here != Path(here.anchor) and absolute.is_relative_to(here) \
        else str(absolute)
    return shlex.quote(shown)
