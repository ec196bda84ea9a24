"""`moebench pareto|inspect|probe|measure|bench`: help and refusals before torch is imported.

Importing torch took 9-50 s on a loaded machine; `--help` and a refusal of the command line
(a missing path, a value out of range, a misspelt option) waited for it. arguments.py holds the
commands' parsers and checks, torch-free; the command's module is imported only after them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import ENV, moebench

from moebench import arguments
from moebench.errors import UserError

HEAVY = ("torch", "torchvision", "wandb")  # what a refusal or a help text must not wait for


def refused_in_a_fresh_process(tmp_path: Path) -> list[tuple[list[str], str]]:
    """One refusal per command: (arguments, the one line it prints)."""
    run = tmp_path / "run"  # a run dir without a checkpoint
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "completed"}))
    return [
        (["pareto", str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such run or sweep directory"),
        (["inspect", str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such run directory"),
        (["probe", str(run)], f"{run}: no checkpoint last.pt; it holds no checkpoint (train.save_checkpoints=false?)"),
        (["measure", str(run), "--rounds", "0"], "argument --rounds: must be >= 1, got 0; see `moebench measure --help`"),
        (["bench", "--peers", str(tmp_path / "nope")], f"--peers {tmp_path / 'nope'} is not a directory"),
    ]


@pytest.mark.parametrize("command", list(arguments.COMMANDS))
def test_each_command_refuses_in_one_line_before_torch_is_imported(tmp_path, command):
    # as a user meets it: a real `moebench` process, its exit code, its stderr; Python lists on
    # stderr every module it imports (PYTHONPROFILEIMPORTTIME)
    [(args, line)] = [case for case in refused_in_a_fresh_process(tmp_path) if case[0][0] == command]
    before = sorted(tmp_path.rglob("*"))
    proc = moebench(*args, cwd=tmp_path, env={**ENV, "PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 2
    timed = [row for row in proc.stderr.splitlines() if row.startswith("import time:")]
    imported = {row.rsplit("|", 1)[-1].strip() for row in timed}
    assert "moebench.arguments" in imported  # the listing is read right
    assert not {name.split(".")[0] for name in imported} & set(HEAVY), sorted(imported)
    assert [row for row in proc.stderr.splitlines() if row not in timed] == [f"moebench: error: {line}"]
    assert proc.stdout == "" and sorted(tmp_path.rglob("*")) == before  # nothing written


# Runs the command lines in one fresh interpreter; reports, after each, the exit code, what it
# printed and which heavy modules the process holds by then.
HARNESS = r"""
import contextlib, io, json, sys
from moebench import cli
cases, heavy = json.loads(sys.argv[1]), sys.argv[2:]
for argv in cases:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                      "heavy": [m for m in heavy if m in sys.modules]}), file=sys.__stdout__)
"""


def test_every_help_and_refusal_of_the_other_commands_comes_before_torch(tmp_path):
    nope = str(tmp_path / "nope")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)  # a run dir (of a job that has not finished), no checkpoint
    (tmp_path / "empty").mkdir()
    helps = [[command, "--help"] for command in arguments.COMMANDS]
    refused = [
        (["pareto"], "the following arguments are required: paths; see `moebench pareto --help`"),
        (["pareto", str(run), "--quality", "top5"], "argument --quality: 'top5': choose top1, top1_at_best_val, "
         "val_top1_best or probe.<data>.<k>shot; see `moebench pareto --help`"),
        (["pareto", str(tmp_path / "empty")], f"no runs (result.json or .hydra/) under {tmp_path / 'empty'}"),
        (["inspect", str(run), "--images", "17"], "argument --images: must be in 1..16, got 17; "
         "see `moebench inspect --help`"),
        (["inspect", str(run), "--checkpoint", "best.pt"], f"{run}: no checkpoint best.pt; it holds no checkpoint "
         "(train.save_checkpoints=false?)"),
        (["probe", nope], f"{nope}: no such run directory"),
        (["probe", str(run), "--max-test", "0"], "argument --max-test: must be >= 1, got 0; "
         "see `moebench probe --help`"),
        (["measure", nope], f"{nope}: no such run or sweep directory"),
        (["measure", str(run), "--device", "gpu"], "--device 'gpu': choose cpu or cuda[:N]"),
        (["measure", str(run), "--rouns", "2"], "unrecognized argument '--rouns' (did you mean --rounds?); "
         "see `moebench measure --help`"),
        (["bench", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1; see `moebench bench --help`"),
        (["bench", "--experts", "8", "0"], "argument --experts: must be >= 1, got 0; see `moebench bench --help`"),
    ]
    cases = helps + [args for args, _ in refused]
    proc = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(cases), *HEAVY], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(reports) == len(cases)
    for argv, report in zip(helps, reports):
        assert report["code"] == 0 and report["heavy"] == [], (argv, report)
        assert report["stdout"].startswith(f"usage: moebench {argv[0]} ") and report["stderr"] == "", (argv, report)
    for (argv, line), report in zip(refused, reports[len(helps):]):
        assert report["code"] == 2 and report["heavy"] == [], (argv, report)
        assert report["stderr"] == f"moebench: error: {line}\n" and report["stdout"] == "", (argv, report)


def test_the_checks_read_the_arguments_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")  # only its presence is checked before torch
    (run / "result.json").write_text("{}")
    (tmp_path / "file").write_text("")
    assert arguments.parse("probe", [str(run), "--shots", "5,1,5"]).shots == "5,1,5"  # parsed again by the probe
    assert arguments.parse_shots("5,1,5") == [1, 5]
    for argv, message in (
        (["probe", str(run), "--shots", "1,x"], "shots must be positive integers separated by commas"),
        (["probe", str(run), "--data", "imagenet"], "--data 'imagenet' is neither a dataset name (digits, cifar10, "
                                                     "cifar100, synthetic, own) nor a directory"),
        (["measure", str(run), "--warmup-s", "nan"], "argument --warmup-s: must be >= 0, got nan"),
        (["pareto", str(run), "--out", str(tmp_path / "file")], "is a file; give a directory for pareto.*"),
        (["inspect", str(run), "--images", "two"], "argument --images: must be an integer in 1..16, got 'two'"),
    ):
        with pytest.raises(UserError) as caught:
            arguments.parse(argv[0], argv[1:])
        assert message in str(caught.value) and "\n" not in str(caught.value), (argv, caught.value)
    args = arguments.parse("measure", [str(run), "--device", "cuda:1", "--round", "2"])  # (argparse's abbreviation)
    assert (args.device, args.rounds) == ("cuda:1", 2)
    assert isinstance(arguments.parse("bench", []), Namespace)



def test_eval_probe_settings_of_train_are_refused_before_torch_and_before_the_run_dir(tmp_path):
    # They were checked in the app, after torch was imported and the run dir (result.json, train.log) written.
    cases = [[*args, "experiment=smoke", "eval.probe.datasets=[own]", f"hydra.run.dir={tmp_path / 'run'}"]
             for args in (["eval.probe.draws=0"], ["eval.probe.shots=[0]"], ["-m", "eval.probe.draws=1,0"])]
    harness = HARNESS.replace("cli.main(argv)", "cli.main(['train', *argv])")
    proc = subprocess.run([sys.executable, "-c", harness, json.dumps(cases), *HEAVY], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["code"], r["heavy"], r["stderr"]) for r in reports] == [
        (2, [], "moebench: error: eval.probe.draws must be an int >= 1, got 0\n"),
        (2, [], "moebench: error: eval.probe.shots must be positive integers separated by commas (e.g. 1,5,10,25), "
                "got [0]\n"),
        (2, [], "moebench: error: eval.probe.draws must be an int >= 1, got 0\n"),  # one job of a sweep: all refused
    ]
    assert list(tmp_path.iterdir()) == []
