"""`moebench measure PATH...`: re-time finished runs quietly, all in one process.

Timings taken during training depend on whatever ran beside each job. This
command reloads every completed run's final model (``last.pt``) and times them
all together, interleaved: each round times every run once (in a rotated
order), and the figure kept is the median over rounds, so a disturbance hits
all runs alike and a brief one is voted out. Per run and round: the median of
``--repeats`` forward calls on a batch of the run's ``cost.batch_size`` (->
``infer_ms_per_image``), of batch-1 calls (-> ``latency_ms``) and, with
``--train``, of training steps on the run's ``data.batch_size`` (->
``train_images_per_s``); the model's memory (``train_peak_mb``, ``infer_peak_mb``,
see ``moebench.cost``) is measured once. Inputs are random images of the run's shape: the work
of every router is fixed by shapes, not by pixel values. Each model is timed in
the precision and compile setting it was trained with.

The figures go into each run's ``result.json`` under ``cost_measured``, with the
date, threads, machine and rounds; other keys are kept, the file is replaced
atomically. ``moebench pareto`` then prefers them over the training-time ones.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arguments, cost
from .errors import CheckpointError
from .rundirs import find_run_dirs
from .tracking import atomic_write_json


@dataclass
class Subject:
    """One run being timed: its loaded model, the calls to time, and the times per round."""

    run_dir: Path
    name: str
    config: dict
    calls: dict  # metric -> (call, images per call)
    memory: dict = field(default_factory=dict)  # train_peak_mb, infer_peak_mb (deterministic: measured once)
    rounds: dict = field(default_factory=dict)  # metric -> [seconds per call, one per round]


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "hostname": platform.node(),
            "platform": platform.platform(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def build_subject(run_dir: Path, name: str, args, device: torch.device) -> Subject:
    from .moe import collect_aux_loss
    from .runs import load_run

    loaded = load_run(run_dir, device=device)
    cfg = loaded.config
    model = loaded.model
    in_chans = model.patch_embed.in_channels
    size = cfg["data"]["image_size"]
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, in_chans, size, size, generator=generator).to(device)

    batch, train_batch = args.batch_size or cfg.get("cost", {}).get("batch_size", 64), cfg["data"]["batch_size"]
    example, train_images = images(batch), images(train_batch)
    labels = torch.randint(0, model.head.out_features, (train_batch,), generator=generator).to(device)
    served = torch.compile(model) if loaded.compile else model
    calls = {
        "infer": (cost.inference_call(served, example, loaded.precision), batch),
        "latency": (cost.inference_call(served, images(1), loaded.precision), 1),
    }
    if args.train:
        calls["train"] = (cost.train_step_call(model, train_images, labels, loaded.precision,
                                               aux_loss=collect_aux_loss, compile=loaded.compile), train_batch)
    memory = {"train_peak_mb": cost.train_peak_mb(model, train_images, labels, loaded.precision),
              "infer_peak_mb": cost.infer_peak_mb(model, example, loaded.precision)}
    return Subject(run_dir, name, cfg, calls, memory)


def time_rounds(subjects: list[Subject], rounds: int, repeats: int, device: torch.device,
                warmup_s: float = cost.WARMUP_MIN_S) -> None:
    """Warm every call up, then ``rounds`` rounds over all runs, each in a rotated order."""
    for subject in subjects:
        for call, _ in subject.calls.values():
            cost.warm_up(call, device, min_seconds=warmup_s)
    for r in range(rounds):
        shift = r % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:  # no run always first (or last) in a round
            for metric, (call, _) in subject.calls.items():
                times = [cost.timed(call, device) for _ in range(repeats)]
                subject.rounds.setdefault(metric, []).append(statistics.median(times))


def record(subject: Subject, *, rounds: int, repeats: int, threads: int, device: torch.device, together: int) -> dict:
    """The ``cost_measured`` entry of one run."""
    per_call = {metric: statistics.median(times) for metric, times in subject.rounds.items()}
    infer_images = subject.calls["infer"][1]
    out = {
        "infer_ms_per_image": 1e3 * per_call["infer"] / infer_images,
        "infer_images_per_s": infer_images / per_call["infer"],
        "latency_ms": 1e3 * per_call["latency"],
    }
    if "train" in per_call:
        train_images = subject.calls["train"][1]
        out.update({"train_images_per_s": train_images / per_call["train"],
                    "train_ms_per_image": 1e3 * per_call["train"] / train_images, "train_batch_size": train_images})
    out.update(subject.memory)
    out.update({
        "batch_size": infer_images,
        "precision": subject.config.get("precision", "fp32"),
        "compile": bool(subject.config.get("compile", False)),
        "rounds": rounds,
        "repeats": repeats,
        "round_ms": {metric: [1e3 * t for t in times] for metric, times in subject.rounds.items()},  # the spread
        "runs_measured_together": together,
        "threads": threads,
        "device": str(device),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    return out


def write_measured(run_dir: Path, measured: dict) -> None:
    """Add ``cost_measured`` to result.json, keeping every other key (read just before the write)."""
    path = run_dir / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    result["cost_measured"] = measured
    atomic_write_json(path, result)


def print_table(subjects: list[Subject], measured: dict[Path, dict], root: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(f"runs under {root}:", soft_wrap=True, markup=False, highlight=False)  # whole, never cut
    table = Table(title="re-timed in one process, median of rounds", title_justify="left")
    for col in ("run", "inference ms / image", "(in the training job)", "latency ms", "training ms / image"):
        table.add_column(col, justify="left" if col == "run" else "right", overflow="fold")
    for subject in subjects:
        new = measured[subject.run_dir]
        try:
            old = json.loads((subject.run_dir / "result.json").read_text()).get("cost") or {}
        except (OSError, json.JSONDecodeError):
            old = {}
        before = old.get("infer_ms_per_image")
        train = new.get("train_ms_per_image")
        table.add_row(subject.name, f"{new['infer_ms_per_image']:.3g}", f"{before:.3g}" if before else "-",
                      f"{new['latency_ms']:.3g}", f"{train:.3g}" if train else "-")
    console.print(table)


def measure(paths: list[str], args) -> int:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dirs = find_run_dirs(paths)
    root = Path(os.path.commonpath(run_dirs)) if len(run_dirs) > 1 else run_dirs[0].parent  # names relative to it
    subjects, problems = [], 0
    for run_dir in run_dirs:
        try:
            status = json.loads((run_dir / "result.json").read_text()).get("status")
        except FileNotFoundError:
            status = "unfinished"
        except (OSError, json.JSONDecodeError):
            status = "unreadable"
        if status != "completed":
            print(f"skipped {run_dir} (status {status})")
            continue
        try:
            subjects.append(build_subject(run_dir, str(run_dir.relative_to(root)), args, device))
        except CheckpointError as err:
            print(f"moebench: error: {err}", file=sys.stderr)
            problems += 1
    if not subjects:
        print("moebench: error: no completed run with a checkpoint to measure", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    print(f"timing {len(subjects)} runs: {args.rounds} rounds x {args.repeats} calls, {threads} threads, {device}",
          flush=True)
    with cost.quiet():
        time_rounds(subjects, args.rounds, args.repeats, device, args.warmup_s)
    measured = {}
    for subject in subjects:
        measured[subject.run_dir] = record(subject, rounds=args.rounds, repeats=args.repeats, threads=threads,
                                           device=device, together=len(subjects))
        write_measured(subject.run_dir, measured[subject.run_dir])
    print_table(subjects, measured, root)
    print(f"cost_measured written to {len(subjects)} result.json files under {root}")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    return arguments.call("measure", run, argv)


def run(args) -> int:
    """``moebench measure`` on its checked arguments (arguments.measure_parser)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"moebench: error: --device {args.device} but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    try:
        return measure(args.paths, args)
    except CheckpointError as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2
