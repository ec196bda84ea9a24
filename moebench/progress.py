"""Terminal output of a run: where it writes, a progress bar or timed epoch lines, a summary table.

On a terminal a rich progress bar runs while training. Logs, CI and SLURM files
get no bar, so every epoch line carries the elapsed time and an ETA itself, and
console log records are written as plain single lines (rich pads them to 80
columns and folds long paths over several lines).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


log = logging.getLogger("moebench")

PLAIN_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"  # as train.log, when no file handler is found


def plain_console_logging() -> None:
    """Replace rich's console log handler by a one-line-per-record one when its output
    is not a terminal. Hydra configures logging anew for each job, so call it per job."""
    root = logging.getLogger()
    file_formats = [h.formatter for h in root.handlers if isinstance(h, logging.FileHandler) and h.formatter]
    for i, handler in enumerate(root.handlers):
        if isinstance(handler, RichHandler) and not handler.console.is_terminal:
            plain = logging.StreamHandler(handler.console.file)
            plain.setLevel(handler.level)
            plain.setFormatter(file_formats[0] if file_formats else logging.Formatter(PLAIN_FORMAT))
            root.handlers[i] = plain


def announce_run(run_dir: Path | str, resumed: dict | None = None) -> None:
    """First lines of a run: console logging fit for its output, then where the run writes.

    ``resumed``: the checkpoint's position (0-based ``epoch``, ``batch``, ``step``), shown 1-based
    like the epoch lines and the preemption message, so "preempted at step 111 (epoch 6 ...)" is
    followed by "resuming at step 111 (epoch 6 ...)", not by an epoch one lower.
    """
    plain_console_logging()
    resuming = ""
    if resumed is not None:
        resuming = (f" (resuming at step {resumed['step']}: epoch {resumed['epoch'] + 1}, "
                    f"batch {resumed.get('batch', 0)})")
    log.info("run dir: %s%s", Path(run_dir).resolve(), resuming)


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m: short enough for a log line, exact enough for planning."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class EpochClock:
    """Elapsed time and ETA of the epochs this process trains (a resumed run counts from its restart)."""

    def __init__(self, epochs: int, start_epoch: int = 0, now=time.monotonic):
        self.epochs, self.start_epoch, self.now = epochs, start_epoch, now
        self.started = now()

    def text(self, epochs_done: int) -> str:
        """"elapsed 12m40s (38s/epoch), ETA 17m29s" after ``epochs_done`` epochs of the run."""
        elapsed = self.now() - self.started
        trained = epochs_done - self.start_epoch
        if trained <= 0:
            return f"elapsed {format_duration(elapsed)}, ETA ?"
        per_epoch = elapsed / trained
        return (f"elapsed {format_duration(elapsed)} ({format_duration(per_epoch)}/epoch), "
                f"ETA {format_duration(per_epoch * (self.epochs - epochs_done))}")


HEARTBEAT_S = 60.0  # off a terminal: seconds between progress lines within an epoch


class TrainProgress:
    """Epoch/step bar with loss, lr and images/s on a terminal (a no-op bar when stderr
    is not a terminal, or when not ``enabled``: ranks other than 0), and the clock of
    the epoch lines, which are logged on terminals and in files alike."""

    def __init__(self, epochs: int, steps_per_epoch: int, start_epoch: int = 0, enabled: bool = True,
                 start_batch: int = 0, heartbeat_s: float = HEARTBEAT_S, now=time.monotonic):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.clock = EpochClock(epochs, start_epoch)
        self.epoch, self.batch = start_epoch, start_batch  # 0-based epoch, batches done in it
        self.heartbeat_s, self.now = heartbeat_s, now
        self.last_line = now()
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"),
            TextColumn("top1 {task.fields[top1]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not (enabled and Console(stderr=True).is_terminal),
        )
        # Off a terminal (a log file, a pipe, SLURM) there is no bar: a CIFAR epoch on a CPU printed
        # nothing for 13 minutes after the model line. There, a plain line every heartbeat_s instead.
        self.heartbeat = enabled and self.progress.disable
        self.task = self.progress.add_task(
            "train", total=epochs * steps_per_epoch, completed=start_epoch * steps_per_epoch,
            epoch=start_epoch + 1, epochs=epochs, loss=float("nan"), lr=0.0, ips=0.0, top1="-",
        )

    def __enter__(self) -> "TrainProgress":
        self.clock = EpochClock(self.epochs, self.clock.start_epoch)  # the clock starts with training
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, *, loss: float, lr: float, images_per_s: float) -> None:
        self.progress.update(self.task, advance=1, loss=loss, lr=lr, ips=images_per_s)
        self.batch += 1
        if self.heartbeat and self.now() - self.last_line >= self.heartbeat_s:
            self.last_line = self.now()
            log.info("epoch %d/%d: step %d/%d, loss %.4f, lr %.2e, %.0f img/s", self.epoch + 1, self.epochs,
                     self.batch, self.steps_per_epoch, loss, lr, images_per_s)

    def end_epoch(self, epochs_done: int, top1: float) -> str:
        """Update the bar; returns "elapsed 3m12s, ETA 4m25s" for the epoch's log line."""
        self.epoch, self.batch = epochs_done, 0
        self.progress.update(self.task, epoch=min(epochs_done + 1, self.epochs), top1=f"{100 * top1:.2f}%")
        return self.clock.text(epochs_done)


# ----------------------------------------------------------------------------- the end-of-run table

def human_count(n: float) -> str:
    """8779 -> 8.8k, 5_300_000 -> 5.3M."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def human_flops(gflops: float) -> str:
    """GFLOPs per image in the unit that reads best: 0.0341 -> 34.1 MFLOPs."""
    flops = gflops * 1e9
    for scale, unit in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOPs"


def human_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


SUMMARY_ROWS = (  # (section, key, label, format)
    ("quality", "top1", "test top-1", lambda v: f"{100 * v:.2f}%"),
    ("quality", "top1_at_best_val", "test top-1 at the best val epoch", lambda v: f"{100 * v:.2f}%"),
    ("quality", "val_top1_best", "best val top-1", lambda v: f"{100 * v:.2f}%"),
    ("quality", "best_val_epoch", "best val epoch", lambda v: f"{v:d}" if isinstance(v, int) else f"{v}"),
    ("quality", "top1_best", "best test top-1", lambda v: f"{100 * v:.2f}%"),
    ("quality", "top5", "test top-5", lambda v: f"{100 * v:.2f}%"),
    ("quality", "loss", "test loss", lambda v: f"{v:.4f}"),
    ("cost", "params_total", "parameters", human_count),
    ("cost", "params_active", "parameters active per token", human_count),
    ("cost", "gflops_per_image", "FLOPs / image", human_flops),
    ("cost", "train_images_per_s", "training", lambda v: f"{v:,.0f} img/s"),
    ("cost", "infer_images_per_s", "inference", lambda v: f"{v:,.0f} img/s"),
    # infer_ms_per_image is batched time divided by the batch (1 / throughput), not latency; the
    # batch-1 time is latency_ms. Both were on screen, the first called latency, the second unitless.
    ("cost", "infer_ms_per_image", "inference time per image (batched)", lambda v: f"{v:.3g} ms"),
    ("cost", "latency_ms", "inference latency (batch of 1)", lambda v: f"{v:.3g} ms"),
    ("cost", "train_gflops_total", "training FLOPs (total)", human_flops),
    ("cost", "train_peak_mb", "training peak memory (model)", human_mb),
    ("cost", "infer_peak_mb", "inference peak memory (model)", human_mb),
    ("cost", "peak_memory_mb", "peak memory (process)", human_mb),
)


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(label, text) per metric of a result; metrics the table does not know are shown as they are."""
    rows, known = [], set()
    for section, key, label, fmt in SUMMARY_ROWS:
        known.add((section, key))
        value = (result.get(section) or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((label, fmt(value)))
    for section in ("quality", "cost"):
        for key, value in (result.get(section) or {}).items():
            if (section, key) not in known and value is not None:
                rows.append((f"{section}/{key}", f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows


def print_summary(result: dict) -> None:
    """One table with the run's cost and quality, then the run dir whole on its own line
    (a table cell would cut it at the console width, 80 columns in a pipe)."""
    console = Console()
    table = Table(title=f"moebench: {result['config']['router']['name']} ({result['status']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, text in summary_rows(result):
        table.add_row(label, text)
    console.print(table)
    print(f"run dir: {result['run_dir']}", flush=True)
