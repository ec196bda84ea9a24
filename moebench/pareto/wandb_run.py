"""The pareto W&B run: tables of runs and arms, a scatter per cost axis and the PNG.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


from .records import COST_AXES


def pareto_run_id(run_dir: Path, wandb_cfg: dict) -> str:
    """The W&B id of the pareto run of ``run_dir``: the same for every `moebench pareto` call on
    that dir (and project), so a second call updates its run instead of adding another to the group."""
    key = "|".join([str(Path(run_dir).resolve()), str(wandb_cfg.get("entity")), str(wandb_cfg.get("project"))])
    return "pareto-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def log_wandb(rows: list[dict], arms: list[dict], png: Path, wandb_cfg: dict, run_dir: Path) -> str | None:
    """One W&B run (job_type pareto) with tables of runs and arms, a scatter per cost axis and the PNG."""
    if not wandb_cfg or wandb_cfg.get("mode", "disabled") == "disabled":
        return None
    import wandb

    run = wandb.init(
        project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), group=wandb_cfg.get("group"),
        name=f"pareto-{wandb_cfg.get('group') or run_dir.name}", job_type="pareto", dir=str(run_dir),
        id=pareto_run_id(run_dir, wandb_cfg), resume="allow",
        mode=wandb_cfg["mode"], reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True),
    )

    def table(records: list[dict]):
        columns = list(records[0]) if records else []
        return wandb.Table(columns=columns, data=[[str(r[c]) if isinstance(r[c], list) else r[c] for c in columns]
                                                  for r in records])

    runs_table = table(rows)
    axes = [axis for axis in COST_AXES if rows and axis in rows[0]]
    charts = {f"pareto/top1_vs_{axis}": wandb.plot.scatter(runs_table, axis, "top1", title=f"top-1 vs {COST_AXES[axis].label}")
              for axis in axes}
    run.log({"pareto/runs": runs_table, "pareto/arms": table(arms), **charts, "pareto/plot": wandb.Image(str(png))})
    run_id = run.id
    run.finish()
    return run_id
