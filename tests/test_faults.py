"""Fault injection: real signals and kill -9 at seeded random steps, a full disk, a corrupt
checkpoint, two runs into one dir, divergence. Each case runs `moebench train` in a subprocess
on smoke-sized configs (a few seconds per run)."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ENV, TINY, metric_lines, moebench, result

# 4 steps per epoch (76 training images after the validation split, batches of 16), 12 in all;
# Tokens Choice draws routing noise and the crop/flip augmentation draws from the loader's
# generator: resuming must restore both streams exactly.
RUN = ["experiment=smoke", "router=tokens_choice", "router.group_size=2", "train.epochs=3", "deterministic=true",
       "data.num_train=96", "data.augment.crop_padding=1", "data.augment.hflip=true", "train.checkpoint_every_min=null"]
TOTAL_STEPS = 12
SLOW = {**ENV, "MOEBENCH_FAULT": "slow:step:1"}  # 0.1 s per step: time to signal a chosen step


def start(run_dir: Path, *overrides: str, env: dict = SLOW, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moebench", "train", *RUN, *overrides, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def logged_steps(run_dir: Path) -> int:
    try:
        return sum('"train/loss"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def signal_at(proc: subprocess.Popen, run_dir: Path, step: int, sig: int, after: int = 0) -> tuple[int, str]:
    """Send ``sig`` once the run has logged ``step`` steps and more than ``after`` (where it
    resumed), or it ended; returns (exit code, stderr)."""
    deadline = time.monotonic() + 600
    step = max(step, after + 1)
    while proc.poll() is None and logged_steps(run_dir) < step and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def training_record(run_dir: Path) -> list[dict]:
    """The logged lines without wall-clock figures."""
    return [{k: v for k, v in line.items() if "images_per_s" not in k} for line in metric_lines(run_dir)]


def assert_same_run(a: Path, b: Path) -> None:
    wa = torch.load(a / "last.pt", weights_only=True)
    wb = torch.load(b / "last.pt", weights_only=True)
    assert wa["step"] == wb["step"] == TOTAL_STEPS
    for key, tensor in wa["model"].items():
        assert torch.equal(tensor, wb["model"][key]), key
    assert training_record(a) == training_record(b)  # every step's loss, routing metrics, evals; each once
    assert result(a)["quality"] == result(b)["quality"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = moebench("train", *RUN, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # three signals and resumes; the kill -9 test below is the default suite's
def test_signals_at_random_steps_then_resuming_equals_an_uninterrupted_run(tmp_path, straight):
    run_dir = tmp_path / "cut"
    rng = random.Random(1)
    targets = sorted(rng.sample(range(1, TOTAL_STEPS - 1), 3))
    preempted, positions = 0, []
    resume_cmd = None
    for target, sig in zip(targets, (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        if resume_cmd:  # the exact command the last preemption printed
            words = shlex.split(resume_cmd)  # `moebench train ...` or `.venv/bin/moebench train ...`
            args = words[words.index("train") + 1:]
            proc = subprocess.Popen([sys.executable, "-m", "moebench", "train", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=SLOW, cwd=tmp_path)
        else:
            proc = start(run_dir)
        code, err = signal_at(proc, run_dir, target, sig, after=positions[-1] if positions else 0)
        if code == 0:  # finished before the signal landed
            break
        assert code == 128 + sig, err[-3000:]
        res = result(run_dir)
        assert res["status"] == "preempted" and res["signal"] == signal.Signals(sig).name
        assert "Traceback" not in err
        ckpt = torch.load(run_dir / "last.pt", weights_only=True)
        assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == tuple(res["position"][k] for k in ("epoch", "batch", "step"))
        positions.append(ckpt["step"])
        assert res["quality"] is not None and res["cost"]["params_total"] > 0  # what it had measured so far
        assert f"run dir: {run_dir}" in err
        resume_cmd = err.split("moebench: resume with: ")[1].splitlines()[0]
        preempted += 1
    assert preempted >= 2, positions
    assert positions == sorted(set(positions)) and any(p % 4 for p in positions), positions  # some mid-epoch
    proc = moebench("train", *RUN, f"hydra.run.dir={run_dir}")  # the same command again finishes the run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(run_dir)["status"] == "completed"
    assert_same_run(straight, run_dir)


@pytest.mark.slow  # the fast suite kills a run inside a checkpoint write (below); this one kills it between
def test_kill_9_loses_at_most_the_checkpoint_interval(tmp_path, straight):
    run_dir = tmp_path / "run"
    step = random.Random(2).randrange(5, TOTAL_STEPS - 2)
    code, _ = signal_at(start(run_dir, "train.checkpoint_every_steps=2"), run_dir, step, signal.SIGKILL)
    assert code == -signal.SIGKILL
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert logged_steps(run_dir) - ckpt["step"] <= 2  # at most one interval of steps lost
    proc = moebench("train", *RUN, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0 and "resuming" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert_same_run(straight, run_dir)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, straight):
    run_dir = tmp_path / "run"
    env = {**ENV, "MOEBENCH_FAULT": "sigkill:write:last.pt:3"}  # dies inside the 3rd write of last.pt
    proc = moebench("train", *RUN, "train.checkpoint_every_steps=1", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 2  # the 2nd write, whole
    assert list(run_dir.glob(".last.pt.*.tmp"))  # the write that was cut short never replaced it
    before = torch.load(run_dir / "last.pt", weights_only=True)["train_time_s"]
    proc = moebench("train", *RUN, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(run_dir.glob(".*.tmp"))  # leftovers cleaned up
    assert_same_run(straight, run_dir)
    # the run's training time: the killed process's up to its last whole checkpoint, and the resumed one's
    res = result(run_dir)
    assert before > 0 and res["train_time_s"] == pytest.approx(before + res["train_time_s_this_process"])


def test_a_full_disk_is_one_clear_error_and_earlier_files_stay_intact(tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "MOEBENCH_FAULT": "enospc:write:last.pt:2"}
    proc = moebench("train", *RUN, "train.checkpoint_every_steps=1", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode != 0
    assert "moebench: error: cannot write checkpoint" in proc.stderr and "No space left on device" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 1
    assert not list(run_dir.glob(".*.tmp"))
    res = result(run_dir)
    assert res["status"] == "failed" and "No space left" in res["error"] and res["position"]["step"] == 2


def test_a_corrupt_checkpoint_in_the_run_dir_is_refused_and_kept(tmp_path, cli_in_process):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"\x80\x02 half a checkpoint")
    # a refusal: in this process (a fresh one spends seconds importing torch first)
    code, out, err = cli_in_process("train", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert code == 2
    assert "cannot read checkpoint" in err and "Traceback" not in out + err
    assert (run_dir / "last.pt").read_bytes() == b"\x80\x02 half a checkpoint"
    assert not (run_dir / ".hydra").exists()  # refused before Hydra wrote anything


@pytest.mark.slow  # two concurrent runs
def test_a_second_run_into_the_same_dir_refuses_while_the_first_runs(tmp_path):
    run_dir = tmp_path / "run"
    long = ["train.epochs=40"]  # 160 slowed steps: still running when the second starts
    first = start(run_dir, *long)
    deadline = time.monotonic() + 600
    while logged_steps(run_dir) < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = moebench("train", *RUN, *long, f"hydra.run.dir={run_dir}")
    assert second.returncode == 2
    assert f"run dir {run_dir} is in use by another run (pid {first.pid})" in second.stderr
    code, err = signal_at(first, run_dir, 0, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert result(run_dir)["status"] == "preempted"  # the first run's records are its own


@pytest.mark.slow  # two runs
def test_divergence_stops_the_run_and_is_recorded(tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "MOEBENCH_FAULT": "nan:step:6"}
    proc = moebench("train", *RUN, f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moebench: diverged")]
    assert len(lines) == 1 and "at step 6" in lines[0] and "Traceback" not in proc.stderr
    res = result(run_dir)
    finite = [m["train/loss"] for m in metric_lines(run_dir) if "train/loss" in m]
    assert res["status"] == "diverged" and res["diverged"]["step"] == 6 and res["diverged"]["loss"] == "nan"
    assert res["diverged"]["last_finite_loss"] == finite[-1] and len(finite) == 5
    assert res["quality"]["top1"] is not None  # the epoch-1 evaluation it had

    pareto = moebench("pareto", str(run_dir), "--wandb-mode", "disabled")
    assert pareto.returncode == 0 and "diverged" in pareto.stdout, pareto.stdout + pareto.stderr
    assert json.loads((run_dir / "pareto.json").read_text())["runs"] == []  # never on a frontier


@pytest.mark.slow  # a run with injected faults
def test_skip_nonfinite_steps_skips_that_many_then_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "MOEBENCH_FAULT": "nan:step:6"}
    proc = moebench("train", *RUN, "train.skip_nonfinite_steps=1", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = result(run_dir)
    assert res["status"] == "completed" and res["skipped_nonfinite_steps"] == 1


@pytest.mark.slow  # three runs
def test_resume_refuses_a_result_changing_difference_and_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    proc = moebench("train", *RUN, "train.epochs=2", "train.time_limit_min=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0 and result(run_dir)["status"] == "stopped", proc.stderr[-2000:]
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    work = tmp_path / "elsewhere"
    work.mkdir()
    for change, key in (("train.weight_decay=0.1", "train.weight_decay"), ("precision=bf16", "precision")):
        proc = moebench("train", *RUN, "train.epochs=2", change, f"resume={run_dir}", cwd=work)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("moebench: error: ") and f": {key} was " in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    assert list(work.iterdir()) == []  # no stray run dir
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # the run dir untouched

    # Longer, with other threads: allowed; everything of the resumed run lands in the run dir.
    proc = moebench("train", *RUN, "train.epochs=3", "threads=1", f"resume={run_dir}", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(work.iterdir()) == []
    assert result(run_dir)["status"] == "completed" and result(run_dir)["epochs_completed"] == 3
    assert "epoch 3/3" in (run_dir / "train.log").read_text()
    assert "train.epochs=3" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_records_follow_the_users_umask(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "moebench", "train", "experiment=smoke", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, env=ENV, preexec_fn=lambda: os.umask(0o002), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    subprocess.run([sys.executable, "-m", "moebench", "pareto", str(run_dir), "--wandb-mode", "disabled"],
                   capture_output=True, env=ENV, preexec_fn=lambda: os.umask(0o002), timeout=600, check=True)
    for name in ("result.json", "metrics.jsonl", "last.pt", "pareto.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o664, name  # group-readable and -writable, as asked


# ----------------------------------------------------------------------------- concurrent launches

def start_sweep(sweep: Path, *overrides: str, env: dict = SLOW) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moebench", "train", "-m", *RUN, *overrides,
                             f"hydra.sweep.dir={sweep}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def job_dir(proc: subprocess.Popen, sweep: Path, num: int, steps: int) -> Path:
    """The dir of the sweep's job ``num`` once it has logged ``steps`` steps (the process still running)."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        found = list(sweep.glob(f"{num}_*"))
        if found and logged_steps(found[0]) >= steps:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(proc.communicate()[1][-3000:])


@pytest.mark.slow  # a held lock and a sweep
def test_a_sweep_job_whose_dir_another_process_holds_writes_nothing_there(tmp_path, capsys):
    """The fast form of the next test: this process holds job 0's run dir, as a live run would."""
    from moebench import checkpoint
    from moebench.tracking import read_metrics

    sweep = tmp_path / "sweep"
    run_dir = sweep / "0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    (run_dir / "train.log").write_text("the live run's log\n")
    checkpoint.lock_run_dir(run_dir)
    try:
        before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
        proc = moebench("train", "-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}",
                        "hydra.sweep.subdir=${hydra.job.num}")
    finally:
        checkpoint.unlock_run_dir(run_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]  # its own job 0 was refused...
    assert f"moebench: error: run dir {run_dir} is in use by another run (pid {os.getpid()})" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # ...and wrote nothing there
    assert result(sweep / "1")["status"] == "completed"  # job 1 ran

    # metrics.jsonl readers skip a damaged line (here: the NUL hole an old truncating writer left) with a warning
    (run_dir / "metrics.jsonl").write_bytes(b"\0" * 50 + b'{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    assert read_metrics(run_dir / "metrics.jsonl") == [{"step": 1}, {"step": 3}]
    assert "skipped 1 damaged line(s) (2)" in capsys.readouterr().err


@pytest.mark.slow  # the fast test above covers the same guarantee with one process
def test_a_second_identical_sweep_is_refused_and_writes_nothing_into_the_live_run(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["seed=0", "train.epochs=40"]  # 160 slowed steps: still training while the second sweep starts
    first = start_sweep(sweep, *args)
    try:
        run_dir = job_dir(first, sweep, 0, steps=2)
        before = (run_dir / "metrics.jsonl").read_bytes()
        log_before = (run_dir / "train.log").read_bytes()
        second = subprocess.run([sys.executable, "-m", "moebench", "train", "-m", *RUN, *args,
                                 f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, env=ENV, timeout=600)
        assert second.returncode != 0
        assert f"is in use by another run (pid {first.pid})" in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stdout + second.stderr
        assert first.poll() is None  # the live run was still training all along...
        assert not (run_dir / "result.json").exists()  # ...and the refused sweep left no record in its dir
        assert (run_dir / "metrics.jsonl").read_bytes().startswith(before)  # only ever appended to
        assert "in use by another run" not in (run_dir / "train.log").read_bytes()[len(log_before):].decode()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)
    code, err = signal_at(first, run_dir, 0, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    raw = (run_dir / "metrics.jsonl").read_bytes()
    assert b"\0" not in raw
    steps = [line["step"] for line in metric_lines(run_dir) if "train/loss" in line]
    assert steps == list(range(1, len(steps) + 1))  # every step once, none lost
    res = result(run_dir)
    assert res["status"] == "preempted" and res["position"]["step"] == steps[-1]


# ----------------------------------------------------------------------------- checkpoints prove themselves

def flip_tensor_bytes(path: Path, count: int = 64) -> None:
    """Flip ``count`` bytes in the middle of the largest tensor stored in a checkpoint (the file stays a
    readable zip: torch does not check the entries' CRCs)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[entry.header_offset + 26:entry.header_offset + 28], "little"), \
        int.from_bytes(raw[entry.header_offset + 28:entry.header_offset + 30], "little")
    start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2 - count // 2
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.slow  # two runs per case
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_last_checkpoint_is_detected_and_the_previous_one_resumes(tmp_path, straight, damage):
    run_dir = tmp_path / "run"
    env = {**ENV, "MOEBENCH_FAULT": "sigkill:step:7"}  # checkpoints at steps 2, 4 (epoch end), 6; dies in step 7
    proc = moebench("train", *RUN, "train.checkpoint_every_steps=2", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == -signal.SIGKILL
    last = run_dir / "last.pt"
    assert torch.load(last, weights_only=True)["step"] == 6
    assert torch.load(run_dir / "last.pt.prev", weights_only=True)["step"] == 4  # the one it replaced, kept
    if damage == "flipped":
        flip_tensor_bytes(last)
        torch.load(last, weights_only=True)  # still loads: only the checksum tells
    else:
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = moebench("train", *RUN, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "last.pt.prev" in line]
    assert len(lines) == 1 and lines[0].startswith("moebench: warning: "), proc.stderr[-3000:]
    assert ("fails its checksum" if damage == "flipped" else "cannot read checkpoint") in lines[0]
    assert "(step 4)" in lines[0] and "Traceback" not in proc.stderr
    assert (run_dir / "last.pt.damaged").is_file()  # kept for a look
    assert_same_run(straight, run_dir)  # resumed at step 4: the same run as one never interrupted


def test_checksums_catch_changed_values_and_older_checkpoints_without_one_still_load(tmp_path):
    from moebench import checkpoint
    from moebench.errors import CheckpointError

    state = {"model": {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}, "optimizer": {"state": {0: {}}},
             "epoch": 1, "step": 4, "config": {"lr": 0.1}, "rng": {"torch": torch.zeros(3, dtype=torch.uint8)}}
    torch.save(state, tmp_path / "old.pt")  # written before checksums existed
    assert checkpoint.load_checkpoint(tmp_path / "old.pt")["step"] == 4
    torch.save(checkpoint.with_checksum(state), tmp_path / "new.pt")
    assert checkpoint.load_checkpoint(tmp_path / "new.pt")["step"] == 4
    for change in ({"step": 5}, {"config": {"lr": 0.2}}, {"model": {"w": torch.ones(2, 3, dtype=torch.bfloat16)}}):
        torch.save({**checkpoint.with_checksum(state), **change}, tmp_path / "changed.pt")
        with pytest.raises(CheckpointError, match="fails its checksum"):
            checkpoint.load_checkpoint(tmp_path / "changed.pt")


@pytest.mark.slow  # a sweep beside a held lock
def test_a_sweep_counts_only_its_own_jobs_in_a_shared_sweep_dir(tmp_path):
    """Fast form of the next test: the sweep dir already holds another launch's runs, one in flight
    (this process holds its lock) and one failed."""
    from moebench import checkpoint

    sweep = tmp_path / "sweep"
    running, failed = sweep / "other_running", sweep / "other_failed"
    for run_dir in (running, failed):
        (run_dir / ".hydra").mkdir(parents=True)
    (failed / "result.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    (failed / checkpoint.LOCK_NAME).write_text("999\n2026-01-01_00-00-00_pid999\n")
    checkpoint.lock_run_dir(running)
    try:
        proc = moebench("train", "-m", *TINY, "seed=0", f"hydra.sweep.dir={sweep}")
    finally:
        checkpoint.unlock_run_dir(running)
    assert proc.returncode == 0, proc.stderr[-3000:]  # its own job completed: the others are not its business
    summary = json.loads((sweep / "pareto.json").read_text())
    assert len(summary["runs"]) == 1
    assert {Path(s["run"]).name: s["status"] for s in summary["skipped"]} == \
        {"other_running": "running", "other_failed": "failed"}
    [record] = sweep.glob("multirun.*_pid*.yaml")  # this launch's own record, beside Hydra's multirun.yaml
    assert "seed=0" in record.read_text() and (sweep / "multirun.yaml").is_file()
    assert not list(sweep.glob(".*.tmp"))  # pareto files replaced atomically


@pytest.mark.slow  # the fast test above covers the same guarantees with one sweep process
def test_two_sweeps_into_one_sweep_dir_each_exit_by_their_own_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    first = start_sweep(sweep, "seed=0,1")
    try:
        job_dir(first, sweep, 0, steps=1)
        os.kill(first.pid, signal.SIGSTOP)  # its job 0 stays in flight, lock held, while the second sweep runs
        second = subprocess.run([sys.executable, "-m", "moebench", "train", "-m", *RUN, "seed=2,3",
                                 f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, env=ENV, timeout=600)
        summary = json.loads((sweep / "pareto.json").read_text())
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [s["status"] for s in summary["skipped"]] == ["running"] and len(summary["runs"]) == 2
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    summary = json.loads((sweep / "pareto.json").read_text())
    assert len(summary["runs"]) == 4 and not summary["skipped"]  # the last to end aggregates all four
    assert len((sweep / "pareto.csv").read_text().splitlines()) == 5
    records = sorted(p.read_text() for p in sweep.glob("multirun.*_pid*.yaml"))
    assert len(records) == 2 and any("seed=0,1" in r for r in records) and any("seed=2,3" in r for r in records)
