"""The typed schema of the train config: every value's type and range, checked before any work.

conf/ stays the single source of defaults and of which keys exist; this module
says what each value may be (a built-in router's options: router_options.py; a plugin's: its module).
Keys it does not list take the type of their default in conf/ (an int stays an
int, a bool a bool...). Cross-key rules
(k <= experts, divisibility by the number of processes...) are ``build.validate``'s.
"""

from __future__ import annotations

import difflib

from . import router_options
from .errors import ConfigError
from .specs import (  # noqa: F401 (the constructors: routers' modules and plugins import them from here)
    BOOL, ROUNDING, STR, Choice, Float, Int, Positive, Spec,
)

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")

SCHEMA: dict[str, Spec] = {
    "seed": Int(0), "deterministic": BOOL, "device": STR, "precision": Choice("fp32", "bf16"), "compile": BOOL,
    "resume": Spec("str", nullable=True), "threads": Int(1, choices=("auto",), nullable=True),
    "expert_parallel": BOOL, "init_from": Spec("str", nullable=True),
    # train
    "train.epochs": Int(1), "train.lr": Positive(), "train.weight_decay": Float(0), "train.betas": Spec("list", item="float"),
    "train.warmup_epochs": Float(0), "train.schedule": Choice("cosine", "rsqrt", "constant"),
    "train.grad_clip": Positive(nullable=True, infinite=True), "train.label_smoothing": Float(0, high=1), "train.log_every": Int(1),
    "train.time_limit_min": Float(0, nullable=True, infinite=True), "train.save_checkpoints": BOOL, "train.save_best": BOOL,
    "train.checkpoint_every_min": Positive(nullable=True), "train.checkpoint_every_steps": Int(1, nullable=True),
    "train.skip_nonfinite_steps": Int(0), "train.preempt_signals": Spec("list", item="str"),
    # cost
    "cost.batch_size": Int(1), "cost.warmup": Int(0), "cost.repeats": Int(1), "cost.skip_train_steps": Int(0),
    # wandb
    "wandb.mode": Choice("offline", "online", "disabled"), "wandb.project": STR,
    "wandb.entity": Spec("str", nullable=True), "wandb.group": Spec("str", nullable=True),
    "wandb.name": Spec("str", nullable=True), "wandb.tags": Spec("list"),
    # data
    "data.name": STR, "data.root": Spec("str", nullable=True), "data.download": BOOL, "data.image_size": Int(1),
    "data.num_train": Int(1, nullable=True), "data.num_test": Int(1, nullable=True), "data.val_fraction": Float(0, high=1),
    "data.batch_size": Int(1), "data.eval_batch_size": Int(1), "data.augment.crop_padding": Int(0),
    "data.augment.hflip": BOOL, "data.augment.randaugment": Int(0, high=30, nullable=True),
    "data.augment.randaugment_ops": Int(1, nullable=True), "data.augment.mixup": Positive(nullable=True),
    "data.augment.cutmix": Positive(nullable=True),
    # model
    # (null: the timm model's own value under model=timm; build.validate refuses it for moebench's ViT)
    "model.name": STR, "model.patch_size": Int(1, nullable=True), "model.dim": Int(1, nullable=True),
    "model.depth": Int(1, nullable=True), "model.heads": Int(1, nullable=True),
    "model.mlp_dim": Int(1, nullable=True), "model.pool": Choice("gap", "cls", nullable=True),
    "model.moe.placement": Choice("last", "every", "list"),
    "model.moe.n": Int(0, nullable=True), "model.moe.layers": Spec("list", item="int", nullable=True),
    "model.backbone": Choice("timm"), "model.img_size": Int(1), "model.drop_path": Float(0, high=1),
    "model.pretrained_file": Spec("str", nullable=True),
    # router: every router's own options are declared with the router (router_options.py, router_spec);
    # the shortcut keys are checked where a router uses them
    "router.name": STR, "router.lr_mult": Float(0),
    "search.objectives": Spec("list", item="str"),  # names: search.check
}
# What each key does to a run. Every key changes the result unless listed here; `moebench pareto`'s
# grouping of runs into arms (pareto.NEUTRAL_KEYS) and what a resume may change
# (checkpoint.RESUME_MAY_DIFFER) both derive from this one table, so they cannot disagree.
RESULT = "result"  # changes what is trained (every key not listed)
PER_RUN = "per-run"  # not what makes an arm, but fixed for a run's life: the seed (runs differing only in
# it are seeds of one arm) and policies that change nothing until they act (a resume keeps them)
LENGTH = "length"  # changes the result, but a resume may extend or shorten the run
BOOKKEEPING = "bookkeeping"  # where it logs, on what hardware, how long it may run, how it is measured
ROLES = {
    "seed": PER_RUN,
    "train.skip_nonfinite_steps": PER_RUN,  # a run that never has a non-finite step is the same run
    "train.epochs": LENGTH,
    **dict.fromkeys((
        "wandb", "resume", "threads", "device", "expert_parallel", "search",
        "eval",  # probes after training
        "cost",  # how the trained model's cost is measured
        "deterministic",  # bit-exact variants of the same algorithms
        "experts", "slots", "k", "capacity_factor",  # shortcuts: they count through the router keys they feed
        "data.root", "data.download", "data.eval_batch_size",
        "train.log_every", "train.time_limit_min", "train.save_checkpoints", "train.save_best",
        "train.checkpoint_every_min", "train.checkpoint_every_steps", "train.preempt_signals",
    ), BOOKKEEPING),
}
# The keys of a result that make a setup (one frontier): data, model, schedule and numerics. The
# MoE placement (model.moe) belongs to the router design, so it varies between arms of one setup.
SETUP_KEYS = ("data", "model", "train", "precision", "compile")
ARM_ONLY_KEYS = ("model.moe",)


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    """``key`` is one of ``prefixes`` or lies in one of those sections."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def role(key: str) -> str:
    """The role of a dotted key: its own entry in ROLES, else its nearest section's, else RESULT."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = ROLES.get(".".join(parts[:end]))
        if found:
            return found
    return RESULT


def keys_with(*roles: str) -> tuple[str, ...]:
    """The keys and sections of ROLES that have one of ``roles``."""
    return tuple(key for key, value in ROLES.items() if value in roles)


SHORTCUTS = {"router.num_experts": "experts", "router.slots_per_expert": "slots", "router.k": "k",
             "router.capacity_factor": "capacity_factor"}
UNCHECKED = ("experts", "slots", "k", "capacity_factor", "hydra")  # shortcuts: through the router keys


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, in the tree's order (an empty dict stays a leaf)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def inferred(default) -> Spec | None:
    """The spec of a key the schema does not list: its default's type."""
    if isinstance(default, bool):
        return BOOL
    if isinstance(default, int):
        return Int()
    if isinstance(default, float):
        return Float()
    if isinstance(default, str):
        return STR
    if isinstance(default, list):
        return Spec("list")
    return None  # null default: anything


def router_spec(key: str, config: dict) -> Spec | None:
    """The spec of ``router.<option>`` as the config's router declares it (router_options.declared)."""
    router = router_options.declared((config.get("router") or {}).get("name"))
    return router.options.get(key.split(".", 1)[1]) if router and key.startswith("router.") else None


def label(key: str) -> str:
    return f"{SHORTCUTS[key]} ({key})" if key in SHORTCUTS else key


def check(config: dict, defaults: dict | None = None) -> None:
    """Raise ConfigError for the first value of ``config`` (resolved, nested) of the wrong type or range.

    ``defaults``: the config as conf/ composes it for the same groups, for the
    types of keys the schema does not list.
    """
    flat, base = flatten(config), flatten(defaults or {})
    for key, value in flat.items():
        if key.split(".")[0] in UNCHECKED:
            continue
        spec = SCHEMA.get(key) or router_spec(key, config) or inferred(base.get(key))
        if spec is not None and not spec.accepts(value):
            raise ConfigError(f"{label(key)} must be {spec.allowed()}, got {value!r}")


def unknown_key_error(key: str, known: list[str]) -> ConfigError:
    """The error for a key conf/ does not have, naming the nearest one it has."""
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not near:  # compare the last part within the same section too: router.expert -> router.num_experts
        section, _, leaf = key.rpartition(".")
        siblings = [k for k in known if k.rpartition(".")[0] == section]
        leaves = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1, cutoff=0.5)
        near = [f"{section}.{leaves[0]}" if section else leaves[0]] if leaves else []
    if near:
        return ConfigError(f"unknown config key {key!r} (did you mean {near[0]}?)")
    return ConfigError(f"unknown config key {key!r}; `moebench train --help` lists the keys")
