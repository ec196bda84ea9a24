"""Multi-objective search of the cost/quality frontier: ``hydra/sweeper=optuna``.

The Optuna sweeper (hydra-optuna-sweeper, ``pip install 'moebench[optuna]'``;
preset conf/hydra/sweeper/optuna.yaml) asks for trials and moebench trains each
as an ordinary sweep job (run dir, records, skip-if-completed, Pareto files at
the end). What the study sees is the job's return value: the values of
``search.objectives`` read off the run's record, in the order of
``hydra.sweeper.direction``. A run that did not complete (failed, diverged,
stopped) or lacks an objective raises ``TrialFailed`` from the job, which the
sweeper records as a failed trial (``TrialState.FAIL``) and the study goes on.
Under any other sweeper the job returns nothing, as before.

The frontier ``moebench pareto --quality <quality objective>`` draws over the
study's sweep dir is the study's Pareto set: both use the same recorded values
and the same dominance rule, and only completed runs count.
"""

from __future__ import annotations

import math

from hydra.types import RunMode
from omegaconf import OmegaConf

from .errors import ConfigError

# Objective name -> direction. Qualities are read from result.json's quality record,
# costs from its cost record as `moebench pareto` reads its cost axes.
QUALITY_OBJECTIVES = ("val_top1_best", "top1", "top1_at_best_val")
COST_OBJECTIVES = ("gflops_per_image", "params_total", "infer_ms_per_image", "train_ms_per_image",
                   "train_peak_mb", "infer_peak_mb")
DIRECTIONS = {**{name: "maximize" for name in QUALITY_OBJECTIVES}, **{name: "minimize" for name in COST_OBJECTIVES}}
PLUGIN_NODE = "optuna_plugin"  # where the plugin's own hydra/sweeper/optuna config is re-registered


class TrialFailed(Exception):
    """Raised from a job under the Optuna sweeper: the trial is recorded as failed, the study goes on."""


def is_optuna(sweeper) -> bool:
    """Is this Hydra sweeper config (hydra.sweeper) Optuna's?"""
    return sweeper is not None and "optuna" in str(OmegaConf.select(sweeper, "_target_", default="") or "")


def in_study(hydra_cfg) -> bool:
    """Is this job a trial of an Optuna study (a -m sweep under hydra/sweeper=optuna)?"""
    return hydra_cfg.mode == RunMode.MULTIRUN and is_optuna(hydra_cfg.sweeper)


def prepare_preset(args: list[str]) -> None:
    """Make ``hydra/sweeper=optuna`` pick conf/hydra/sweeper/optuna.yaml.

    The plugin registers a structured config of that name with a defaults list, and
    Hydra refuses a config file named like such a config (automatic schema matching).
    So, once Hydra has scanned its plugins (once per process), the plugin's config is
    moved to hydra/sweeper/optuna_plugin, which the preset extends.
    """
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # the plugins register their configs now, never again in this process
    store = ConfigStore.instance()
    sweepers = store.repo.get("hydra", {}).get("sweeper", {})
    node = sweepers.get("optuna.yaml")
    if node is not None and node.provider == "optuna_sweeper":
        del sweepers["optuna.yaml"]
        store.store(group="hydra/sweeper", name=PLUGIN_NODE, node=node.node, provider=node.provider)
    wanted = any(arg.lstrip("+").replace(" ", "") in ("hydra/sweeper=optuna",) for arg in args)
    if wanted and f"{PLUGIN_NODE}.yaml" not in sweepers:
        raise ConfigError("hydra/sweeper=optuna needs the Optuna sweeper plugin: pip install 'moebench[optuna]'")


def directions_of(sweeper) -> list[str]:
    direction = OmegaConf.select(sweeper, "direction", default=None)
    directions = list(direction) if OmegaConf.is_list(direction) or isinstance(direction, list) else [direction]
    return [str(getattr(d, "name", d)) for d in directions]


def check(cfg) -> None:
    """``search.objectives`` names known objectives and, under the Optuna sweeper, fits
    ``hydra.sweeper.direction`` (one direction per objective, each the objective's own)."""
    objectives = OmegaConf.select(cfg, "search.objectives", default=None)
    allowed = ", ".join(DIRECTIONS)
    if not objectives:
        raise ConfigError(f"search.objectives must list at least one objective; allowed: {allowed}")
    names = [str(name) for name in objectives]
    for name in names:
        if name not in DIRECTIONS:
            raise ConfigError(f"search.objectives: {name!r} is unknown; allowed: {allowed}")
    if len(set(names)) < len(names):
        raise ConfigError(f"search.objectives lists an objective twice: {names}")
    sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None)
    if not is_optuna(sweeper):
        return
    directions, expected = directions_of(sweeper), [DIRECTIONS[name] for name in names]
    if directions != expected:
        raise ConfigError(
            f"hydra.sweeper.direction=[{','.join(directions)}] does not fit search.objectives=[{','.join(names)}]; "
            f"set hydra.sweeper.direction=[{','.join(expected)}] (qualities are maximized, costs minimized)")
    if OmegaConf.select(cfg, "data.val_fraction", default=1) == 0 and "val_top1_best" in names:
        raise ConfigError("search.objectives has val_top1_best but data.val_fraction=0 holds out no validation "
                          "split; set data.val_fraction > 0 or choose another quality objective")


def value(result: dict, name: str) -> float | None:
    """An objective's value in a run's record; None when missing or not finite."""
    if name in QUALITY_OBJECTIVES:
        raw = (result.get("quality") or {}).get(name)
    else:
        from .pareto.records import COST_AXES  # the cost axes as `moebench pareto` reads them

        try:
            raw = COST_AXES[name].value(result.get("cost") or {})
        except (KeyError, TypeError, ZeroDivisionError):
            raw = None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        return None
    return float(raw)


def objective_values(result: dict, names: list[str], run_dir: str) -> list[float]:
    """The values the study records for a run; ``TrialFailed`` when the run cannot be on a frontier."""
    if result.get("status") != "completed":
        error = result.get("error")
        raise TrialFailed(f"run {run_dir} ended {result.get('status')}{': ' + error if error else ''}")
    values = [value(result, name) for name in names]
    missing = [name for name, v in zip(names, values) if v is None]
    if missing:
        raise TrialFailed(f"run {run_dir} has no finite {', '.join(missing)} in its record")
    return values


def record(result: dict, cfg, hydra_cfg) -> None:
    """Under the Optuna sweeper, note in the run's record what the sweeper set for this trial and
    what the study saw: `moebench pareto` puts runs that differ only in those keys on one frontier."""
    if not in_study(hydra_cfg):
        return
    keys = [override.split("=", 1)[0].lstrip("+~") for override in hydra_cfg.overrides.task]
    names = [str(name) for name in cfg.search.objectives]
    result["search"] = {"sweeper": "optuna", "searched": sorted(keys), "objectives": names,
                        "values": [value(result, name) for name in names]}
