"""Sparse upcycling (Komatsuzaki et al., 2023): start a run from a dense run's checkpoint.

``init_from=RUN_DIR|CHECKPOINT`` gives a freshly built model the weights of a dense
run before training starts:

- every weight outside the MoE layers (patch embedding, position embedding, class
  token, attention, norms, the dense MLPs of the other blocks, head) is copied;
- each MoE layer's experts all become copies of that block's dense MLP
  (``fc1``/``fc2`` weight and bias tiled into the stacked ``w1``/``b1``/``w2``/``b2``);
- the router's own parameters (Soft MoE ``phi`` and ``scale``, the Tokens/Experts
  Choice gate) keep their fresh initialisation, drawn from ``seed`` as in a run
  from scratch.

A dense target is a plain continuation (the control): every weight is copied.
Optimizer state and the learning-rate schedule start afresh in either case (this
is a new run, not a resume). The source must be a dense run whose backbone has the
same shape; anything else is refused with one line naming the key that differs.

What holds at the start (tests pin it): with copied experts every expert computes
the dense MLP, so a token's output is the dense MLP output of what the expert
receives, times the router's combine weights. Tokens Choice and Experts Choice
send raw tokens, so an upcycled layer outputs ``w * MLP(x)`` where ``w`` is the
summed gate of the experts that kept the token (top-1 without drops: the top
gate; k = E or Experts Choice with capacity_factor = E: 1, exactly the dense
model). Soft MoE sends slots that are mixes of tokens, and MLP(mix) is not the
mix of MLPs, so it does not start as the dense model (but for ``dispatch`` and
``combine`` = identity, where it does).

The record (result.json ``init_from``) carries what the cost axes need: the
training FLOPs of the source run up to that checkpoint (3 x its forward FLOPs per
image x the images it trained on) and, when the source was itself started with
``init_from``, its own init cost, so the chain adds up.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, cost
from .errors import CheckpointError
from .moe import registry

# Keys that fix the shapes of the backbone's weights: they must be those of the source run.
BACKBONE_KEYS = ("model.dim", "model.depth", "model.heads", "model.patch_size", "model.mlp_dim", "model.pool",
                 "data.image_size")
EXPERT_PARAMS = ("w1", "b1", "w2", "b2")
# What a shape mismatch of these weights means, for the message.
SHAPE_MEANING = {"head.weight": "number of classes", "head.bias": "number of classes",
                 "patch_embed.weight": "image channels"}


def source_path(init_from: str) -> Path:
    """The checkpoint file ``init_from`` names: a run dir's last.pt, or a .pt file."""
    path = Path(str(init_from)).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"init_from={init_from}: no checkpoint at {path} "
                              "(give a dense run's dir holding last.pt, or a .pt file)")
    return path


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def routes(router: str | None) -> bool:
    """Whether a run of ``router`` has MoE layers (the registry says; an unknown name counts as routed)."""
    known = registry.find(router)
    return known is None or known.routed


def check_source(source_config: dict, config: dict, path: Path) -> None:
    """Refuse a source that is not a dense run of the same backbone (one line naming the key)."""
    router = _get(source_config, "router.name")
    if routes(router):
        raise CheckpointError(f"init_from: {path} is a {router} run; upcycling starts from a dense run "
                              "(router=dense)")
    for key in BACKBONE_KEYS:
        old, new = _get(source_config, key), _get(config, key)
        if old != new:
            raise CheckpointError(f"init_from: {path} has {key}={old}, this run {key}={new}; upcycling needs "
                                  f"the same backbone ({', '.join(BACKBONE_KEYS)})")
    granularity = _get(config, "router.granularity")
    if granularity not in (None, 1):
        raise CheckpointError(f"init_from: router.granularity={granularity} makes experts model.mlp_dim/{granularity} "
                              "wide, so they cannot be copies of the dense MLP; upcycle with router.granularity=null")
    old_mult, new_mult = _get(source_config, "router.mlp_mult") or 1, _get(config, "router.mlp_mult") or 1
    if not routes(_get(config, "router.name")):
        if old_mult != new_mult:
            raise CheckpointError(f"init_from: {path} has router.mlp_mult={old_mult}, this run "
                                  f"router.mlp_mult={new_mult}; a dense continuation keeps the MLP width")
    elif old_mult != 1:
        raise CheckpointError(f"init_from: {path} has router.mlp_mult={old_mult}; experts are "
                              "model.mlp_dim wide, so upcycle from a dense run with router.mlp_mult=1")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents; a truncated, foreign or unreadable file is one line (as checkpoint.py does)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unpickling refused...
        raise CheckpointError(f"init_from: cannot read checkpoint {path}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise CheckpointError(f"init_from: {path} is not a moebench checkpoint (missing model/config)")
    checkpoint.verify(ckpt, path)
    return ckpt


def load_source(init_from: str, config: dict, cache: dict | None = None) -> tuple[Path, dict]:
    """The source checkpoint, read and checked against this run's resolved ``config``.
    ``cache`` (path -> checkpoint) spares reading one source again for every job of a sweep."""
    path = source_path(init_from)
    key = str(path.resolve())
    if cache is not None and key in cache:
        ckpt = cache[key]
    else:
        ckpt = read_checkpoint(path)
        if cache is not None:
            cache[key] = ckpt
    check_source(ckpt["config"], config, path)
    return path, ckpt


def moe_expert_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> the ``Experts`` of every layer whose MLP became experts."""
    from .moe import MoELayer

    return {name: module.experts for name, module in model.named_modules()
            if isinstance(module, MoELayer) and hasattr(module, "experts")}


def _shape_error(path: Path, key: str, old, new) -> CheckpointError:
    meaning = SHAPE_MEANING.get(key)
    return CheckpointError(f"init_from: {path} has {key} of shape {tuple(old)}, this model {tuple(new)}"
                           f"{f' (the {meaning} differ)' if meaning else ''}; upcycling needs the same backbone")


@torch.no_grad()
def upcycle_(model: nn.Module, source_state: dict, path: Path | str = "init_from") -> dict:
    """Load a dense ``source_state`` into ``model`` in place: every non-MoE weight copied, each MoE
    layer's experts set to copies of the dense MLP, router parameters left as they are.
    Returns what was done: ``copied`` (count), ``upcycled`` (MoE layer names), ``fresh`` (router
    parameter names)."""
    path = Path(path)
    layers = moe_expert_layers(model)
    target = model.state_dict()
    used, fresh = set(), []
    new_state = {}
    for key, tensor in target.items():
        layer = next((name for name in layers if key.startswith(name + ".")), None)
        if layer is None:  # outside every MoE layer (a dense MLP too): a plain copy
            if key not in source_state:
                raise CheckpointError(f"init_from: {path} has no {key}; upcycling needs a dense run of the "
                                      "same backbone")
            if source_state[key].shape != tensor.shape:
                raise _shape_error(path, key, source_state[key].shape, tensor.shape)
            new_state[key] = source_state[key]
            used.add(key)
        elif not key.startswith(f"{layer}.experts."):
            fresh.append(key)  # the router: phi, scale, gate
    for layer, experts in layers.items():
        fc = {}
        for part in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            key = f"{layer}.{part}"
            if key not in source_state:
                raise CheckpointError(f"init_from: {path} has no {key} (the dense MLP this MoE layer is "
                                      "upcycled from)")
            fc[part] = source_state[key]
            used.add(key)
        # nn.Linear computes x @ weight.T; the stacked experts compute x @ w1: w1[e] = weight.T.
        values = {"w1": fc["fc1.weight"].t(), "b1": fc["fc1.bias"], "w2": fc["fc2.weight"].t(),
                  "b2": fc["fc2.bias"]}
        for name in EXPERT_PARAMS:
            param = getattr(experts, name)
            if tuple(values[name].shape) != tuple(param.shape[1:]):
                raise _shape_error(path, f"{layer}.{'fc1' if name[1] == '1' else 'fc2'}."
                                   f"{'weight' if name[0] == 'w' else 'bias'}",
                                   values[name].shape, param.shape[1:])
            new_state[f"{layer}.experts.{name}"] = values[name].unsqueeze(0).expand_as(param)
    unused = sorted(set(source_state) - used)
    if unused:
        raise CheckpointError(f"init_from: {path} has {unused[0]}, which this model has no place for; "
                              "upcycling needs a dense run of the same backbone")
    for key, value in new_state.items():
        target[key].copy_(value)  # state_dict tensors share storage with the parameters
    return {"copied": len(new_state) - len(layers) * len(EXPERT_PARAMS), "upcycled": sorted(layers),
            "fresh": sorted(fresh)}


def source_cost(path: Path, ckpt: dict) -> dict:
    """What the source run cost up to this checkpoint, from its run dir's result.json where it has one."""
    config = ckpt["config"]
    batch_size = _get(config, "data.batch_size")
    images = ckpt.get("step", 0) * batch_size if batch_size else None
    result = {}
    result_file = path.parent / "result.json"
    try:
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    except (OSError, ValueError):
        result = {}
    gflops = (result.get("cost") or {}).get("gflops_per_image")
    recorded = (result.get("cost") or {}).get("train_gflops_total")  # what its training did, counted as it ran
    if recorded is not None and (result.get("position") or {}).get("step") == ckpt.get("step"):
        train_gflops = recorded  # the checkpoint the record was written at
    elif any(key.endswith("trained_gates") for key in ckpt["model"]):
        # an earlier checkpoint of a router whose FLOPs per image move as it trains (ReMoE's sparsity):
        # 3 x the final figure x images is not what it cost
        train_gflops = None
    else:
        train_gflops = cost.train_gflops_total(gflops, images) if gflops is not None and images is not None else None
    own_init = ckpt.get("init_from") or result.get("init_from")  # the checkpoint carries it since it was written
    own_init = own_init if isinstance(own_init, dict) else None
    if _get(config, "init_from") and own_init is None:
        init_gflops = None  # the source was upcycled too, but its record is gone: its init cost is unknown
    else:
        init_gflops = own_init.get("total_train_gflops") if own_init else 0.0
    total = train_gflops + init_gflops if train_gflops is not None and init_gflops is not None else None
    return {
        "path": str(path.resolve()),
        "run_dir": str(path.parent.resolve()),
        "router": _get(config, "router.name"),
        "seed": config.get("seed"),
        "epochs": ckpt.get("epoch"),  # epochs done at this checkpoint
        "step": ckpt.get("step"),
        "images": images,  # training images seen (step x global batch)
        "status": result.get("status"),
        "gflops_per_image": gflops,
        "train_gflops": train_gflops,  # the source's own training, up to this checkpoint
        "init_train_gflops": init_gflops,  # the source's own init_from chain (0: trained from scratch)
        "total_train_gflops": total,  # what --include-init-cost adds to this run's training FLOPs
    }


def init_model(model: nn.Module, init_from: str, config: dict) -> dict:
    """Read and check the source, upcycle ``model`` in place; the record for result.json."""
    path, ckpt = load_source(init_from, config)
    done = upcycle_(model, ckpt["model"], path)
    return {**source_cost(path, ckpt), "init_from": str(init_from), **done}
