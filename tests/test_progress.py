"""What a run prints: its run dir first, epoch lines with elapsed time and ETA, a summary with whole paths."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

from rich.console import Console
from rich.logging import RichHandler

from moebench.progress import EpochClock, format_duration, plain_console_logging, summary_rows

ENV = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore",
       "OMP_NUM_THREADS": "1"}


def test_durations_read_as_seconds_minutes_hours():
    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_eta_is_the_mean_epoch_time_of_this_process_times_the_epochs_left():
    clock = {"t": 100.0}
    fresh = EpochClock(10, now=lambda: clock["t"])
    clock["t"] = 160.0  # 2 epochs in 60 s
    assert fresh.text(2) == "elapsed 1m00s (30s/epoch), ETA 4m00s"
    resumed = EpochClock(10, start_epoch=8, now=lambda: clock["t"])  # resumed at epoch 8
    clock["t"] = 200.0  # one epoch in 40 s, one left
    assert resumed.text(9) == "elapsed 40s (40s/epoch), ETA 40s"
    assert resumed.text(10).endswith("ETA 0s")


def test_console_logs_become_plain_lines_off_a_terminal_only():
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        piped = RichHandler(console=Console(file=io.StringIO(), force_terminal=False))
        terminal = RichHandler(console=Console(file=io.StringIO(), force_terminal=True))
        root.handlers[:] = [piped, terminal]
        plain_console_logging()
        assert type(root.handlers[0]) is logging.StreamHandler and root.handlers[0].stream is piped.console.file
        assert root.handlers[1] is terminal
    finally:
        root.handlers[:] = saved


def test_summary_shows_percent_and_units():
    rows = dict(summary_rows({
        "quality": {"top1": 0.9417, "loss": 0.2, "new_metric": 0.123456},
        "cost": {"params_total": 5_300_000, "gflops_per_image": 0.0341, "peak_memory_mb": 2048.0,
                 "infer_ms_per_image": 10.5, "latency_ms": 230.0},
    }))
    assert rows["inference time per image (batched)"] == "10.5 ms"  # not "latency": it is 1 / throughput
    assert rows["inference latency (batch of 1)"] == "230 ms"  # was "cost/latency_ms 230", no unit
    assert rows["test top-1"] == "94.17%"
    assert rows["parameters"] == "5.3M"
    assert rows["FLOPs / image"] == "34.1 MFLOPs"
    assert rows["peak memory (process)"] == "2.00 GB"
    assert rows["quality/new_metric"] == "0.1235"  # a metric the table does not know still shows


def test_piped_run_prints_its_dir_first_and_times_every_epoch(tmp_path):
    run_dir = tmp_path / ("a-run-dir-name-long-enough-to-be-cut-at-eighty-columns-" * 2) / "2026-11-25" / "16-30-00"
    proc = subprocess.run(
        [sys.executable, "-m", "moebench", "train", "experiment=smoke", "train.epochs=3", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # captured: not a terminal, as in a log file, CI or a SLURM output file
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "run dir:" in line)
    assert lines[first].endswith(f"run dir: {run_dir}")  # whole, on one line, no padding
    epochs = [line for line in lines if re.search(r"epoch \d/3: test top1", line)]
    assert len(epochs) == 3 and lines.index(epochs[0]) > first
    for line in epochs:
        # any duration format_duration writes: a loaded machine may take minutes per epoch
        d = r"(\d+s|\d+m\d\ds|\d+h\d\dm)"
        assert re.search(rf"elapsed {d} \({d}/epoch\), ETA {d}$", line), line
    assert lines[-1] == f"run dir: {run_dir}"  # the summary ends with the path whole
    assert "…" not in proc.stdout


def test_resume_line_counts_epochs_from_1_like_the_preemption_message(caplog, tmp_path):
    # A run preempted "at step 111 (epoch 6, batch 3/19)" has a checkpoint with the 0-based epoch 5.
    from moebench.progress import announce_run
    with caplog.at_level(logging.INFO, logger="moebench"):
        announce_run(tmp_path, resumed={"epoch": 5, "batch": 3, "step": 111})
    assert caplog.messages[-1].endswith("(resuming at step 111: epoch 6, batch 3)"), caplog.messages


def test_off_a_terminal_a_long_epoch_prints_a_progress_line_every_heartbeat(caplog):
    from moebench.progress import TrainProgress
    clock = iter(range(0, 1000, 40))  # 40 s per call of now()
    with caplog.at_level(logging.INFO, logger="moebench"):
        with TrainProgress(2, 5, start_batch=1, heartbeat_s=60, now=lambda: next(clock)) as progress:
            for _ in range(4):
                progress.advance(loss=1.5, lr=1e-3, images_per_s=400.0)
    lines = [m for m in caplog.messages if m.startswith("epoch 1/2: step")]
    assert lines and lines[0] == "epoch 1/2: step 3/5, loss 1.5000, lr 1.00e-03, 400 img/s"  # resumed at batch 1, 80 s later
    assert len(lines) < 4  # not every step
