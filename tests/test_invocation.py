"""Hints name a command the user's shell can run: `moebench` only when PATH finds the running script."""

from __future__ import annotations

import os
import subprocess
import sys

from moebench.invocation import command


def script(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_venv_script_is_named_by_its_path_when_path_does_not_find_it(tmp_path):
    venv_script = script(tmp_path / ".venv/bin/moebench")
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    # started as `.venv/bin/moebench` from the clone (after `make`, without activating the venv)
    assert command(".venv/bin/moebench", cwd=str(tmp_path), path=str(elsewhere)) == ".venv/bin/moebench"
    # the same from another directory: the whole path
    assert command(str(venv_script), cwd=str(elsewhere), path=str(elsewhere)) == str(venv_script)
    # `python -m moebench` (torchrun): the script beside the interpreter
    python = str(tmp_path / ".venv/bin/python")
    assert command("/x/moebench/__main__.py", executable=python, cwd=str(tmp_path), path=str(elsewhere)) == \
        ".venv/bin/moebench"


def test_bare_name_when_path_finds_the_same_script_and_python_m_when_there_is_no_script(tmp_path):
    venv_script = script(tmp_path / ".venv/bin/moebench")
    assert command(str(venv_script), cwd="/", path=str(venv_script.parent)) == "moebench"
    other = script(tmp_path / "other/bin/moebench")  # PATH finds another install: not ours
    assert command(str(venv_script), cwd="/", path=str(other.parent)) == str(venv_script)
    bare_python = str(tmp_path / "bare/bin/python3")
    assert command("/x/moebench/__main__.py", executable=bare_python, cwd="/", path="") == f"{bare_python} -m moebench"


def test_train_help_imports_no_torch():
    code = ("import sys; from moebench.cli import main; code = main(['train', 'router=soft', '--help']); "
            "assert code == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Keys of router=soft" in proc.stdout
