"""A W&B report for a sweep: `moebench pareto --wandb-report`.

The report is first described as plain data (``report_spec``, built from the
runs' records on disk, testable without W&B), then turned into a
wandb-workspaces report and saved (``build_report``, ``save_report``). Saving
needs W&B online and the optional ``wandb-workspaces`` package
(``pip install 'moebench[report]'``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .tracking import runs_wandb_mode, sweep_group

QUALITY_METRIC = "quality/top1"
# Cost axes as the training runs' W&B summaries hold them (RunRecorder.write_result).
COST_METRICS = {
    "cost/gflops_per_image": "GFLOPs / image",
    "cost/infer_ms_per_image": "inference ms / image",
    "cost/params_total": "parameters",
    "cost/train_images_per_s": "training images / s (higher is faster)",
}
ROUTER_KEY = "router.name"  # in the runs' W&B config
PARETO_PLOT_KEY = "pareto/plot"  # the image the pareto W&B run logs (pareto.log_wandb)
WANDB_RUN_DIR = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-(\w+)")  # <run dir>/wandb/run-<date>_<time>-<id>
LOG_AXIS_SPAN = 10.0  # a cost axis spanning more than this factor is drawn on a log scale


class ReportError(Exception):
    """The report cannot be made: one line says why."""


def read_records(paths: list[str | Path]) -> list[dict]:
    """result.json of every run under ``paths``, each with its run dir and its W&B run ids."""
    records = {}
    for path in map(Path, paths):
        for result in sorted(path.rglob("result.json")):
            try:
                record = json.loads(result.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                run_dir = result.parent.resolve()
                record["wandb_ids"] = wandb_run_ids(run_dir)
                records[run_dir] = record
    return [records[key] for key in sorted(records)]


def wandb_run_ids(run_dir: Path) -> list[str]:
    """The W&B runs a run dir logged to (a resumed run logs to the same id again)."""
    ids = []
    for entry in sorted((run_dir / "wandb").glob("*run-*")):
        match = WANDB_RUN_DIR.fullmatch(entry.name)
        if match and match.group(1) not in ids:
            ids.append(match.group(1))
    return ids


def pareto_wandb_cfg(paths: list[str | Path], out: Path, *, mode: str | None = None, project: str | None = None,
                     group: str | None = None) -> dict:
    """W&B settings of `moebench pareto`: what the command line gives, else what the runs used.
    Runs that all had W&B disabled give mode disabled: aggregating them creates no W&B run."""
    configs = [record.get("config") or {} for record in read_records(paths)]

    def common(key: str):
        values = {(config.get("wandb") or {}).get(key) for config in configs}
        return values.pop() if len(values) == 1 else None

    return {"mode": mode or runs_wandb_mode(configs), "project": project or common("project") or "moebench",
            "entity": common("entity"), "group": group or sweep_group(Path(out).resolve())}


def axis_is_log(values: list[float]) -> bool:
    positive = [v for v in values if isinstance(v, (int, float)) and v > 0]
    return bool(positive) and max(positive) / min(positive) > LOG_AXIS_SPAN


def report_spec(records: list[dict], *, entity: str | None, project: str, title: str, source: str,
                pareto_run_id: str | None = None) -> dict:
    """What the report shows, as plain data: one scatter of top-1 against each cost axis,
    over the sweep's W&B training runs (selected by id), grouped (coloured) by router; and
    the pareto run's plot (frontier, arm means, error bars) when its id is given."""
    done = [r for r in records if r.get("status") == "completed" and r.get("wandb_ids")]
    if not done:
        raise ReportError(f"no completed run under {source} was logged to W&B (wandb.mode=disabled?): "
                          "nothing to put in a report")
    routers: dict[str, int] = {}
    for record in done:
        router = ((record.get("config") or {}).get("router") or {}).get("name", "?")
        routers[router] = routers.get(router, 0) + 1
    panels = []
    for metric, label in COST_METRICS.items():
        key = metric.split("/", 1)[1]
        values = [(r.get("cost") or {}).get(key) for r in done]
        panels.append({"title": f"test top-1 vs {label}", "x": metric, "y": QUALITY_METRIC,
                       "log_x": axis_is_log(values)})
    ids = sorted({run_id for record in done for run_id in record["wandb_ids"]})
    counts = ", ".join(f"{router} {n}" for router, n in sorted(routers.items()))
    return {
        "entity": entity,
        "project": project,
        "title": title[:128],  # W&B's limit
        "description": f"Pareto view of {len(done)} runs ({counts}) from {source}",
        "run_ids": ids,
        "group_by": f"config.{ROUTER_KEY}",
        "panels": panels,
        "notes": (f"Each point is one training run; colour = router ({counts}). "
                  f"The frontier itself is in pareto.csv / pareto.png next to `{source}`."),
        "pareto_run_id": pareto_run_id,
        "pareto_media": PARETO_PLOT_KEY,
    }


def build_report(spec: dict):
    """The wandb-workspaces Report for ``spec`` (not saved)."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise ReportError("--wandb-report needs the wandb-workspaces package: pip install 'moebench[report]'") from None
    kwargs = {"entity": spec["entity"]} if spec["entity"] else {}  # else W&B's default entity (online)
    report = wr.Report(project=spec["project"], title=spec["title"], description=spec["description"], **kwargs)
    ids = ", ".join(f"'{run_id}'" for run_id in spec["run_ids"])
    runset = wr.Runset(entity=report.entity, project=spec["project"], name="sweep",
                       filters=f"ID in [{ids}]", groupby=[spec["group_by"]])
    panels = [wr.ScatterPlot(title=p["title"], x=wr.SummaryMetric(p["x"]), y=wr.SummaryMetric(p["y"]),
                             log_x=p["log_x"], layout=wr.Layout(x=12 * (i % 2), y=8 * (i // 2), w=12, h=8))
              for i, p in enumerate(spec["panels"])]
    report.blocks = [wr.P(spec["notes"]), wr.PanelGrid(runsets=[runset], panels=panels)]
    if spec.get("pareto_run_id"):
        pareto_run = wr.Runset(entity=report.entity, project=spec["project"], name="pareto",
                               filters=f"ID in ['{spec['pareto_run_id']}']")
        plot = wr.MediaBrowser(title="pareto.png", media_keys=[spec["pareto_media"]],
                               layout=wr.Layout(x=0, y=0, w=24, h=12))
        report.blocks.append(wr.PanelGrid(runsets=[pareto_run], panels=[plot]))
    return report


def save_report(spec: dict) -> str:
    """Save the report to W&B; returns its URL."""
    try:
        report = build_report(spec)  # without an entity, asks W&B for the default one
        report.save()
        return report.url
    except ReportError:
        raise
    except Exception as err:  # not logged in, network, permissions: W&B's own message, on one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ReportError(f"could not save the W&B report: {first}") from None


def main(paths: list[str | Path], out: Path, wandb_cfg: dict, pareto_run_id: str | None = None) -> int:
    """`moebench pareto --wandb-report`, after the pareto files are written."""
    if wandb_cfg.get("mode") != "online":
        print(f"moebench: pareto: --wandb-report needs W&B online (mode is {wandb_cfg.get('mode')}; "
              "pass --wandb-mode online after `wandb login`, and `wandb sync` offline runs first): no report made",
              file=sys.stderr)
        return 0
    try:
        spec = report_spec(read_records(paths), entity=wandb_cfg.get("entity"), project=wandb_cfg["project"],
                           title=f"moebench pareto: {wandb_cfg.get('group') or Path(out).name}",
                           source=str(out), pareto_run_id=pareto_run_id)
        url = save_report(spec)
    except ReportError as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 1
    print(f"W&B report: {url}")
    return 0
