"""`moebench train`'s command line, checked before Hydra starts a job.

Hydra reports a bad override as several lines (or, for a misspelled key,
suggests ``+key=value``, which then runs with the key unused). Here every job of
the command is composed first: override syntax, unknown groups and keys, and
value types end as one line naming the key and the nearest known one, before
any run dir exists. The same place pins what Hydra would otherwise compute in
each process (the sweep and run dirs, from one start time) and points a resumed
run at the dir it continues.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf

from . import arguments, invocation, plugins, resolvers, router_options, schema, search
from .datasource import DataError, check_source
from .errors import ConfigError

PASSTHROUGH_FLAGS = ("help", "hydra_help", "info", "shell_completion", "cfg", "experimental_rerun")
MAX_JOBS_CHECKED = 64  # bigger sweeps: every value of every swept key once


@dataclass
class Command:
    """The checked command: Hydra's argv and what a run needs to know about it."""
    args: list[str]
    multirun: bool = False
    run_dir: Path | None = None  # single runs: the pinned run dir
    sweep_dir: Path | None = None
    user_args: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # one line each, printed once by the caller

    def resume_command(self, run_dir: Path) -> str:
        """The command that continues ``run_dir`` (a single run) or the whole sweep."""
        dir_key = "hydra.sweep.dir" if self.multirun else "hydra.run.dir"
        kept = [a for a in self.user_args if not a.split("=", 1)[0].lstrip("+") in (dir_key, "resume")]
        where = f"hydra.sweep.dir={self.sweep_dir}" if self.multirun else f"resume={run_dir}"
        return " ".join([invocation.command(), shlex.join(["train", *kept, where])])


def quote(value: str) -> str:
    """A value for Hydra's override grammar, whatever characters a path holds."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Checked:
    """The command line as the checks from the config alone left it (``check_config``)."""
    args: list[str]  # the command line checked
    command: Command
    configs: list | None = None  # every job's composed config (None: nothing to compose, Hydra checks it)
    keys: set[str] = field(default_factory=set)  # the keys the command line sets
    init_jobs: list[dict] = field(default_factory=list)  # resolved configs that name init_from


def conf_dir() -> str:
    """conf/ ships inside the installed package as moebench/conf; in a source
    checkout (editable install) it is the repository's top-level conf/."""
    installed = Path(__file__).resolve().parent / "conf"
    return str(installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "conf")


def check_config(args: list[str], config_dir: str) -> Checked:
    """The checks of ``args`` that read the config alone: override syntax, groups and keys, every value's
    type and range, search objectives, where the data must be and, for a single run, the router's name
    and the rules between its options. UserError (one line) when one fails.

    Nothing here imports torch (seconds, tens of seconds on a loaded machine): the CLI runs these first,
    so that a refusal prints at once, and ``prepare`` then continues from the configs composed here.
    Needs conf/train.yaml's resolvers registered (resolvers.register).
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed_args = get_args_parser().parse_args(args)
    except SystemExit:  # a bad flag: Hydra's own parser says so (once)
        return Checked(list(args), Command(list(args)))
    command = Command(list(args), multirun=bool(parsed_args.multirun), user_args=list(args))
    checked = Checked(list(args), command)
    if any(getattr(parsed_args, flag, None) for flag in PASSTHROUGH_FLAGS) or parsed_args.config_dir \
            or parsed_args.config_name or parsed_args.config_path:
        return checked
    overrides = list(parsed_args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse the overrides: {one_line(err)}") from None
    check_experiment_values(parsed, config_dir)
    jobs = job_overrides(parsed, command.multirun)
    if not jobs:  # a range or interval sweep: Hydra's sweeper checks it
        return checked
    checked.keys = {o.get_key_element().lstrip("+~") for o in parsed}
    checked.configs, defaults, same_run = [], {}, {}
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        for job in jobs:
            cfg = compose_job(job)
            if command.multirun:
                same_run.setdefault(run_identity(cfg), []).append(job)
            checked.configs.append(cfg)
            groups = tuple(o for o in job if is_group_choice(o))
            if groups not in defaults:  # conf/'s values for these groups: the types of unlisted keys
                defaults[groups] = compose_job(list(groups))
            known = sorted(schema.flatten(resolve(defaults[groups], quiet=True)))
            for o in job:
                key = o.split("=", 1)[0]
                if key.startswith("+") and not key.lstrip("+").startswith("hydra") \
                        and not any(k == key.lstrip("+") or k.startswith(key.lstrip("+") + ".") for k in known):
                    raise schema.unknown_key_error(key.lstrip("+"), known)
            config = resolve(cfg)
            schema.check(config, resolve(defaults[groups], quiet=True))
            arguments.check_eval_probe(config)  # (the app checks it again: torchrun's ranks skip this)
            search.check(cfg)  # objective names; under hydra/sweeper=optuna, one fitting direction each
            check_data(cfg, command.warnings)
            caveat = router_caveat(config)
            if caveat and caveat not in command.warnings:  # once for a sweep
                command.warnings.append(caveat)
            if not command.multirun:  # under -m a job with a bad router fails alone, in the sweep
                check_router(config)
            if cfg.get("init_from"):
                checked.init_jobs.append(config)
    command.warnings += repeated_job_warnings(same_run.values())
    return checked


def check_router(config: dict) -> None:
    """The router is known and its options agree with each other: build.validate's first rules, with
    the same lines (the rules with the model's sizes wait for validate, after the model's own)."""
    name = config["router"].get("name")
    router = router_options.declared(name)
    if router is None:  # not a built-in declared there: the registry has the last word, at torch's price
        plugins.load()  # a router of MOEBENCH_PLUGINS, when called without the CLI (which loaded them)
        from .moe import registry

        router = registry.find(name)
    if router is None:
        raise ConfigError(router_options.unknown_router(name))
    problem = router.check({key: value for key, value in config["router"].items() if key not in ("name", "lr_mult")})
    if problem:
        raise ConfigError(problem)


def prepare(args: list[str], config_dir: str, validate=None, fits=None, checked: Checked | None = None) -> Command:
    """Check ``args`` and return the argv to give Hydra. Raises UserError (one line) when they are wrong.
    ``validate``: the cross-key rules (single runs; under -m they fail only their job); ``fits``: the
    memory estimate (every job: a run that cannot fit refuses the whole command). ``checked``: what
    ``check_config`` already found for these ``args`` (else it runs here)."""
    resolvers.register()  # Hydra's keys (run and sweep dirs) interpolate ${moebench_now:}
    if checked is None or checked.args != list(args):
        checked = check_config(args, config_dir)
    command, configs = checked.command, checked.configs
    if configs is None:
        return command
    from . import checkpoint  # torch: after the checks above, which refuse without it

    for cfg in configs:
        if validate is not None and not command.multirun:
            validate(cfg)  # (memory included)
        elif fits is not None:
            fits(cfg)

    first, keys = configs[0], checked.keys
    hydra_cfg = first.hydra
    if command.multirun:
        if "hydra.sweep.dir" not in keys:  # every launcher's workers would compute their own otherwise
            command.args.append(f"hydra.sweep.dir={quote(str(hydra_cfg.sweep.dir))}")
        command.sweep_dir = Path(str(hydra_cfg.sweep.dir))
        if not command.sweep_dir.is_dir():  # a sweep dir that exists is resumed: its jobs may not re-read it
            check_init_from(checked.init_jobs)
        return command

    run_dir = Path(str(hydra_cfg.run.dir))
    resume = first.get("resume")
    if resume:
        ckpt_file = checkpoint.checkpoint_path(str(resume))
        ckpt = checkpoint.load_checkpoint(ckpt_file, quiet=True)  # the run says it if it uses last.pt.prev
        checkpoint.check_resume_config(ckpt["config"], resolve(first), ckpt_file)
        run_dir = ckpt_file.parent  # a resumed run writes everything (.hydra/, train.log too) where it began
        command.args = [a for a in command.args if a.split("=", 1)[0].lstrip("+") != "hydra.run.dir"]
        command.args.append(f"hydra.run.dir={quote(str(run_dir))}")
    else:
        check_previous_run(run_dir, resolve(first))
        if not (run_dir / "last.pt").is_file() and not (run_dir / "result.json").is_file():  # else resumed/done
            check_init_from(checked.init_jobs)
        if "hydra.run.dir" not in keys:
            command.args.append(f"hydra.run.dir={quote(str(run_dir))}")
    command.run_dir = run_dir
    return command


def run_identity(cfg) -> str:
    """What a job trains: its resolved config without the shortcut keys (experts, k, ...), which act
    only through the router keys they feed, and without the router options its router ignores at these
    values (``ignored`` in router_options.py: capacity under ``dropless``). Two jobs with one identity
    train the same run."""
    resolved = resolve(cfg, quiet=True)
    config = schema.flatten(resolved)
    router = resolved.get("router") or {}
    declared = router_options.declared(router.get("name")) if isinstance(router, dict) else None
    ignored = getattr(declared, "ignored", None)  # a plugin router may predate the field
    inert = {f"router.{key}" for key in ignored(router)} if ignored is not None else set()
    return json.dumps({key: value for key, value in config.items() if key not in schema.UNCHECKED and key not in inert},
                      sort_keys=True, default=str)


def router_caveat(config: dict) -> str | None:
    """The router's warning for options that train, but not as one may expect (``caveat`` in router_options.py);
    None for options its rules refuse (the refusal says why)."""
    router = config.get("router") or {}
    declared = router_options.declared(router.get("name"))
    caveat = getattr(declared, "caveat", None)  # a plugin router may predate the field
    options = {key: value for key, value in router.items() if key not in ("name", "lr_mult")}
    return caveat(options) if caveat is not None and declared.check(options) is None else None


def repeated_job_warnings(groups) -> list[str]:
    """One line per set of jobs that would train the same run, e.g. `router=dense experts=8,32`:
    dense has no experts, so the two jobs repeat one run (pareto then counts it once, as one seed)."""
    warnings = []
    for jobs in groups:
        if len(jobs) < 2:
            continue
        common = set(jobs[0]).intersection(*map(set, jobs[1:]))
        differing = sorted({o.split("=", 1)[0] for job in jobs for o in job if o not in common})
        shown = " | ".join(" ".join(o for o in job if o not in common) for job in jobs)
        warnings.append(f"{len(jobs)} jobs train the same run ({shown}): "
                        f"{', '.join(differing)} change{'s' if len(differing) == 1 else ''} nothing for {' '.join(sorted(common)) or 'them'}; "
                        "each repeats the first, and moebench pareto counts them as one run")
    return warnings


GROUPS = ("model", "router", "data", "experiment", "variant")


def is_group_choice(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in GROUPS or "/" in key


def check_data(cfg, warnings: list[str]) -> None:
    """The data must be where data.root says before any run dir exists (the checks that read no images)."""
    d = cfg.data
    try:
        warning = check_source(d.name, d.get("root"), bool(d.get("download")))
    except DataError as err:
        raise ConfigError(str(err)) from None
    if warning and warning not in warnings:
        warnings.append(warning)


def check_experiment_values(parsed, config_dir: str) -> None:
    """experiment= names a preset of conf/experiment/; a path gets told how Hydra takes a config file."""
    for o in parsed:
        if o.get_key_element().lstrip("+~") != "experiment":
            continue
        values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [str(o.value())]
        for value in values:
            if "/" in value or value.endswith((".yaml", ".yml")):
                presets = sorted(p.stem for p in (Path(config_dir) / "experiment").glob("*.yaml"))
                raise ConfigError(
                    f"experiment={value}: experiment= takes a preset name, not a path; allowed: {', '.join(presets)}. "
                    "For a preset file of your own, put it at DIR/experiment/NAME.yaml and run "
                    "`moebench train --config-dir DIR experiment=NAME` (Hydra's --config-dir adds DIR to the "
                    "search path; --config-dir DIR --config-name NAME would make DIR/NAME.yaml the whole config)")


def check_previous_run(run_dir: Path, config: dict) -> None:
    """Running again into a run dir continues (or skips) the run there: only if it is the same experiment."""
    from . import checkpoint  # torch

    result_file = run_dir / "result.json"
    try:
        previous = json.loads(result_file.read_text()) if result_file.is_file() else {}
    except (OSError, ValueError):
        previous = {}
    if previous.get("status") == "completed" and previous.get("config"):
        checkpoint.check_resume_config(previous["config"], config, result_file)
    elif (run_dir / "last.pt").is_file():
        ckpt = checkpoint.load_checkpoint(run_dir / "last.pt", quiet=True)
        checkpoint.check_resume_config(ckpt["config"], config, run_dir / "last.pt")


def check_init_from(configs: list[dict]) -> None:
    """init_from names a readable checkpoint of a dense run with this backbone (each file read once)."""
    from . import upcycle  # torch
    cache: dict = {}
    for config in configs:
        if config.get("init_from") and not config.get("resume"):  # resume wins: never re-initialised
            upcycle.load_source(str(config["init_from"]), config, cache)


def job_overrides(parsed, multirun: bool) -> list[list[str]]:
    """The override lists of the command's jobs (a sample of a big sweep: each value once)."""
    per_key = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not multirun:
                raise ConfigError(f"{o.input_line}: a sweep (several values) needs -m/--multirun")
            if not o.is_discrete_sweep():
                return []
            per_key.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            per_key.append([o.input_line])
    jobs = [list(job) for job in itertools.islice(itertools.product(*per_key), MAX_JOBS_CHECKED + 1)]
    if len(jobs) <= MAX_JOBS_CHECKED:
        return jobs
    first = [values[0] for values in per_key]
    return [first[:i] + [value] + first[i + 1:] for i, values in enumerate(per_key) for value in values]


def compose_job(overrides: list[str]):
    try:
        return compose("train", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as err:
        missing = err.missing_cfg_file or ""
        group, _, name = missing.rpartition("/")
        if err.options and group:
            raise ConfigError(f"{group}={name} is unknown; allowed: {', '.join(err.options)}") from None
        raise ConfigError(one_line(err)) from None
    except HydraException as err:
        match = re.search(r"Could not override '([^']+)'", str(err))
        if match:
            key = match.group(1)
            base = compose("train", overrides=[o for o in overrides if not o.startswith(key + "=")],
                           return_hydra_config=False) if overrides else None
            known = sorted(schema.flatten(OmegaConf.to_container(base, resolve=False))) if base is not None else []
            raise schema.unknown_key_error(key, [*known, *GROUPS]) from None
        raise ConfigError(one_line(err)) from None


def resolve(cfg, quiet: bool = False) -> dict:
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)  # Hydra's own keys resolve only inside a job
    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except Exception as err:  # a broken interpolation, e.g. ${nope}
        if quiet:
            return {}
        raise ConfigError(f"cannot resolve the config: {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kept = []
    for line in lines:
        if line.startswith(("Config search path", "full_key", "object_type", "reference_type", "See https")):
            break
        kept.append(line)
    return " ".join(kept) or type(err).__name__
