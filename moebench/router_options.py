"""What a config may say about each built-in router: its options' types and ranges, and the rules
between them, declared without torch.

`moebench train` checks a command line against these before it imports torch (seconds, tens of
seconds on a loaded machine), so a refusal prints its line at once. Each router's module
(moebench/moe/) registers its ``Router`` with these same objects, so the check before torch and
the one after (build.validate, through the registry) cannot disagree. A router from outside
moebench (MOEBENCH_PLUGINS) is declared by its own module, which imports torch anyway: once
moebench.moe is loaded, ``declared`` asks the registry, which knows every router.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from .specs import BOOL, ROUNDING, Choice, Float, Int, Positive, Spec

Options = dict[str, Any]  # a router's config without name and lr_mult (the optimizer's)


def no_rule(options: Options) -> str | None:
    return None


def no_size_rule(options: Options, dim: int, hidden_dim: int) -> str | None:
    return None


def none_ignored(options: Options) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Declared:
    """The config side of a router (registry.Router carries the same fields)."""
    options: dict[str, Spec]  # option key -> type and range
    check: Callable[[Options], str | None] = no_rule  # rules between options: the error line, or None
    check_sizes: Callable[[Options, int, int], str | None] = no_size_rule  # and with the layer's (dim, hidden_dim)
    ignored: Callable[[Options], tuple[str, ...]] = none_ignored  # options these values make inert (duplicate jobs)
    caveat: Callable[[Options], str | None] = no_rule  # a setting that trains, but not as one may expect: the warning


SOFT_MODES = ("soft", "uniform", "identity")  # Soft MoE's dispatch and combine (the paper's Table 2 ablations)
SOFT = Declared({
    "num_experts": Int(1), "slots_per_expert": Int(1), "slot_factor": Positive(nullable=True),
    "normalize": BOOL, "scale_init": Float(), "identical_init": BOOL,
    "dispatch": Choice(*SOFT_MODES), "combine": Choice(*SOFT_MODES), "dispatch_normalized": Spec("bool", nullable=True)})

# The options Tokens and Experts Choice share.
GROUPED_OPTIONS = {"num_experts": Int(1), "capacity_factor": Positive(), "group_size": Int(1), "noise_std": Float(0),
                   "capacity_rounding": ROUNDING, "identical_init": BOOL}

# Tokens Choice's keys that came later default to null, which means these (runs made before them pool with null ones).
TOKENS_CHOICE_DEFAULTS = {"assignment": "softmax", "gate": "softmax", "routed_scaling": 1.0, "bias_rate": 0.0,
                          "shared_experts": 0, "granularity": 1, "load_weight": 0.005}


def tokens_choice_problem(r: Options, hidden_dim: int | None = None) -> str | None:
    """The rules between Tokens Choice options (and the expert width, when known): the error line, or None."""
    r = {**TOKENS_CHOICE_DEFAULTS, **{key: value for key, value in r.items() if value is not None}}
    experts, k, m, shared = r["num_experts"], r["k"], r["granularity"], r["shared_experts"]
    if not 1 <= k <= experts:
        return f"k (router.k) must be in [1, experts={experts}], got {k}"
    if m < 1:
        return f"router.granularity must be >= 1, got {m}"
    if shared < 0 or shared >= k * m:
        return (f"router.shared_experts={shared} must be in [0, k * granularity = {k * m}): the shared experts "
                f"(width hidden/granularity each) take that many of a token's {k * m} expert choices, and at least "
                "one must stay routed")
    if hidden_dim is not None and hidden_dim % m:
        return f"router.granularity={m} must divide the expert width (model.mlp_dim={hidden_dim})"
    if r["gate"] not in ("softmax", "sigmoid"):
        return f"router.gate must be softmax or sigmoid, got {r['gate']!r}"
    if r["assignment"] not in ("softmax", "sinkhorn"):
        return f"router.assignment must be softmax or sinkhorn, got {r['assignment']!r}"
    if not r["routed_scaling"] > 0:
        return f"router.routed_scaling must be > 0, got {r['routed_scaling']}"
    if r["bias_rate"] < 0:
        return f"router.bias_rate must be >= 0 (0: off), got {r['bias_rate']}"
    if r["assignment"] == "sinkhorn" and r["gate"] != "softmax":
        return ("router.gate=sigmoid and router.assignment=sinkhorn do not combine: Sinkhorn Tokens Choice "
                "weights its pairs by the softmax (Liu et al. 2024)")
    if r["assignment"] == "sinkhorn" and r["bias_rate"] > 0:
        return ("router.bias_rate > 0 and router.assignment=sinkhorn do not combine: the transport plan, not "
                "a biased score, chooses the experts")
    if r["bias_rate"] > 0 and r["load_weight"]:
        return (f"router.load_weight={r['load_weight']} with router.bias_rate > 0: V-MoE's load loss is the "
                "chance of a selection without the bias; set router.load_weight=0 (the bias balances the load)")
    return None


def tokens_choice_caveat(r: Options) -> str | None:
    """The sigmoid gate with one routed choice: renormalised over that one choice, every gate is exactly 1."""
    r = {**TOKENS_CHOICE_DEFAULTS, **{key: value for key, value in r.items() if value is not None}}
    if r["gate"] == "sigmoid" and r["k"] * r["granularity"] - r["shared_experts"] == 1:
        return ("router.gate=sigmoid with one routed choice per token: the gate, the chosen score over the chosen "
                "scores' sum, is 1 for every token, so the loss gives the router no gradient (it keeps its initial "
                "weights, moved only by weight decay and any auxiliary loss); route more than one choice or use "
                "the softmax")
    return None


def tokens_choice_ignored(r: Options) -> tuple[str, ...]:
    """Tokens Choice's options that change nothing at these values: capacity and BPR order drops, and a
    dropless layer drops nothing; the plan's iterations matter only to a plan."""
    ignored = ("capacity_factor", "capacity_rounding", "bpr") if r.get("dropless") else ()
    return ignored + (("plan_iterations",) if r.get("assignment") in (None, "softmax") else ())


def experts_choice_ignored(r: Options) -> tuple[str, ...]:
    """Experts Choice's plan options outside the plans that read them (Adam's rate: sparse_ot's only)."""
    assignment = r.get("assignment") or "softmax"
    return (("plan_iterations",) if assignment == "softmax" else ()) + (("plan_lr",) if assignment != "sparse_ot" else ())


TOKENS_CHOICE = Declared(
    {**GROUPED_OPTIONS, "k": Int(1), "bpr": BOOL, "importance_weight": Float(0), "load_weight": Float(0),
     "switch_weight": Float(0), "z_loss_weight": Float(0), "assignment": Choice("softmax", "sinkhorn", nullable=True),
     "plan_iterations": Int(1, nullable=True),
     # DeepSeek's pieces: null is off (the keys came later; runs made before them pool with null ones)
     "gate": Choice("softmax", "sigmoid", nullable=True), "routed_scaling": Positive(nullable=True),
     "bias_rate": Float(0, nullable=True), "shared_experts": Int(0, nullable=True),
     "granularity": Int(1, nullable=True),
     "dropless": Spec("bool", nullable=True)},  # null: capacity (MegaBlocks' dropless path when true)
    check=lambda r: tokens_choice_problem(r),
    check_sizes=lambda r, dim, hidden_dim: tokens_choice_problem(r, hidden_dim),  # granularity divides the width
    ignored=tokens_choice_ignored,
    caveat=tokens_choice_caveat,
)

EXPERTS_CHOICE = Declared({**GROUPED_OPTIONS, "assignment": Choice("softmax", "sinkhorn", "sparse_ot", nullable=True),
                           "plan_iterations": Int(1, nullable=True), "plan_lr": Positive(nullable=True)},
                          ignored=experts_choice_ignored)

DENSE = Declared({"mlp_mult": Int(1)})


def remoe_problem(r: Options) -> str | None:
    """The rules between ReMoE's options: the error line, or None."""
    experts, k = r["num_experts"], r["k"]
    if not 1 <= k < experts:
        return (f"k (router.k) must be in [1, experts={experts}) for remoe: the target sparsity 1 - k/experts "
                f"must lie in (0, 1), got k={k}")
    if r.get("l1_init") is not None and not r["l1_init"] > 0:
        return f"router.l1_init must be > 0 (lambda only ever multiplies), got {r['l1_init']}"
    if r.get("l1_factor") is not None and not r["l1_factor"] > 1:
        return f"router.l1_factor must be > 1 (lambda's step up or down), got {r['l1_factor']}"
    return None


REMOE = Declared({"num_experts": Int(1), "k": Int(1), "l1_init": Positive(), "l1_factor": Positive(),
                  "identical_init": BOOL}, check=remoe_problem)

# In the registry's order (Router.order), so that a refusal lists them as it does after torch is loaded.
BUILTIN = {"soft": SOFT, "tokens_choice": TOKENS_CHOICE, "experts_choice": EXPERTS_CHOICE, "dense": DENSE,
           "remoe": REMOE}


def _registry():
    """moebench.moe.registry if something already imported it (torch is then loaded), else None."""
    return sys.modules.get("moebench.moe.registry")


def declared(name: str | None) -> Declared | None:
    """The options and rules of the router ``name`` (a ``Declared`` or a registry ``Router``), None if unknown."""
    registry = _registry()
    return registry.find(name) if registry is not None else BUILTIN.get(name)


def names() -> list[str]:
    registry = _registry()
    return registry.names() if registry is not None else list(BUILTIN)


def unknown_router(name: str | None) -> str:
    """The refusal of a router name nothing declares (registry.get's, word for word)."""
    return f"router.name={name!r} is unknown; allowed: {', '.join(names())}"
