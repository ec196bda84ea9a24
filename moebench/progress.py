"""Terminal output of a run: a rich progress bar while training, a summary table at the end."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class TrainProgress:
    """Epoch/step bar with loss, lr and images/s; a no-op bar when stderr is not a
    terminal or when not ``enabled`` (ranks other than 0)."""

    def __init__(self, epochs: int, steps_per_epoch: int, start_epoch: int = 0, enabled: bool = True):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
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
        self.task = self.progress.add_task(
            "train", total=epochs * steps_per_epoch, completed=start_epoch * steps_per_epoch,
            epoch=start_epoch + 1, epochs=epochs, loss=float("nan"), lr=0.0, ips=0.0, top1="-",
        )

    def __enter__(self) -> "TrainProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, *, loss: float, lr: float, images_per_s: float) -> None:
        self.progress.update(self.task, advance=1, loss=loss, lr=lr, ips=images_per_s)

    def end_epoch(self, epochs_done: int, top1: float) -> None:
        self.progress.update(self.task, epoch=min(epochs_done + 1, self.epochs), top1=f"{top1:.4f}")


def print_summary(result: dict) -> None:
    """One table with the run's cost and quality."""
    table = Table(title=f"moebench: {result['config']['router']['name']} ({result['status']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for section in ("quality", "cost"):
        for key, value in result[section].items():
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            table.add_row(f"{section}/{key}", text)
    table.add_row("run dir", result["run_dir"])
    Console().print(table)
