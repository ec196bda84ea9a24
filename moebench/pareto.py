"""Cost/quality Pareto frontiers over finished runs: files, a terminal table, a W&B run.

Reads run records (``result.json``) only; it never imports the training code.
Used by ``moebench pareto PATH...`` and by ``ParetoCallback`` at the end of
every ``-m`` sweep.

The frontier of a set of runs, for one cost axis: a run is on it unless another
run is at least as cheap AND at least as good, and strictly better on one of
the two. So two runs at the same point are both on it (neither beats the
other), and of two equally cheap runs only the better one is.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback

from . import distributed
from .tracking import atomic_write_json

QUALITY = "top1"
# Cost axes, all "lower is cheaper". Training speed becomes ms per image so it fits.
COST_AXES = {
    "gflops_per_image": ("GFLOPs / image", lambda c: c["gflops_per_image"]),
    "infer_ms_per_image": ("inference ms / image", lambda c: c["infer_ms_per_image"]),
    "params_total": ("parameters", lambda c: c["params_total"]),
    "train_ms_per_image": ("training ms / image", lambda c: 1e3 / c["train_images_per_s"]),
}
CONFIG_KEYS = {  # column -> dotted path in the resolved config
    "router": "router.name", "experts": "router.num_experts", "slots": "router.slots_per_expert",
    "k": "router.k", "capacity_factor": "router.capacity_factor", "bpr": "router.bpr",
    "dispatch": "router.dispatch", "combine": "router.combine", "model": "model.name", "data": "data.name",
    "seed": "seed",
}
COLORS = {"soft": "tab:blue", "tokens_choice": "tab:orange", "experts_choice": "tab:green", "dense": "black"}


class ParetoError(Exception):
    """Nothing to aggregate at the given paths."""


def pareto_mask(costs: list[float], qualities: list[float]) -> list[bool]:
    """True for the points no other point dominates (cheaper-or-equal and better-or-equal, one strictly)."""
    points = list(zip(costs, qualities))
    return [
        not any(c2 <= c and q2 >= q and (c2 < c or q2 > q) for c2, q2 in points)
        for c, q in points
    ]


@dataclass
class Run:
    path: Path
    status: str
    config: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    error: str | None = None

    def get(self, dotted: str):
        node = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    @property
    def label(self) -> str:
        router = self.get("router.name") or "?"
        parts = {
            "soft": [f"E{self.get('router.num_experts')}", f"p{self.get('router.slots_per_expert')}"],
            "tokens_choice": [f"E{self.get('router.num_experts')}", f"k{self.get('router.k')}",
                              f"C{self.get('router.capacity_factor')}"] + ([] if self.get("router.bpr") else ["noBPR"]),
            "experts_choice": [f"E{self.get('router.num_experts')}", f"C{self.get('router.capacity_factor')}"],
        }.get(router, [])
        if router == "soft" and (self.get("router.dispatch"), self.get("router.combine")) != ("soft", "soft"):
            parts.append(f"{self.get('router.dispatch')}/{self.get('router.combine')}")
        return " ".join([router, *parts])


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run under ``paths`` (run dirs or sweep dirs), finished or not, sorted by path."""
    runs: dict[Path, Run] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise ParetoError(f"{path}: no such run or sweep directory")
        for hydra_dir in sorted(path.rglob(".hydra")):  # every Hydra job leaves one
            run_dir = hydra_dir.parent
            runs[run_dir.resolve()] = read_run(run_dir)
        for result in sorted(path.rglob("result.json")):  # e.g. resumed runs
            runs.setdefault(result.parent.resolve(), read_run(result.parent))
    if not runs:
        raise ParetoError(f"no runs (result.json or .hydra/) under {', '.join(map(str, paths))}")
    return [runs[key] for key in sorted(runs)]


def read_run(run_dir: Path) -> Run:
    run_dir = run_dir.resolve()
    path = run_dir / "result.json"
    if not path.exists():
        return Run(run_dir, "unfinished")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return Run(run_dir, "unreadable", error=str(err))
    return Run(run_dir, data.get("status", "unknown"), data.get("config") or {}, data.get("cost") or {},
               data.get("quality") or {}, data.get("error"))


def usable(run: Run) -> bool:
    return (run.status == "completed" and isinstance(run.quality.get(QUALITY), (int, float))
            and all(key in run.cost for key in ("gflops_per_image", "infer_ms_per_image", "params_total",
                                                 "train_images_per_s")))


def frontier_rows(runs: list[Run], root: Path | None = None) -> list[dict]:
    """One row per usable run: config keys, cost axes, quality, and on/off each frontier."""
    done = [r for r in runs if usable(r)]
    rows = []
    for run in done:
        name = str(run.path.relative_to(root)) if root and run.path.is_relative_to(root) else str(run.path)
        row = {"run": name, "label": run.label, **{col: run.get(key) for col, key in CONFIG_KEYS.items()}}
        row.update({axis: fn(run.cost) for axis, (_, fn) in COST_AXES.items()})
        row.update({"params_active": run.cost.get("params_active"), "top1": run.quality[QUALITY],
                    "top1_best": run.quality.get("top1_best"), "top5": run.quality.get("top5")})
        rows.append(row)
    quality = [row["top1"] for row in rows]
    for axis in COST_AXES:
        costs = [row[axis] for row in rows]
        for row, on in zip(rows, pareto_mask(costs, quality)):
            row[f"frontier_{axis}"] = on
        for router in {row["router"] for row in rows}:
            idx = [i for i, row in enumerate(rows) if row["router"] == router]
            mask = pareto_mask([costs[i] for i in idx], [quality[i] for i in idx])
            for i, on in zip(idx, mask):
                rows[i][f"router_frontier_{axis}"] = on
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    path.write_text(buffer.getvalue())


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(5 * len(COST_AXES), 4.2), squeeze=False)
    for ax, (axis, (label, _)) in zip(axes[0], COST_AXES.items()):
        for router in sorted({row["router"] for row in rows}):
            pts = [row for row in rows if row["router"] == router]
            sizes = [30 + 12 * math.log2(max(1, row["experts"] or 1)) for row in pts]
            ax.scatter([row[axis] for row in pts], [row["top1"] for row in pts], s=sizes, alpha=0.75,
                       color=COLORS.get(router), label=router, edgecolors="white", linewidths=0.5)
        front = sorted((row[axis], row["top1"]) for row in rows if row[f"frontier_{axis}"])
        if front:
            ax.step([c for c, _ in front], [q for _, q in front], where="post", color="gray", lw=1, ls="--",
                    label="frontier")
            ax.scatter([c for c, _ in front], [q for _, q in front], s=160, facecolors="none",
                       edgecolors="gray", linewidths=1)
        ax.set_xscale("log")
        # Within one decade matplotlib labels every minor tick, and the labels overlap: a few plain ones instead.
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"{label} (log)")
        ax.set_ylabel("test top-1")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}: quality vs cost (marker size ~ log2 experts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: reruns give the same file
    plt.close(fig)


def print_table(rows: list[dict], skipped: list[Run]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="runs (* = on the all-router frontier for that cost)")
    for col in ("run", "label", "top1", "GFLOPs/img", "infer ms/img", "params", "train ms/img"):
        table.add_column(col, justify="left" if col in ("run", "label") else "right")
    for row in sorted(rows, key=lambda r: (-r["top1"], r["run"])):
        cells = []
        for axis, fmt in (("gflops_per_image", "{:.4g}"), ("infer_ms_per_image", "{:.3g}"),
                          ("params_total", "{:,}"), ("train_ms_per_image", "{:.3g}")):
            cells.append(fmt.format(row[axis]) + (" *" if row[f"frontier_{axis}"] else "  "))
        table.add_row(row["run"], row["label"], f"{row['top1']:.4f}", *cells)
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes: no 80-column wrap
    console.print(table)
    for run in skipped:
        console.print(f"skipped {run.path} ({run.status}{': ' + run.error if run.error else ''})", soft_wrap=True)


def log_wandb(rows: list[dict], png: Path, wandb_cfg: dict, run_dir: Path) -> str | None:
    """One W&B run (job_type pareto) with a table of all runs, a scatter per cost axis and the PNG."""
    if not wandb_cfg or wandb_cfg.get("mode", "disabled") == "disabled":
        return None
    import wandb

    run = wandb.init(
        project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), group=wandb_cfg.get("group"),
        name=f"pareto-{wandb_cfg.get('group') or run_dir.name}", job_type="pareto", dir=str(run_dir),
        mode=wandb_cfg["mode"], reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True),
    )
    columns = list(rows[0]) if rows else []
    table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
    charts = {f"pareto/top1_vs_{axis}": wandb.plot.scatter(table, axis, "top1", title=f"top-1 vs {label}")
              for axis, (label, _) in COST_AXES.items()}
    run.log({"pareto/runs": table, **charts, "pareto/plot": wandb.Image(str(png))})
    run_id = run.id
    run.finish()
    return run_id


def aggregate(paths: list[str | Path], out_dir: Path, *, wandb_cfg: dict | None = None, show: bool = True) -> dict:
    """Find the runs, compute the frontiers, write pareto.csv/.json/.png to ``out_dir``."""
    runs = find_runs(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.commonpath([Path(p).resolve() for p in paths]))  # run names relative to it
    rows = frontier_rows(runs, root)
    skipped = [run for run in runs if not usable(run)]
    summary = {
        "quality": QUALITY,
        "cost_axes": list(COST_AXES),
        "runs": rows,
        "skipped": [{"run": str(r.path), "status": r.status, "error": r.error} for r in skipped],
    }
    atomic_write_json(out_dir / "pareto.json", summary)
    write_csv(rows, out_dir / "pareto.csv")
    if rows:
        plot(rows, out_dir / "pareto.png", title=out_dir.name)
    if show:
        print_table(rows, skipped)
    if rows:
        summary["wandb_run_id"] = log_wandb(rows, out_dir / "pareto.png", wandb_cfg or {}, out_dir)
    return summary


class ParetoCallback(Callback):
    """Hydra callback: aggregate a ``-m`` sweep into its sweep dir when it ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists() or not distributed.current().is_main:  # under torchrun, rank 0 aggregates
            return
        wandb_cfg = {"mode": config.wandb.mode, "project": config.wandb.project, "entity": config.wandb.entity,
                     "group": config.wandb.group or sweep_dir.name}
        from .train import FAILED_JOBS  # the exit code of `moebench train -m`

        try:
            summary = aggregate([sweep_dir], sweep_dir, wandb_cfg=wandb_cfg)
        except ParetoError as err:  # every job failed before writing anything: say so, don't crash
            print(f"moebench: pareto: {err}")
            FAILED_JOBS.append(str(sweep_dir))
            return
        # Launchers that run jobs in other processes (joblib, submitit) report failures only on disk.
        FAILED_JOBS.extend(s["run"] for s in summary["skipped"] if s["status"] in ("failed", "unfinished"))


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="moebench pareto", description="Cost/quality Pareto frontier of runs.")
    parser.add_argument("paths", nargs="+", help="sweep dirs and/or run dirs (several are combined)")
    parser.add_argument("--out", type=Path, help="where to write pareto.*; default: the path if only one")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--wandb-project", default="moebench")
    parser.add_argument("--wandb-group", default=None)
    args = parser.parse_args(argv)
    out = args.out or (Path(args.paths[0]) if len(args.paths) == 1 else Path("pareto"))
    wandb_cfg = {"mode": args.wandb_mode, "project": args.wandb_project, "group": args.wandb_group or out.name}
    try:
        summary = aggregate(args.paths, out, wandb_cfg=wandb_cfg)
    except ParetoError as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(summary['runs'])} runs, {len(summary['skipped'])} skipped -> {out}/pareto.csv, pareto.json, pareto.png")
    return 0
