"""Config -> objects: the model, its data and its optimizer, as `moebench train` builds them.

Below the Hydra app (train.py) so that whatever needs a model from a config
(``runs.load_run``, ``bench``, ``measure``) imports this and never the app.
``validate`` is the one check of a train config: the schema's types and ranges
(schema.py, each router's options from its module), then the rules between keys.
"""

from __future__ import annotations


import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed, memory, plugins, schema, timm_backbone
from .preflight import conf_dir  # noqa: F401 (where conf/ is: build's importers ask here)
from .data import load_data
from .errors import ConfigError
from .moe import MoELayer, registry
from .moe.decay import weight_decay_split
from .vit import ViT, moe_block_indices


def validate(cfg: DictConfig) -> None:
    """Reject a bad config with one line naming the key and what is allowed: every value's type and
    range (schema.py, routers' options included), then the rules between keys (here and the router's)."""
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)  # preflight's composed configs carry Hydra's keys, which resolve only in a job
    schema.check(OmegaConf.to_container(OmegaConf.create(config), resolve=True))
    r = cfg.router
    router = router_of(cfg)
    problem = router.check(router_options(cfg))  # the router's own cross-key rules (its module's)
    if problem:
        raise ConfigError(problem)
    m = cfg.model
    own_vit = not timm_backbone.is_timm(cfg)  # model=timm: timm_backbone.validate checks the model
    null = [key for key in ("patch_size", "dim", "depth", "heads", "mlp_dim", "pool") if m.get(key) is None]
    if own_vit and null:
        raise ConfigError(f"model.{null[0]}=null: moebench's ViT needs a value (null means the model's own "
                          "only with model=timm)")
    if not own_vit:
        timm_backbone.validate(cfg)
    if own_vit and cfg.data.image_size % m.patch_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not divisible by model.patch_size={m.patch_size}"
        )
    if own_vit and m.dim % m.heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.heads={m.heads}")
    if own_vit and m.pool not in ("gap", "cls"):
        raise ConfigError(f"model.pool={m.pool!r}; allowed: gap, cls")
    problem = router.check_sizes(router_options(cfg), m.dim, m.mlp_dim) if own_vit else None
    if problem:  # (model=timm: the sizes are the timm model's; its layer's constructor checks them)
        raise ConfigError(problem)
    try:
        moe_blocks(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    world = distributed.current().world_size
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible "
                          f"by the {world} processes")
    if cfg.expert_parallel and router.routed and r.num_experts % world:
        raise ConfigError(f"expert_parallel=true needs experts ({r.num_experts}) divisible by the {world} processes")
    check_fits(cfg)


def check_fits(cfg: DictConfig) -> None:
    """Refuse, before anything is allocated, a run whose estimated memory exceeds the device's (memory.py)."""
    try:
        blocks = len(moe_blocks(cfg))
    except Exception:  # validate names what is wrong with the blocks
        return
    memory.check(cfg, build_model, blocks)


def router_of(cfg: DictConfig) -> registry.Router:
    """The registered router ``cfg.router.name`` names (ConfigError naming the known ones otherwise)."""
    if registry.find(cfg.router.name) is None:
        plugins.load()  # a job in a launcher's worker process: the command's plugins are not imported there
    try:
        return registry.get(cfg.router.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def router_options(cfg: DictConfig) -> dict:
    """The router's layer options: every key of ``cfg.router`` but its name and the optimizer's lr_mult."""
    return {key: value for key, value in OmegaConf.to_container(cfg.router, resolve=True).items()
            if key not in ("name", "lr_mult")}


def replaced_blocks(cfg: DictConfig) -> list[int]:
    """The blocks whose MLP an MoE layer replaces (model.moe), whether or not this router routes."""
    moe = cfg.model.moe
    layers = list(moe.layers) if moe.layers is not None else None
    depth = timm_backbone.depth(cfg) if timm_backbone.is_timm(cfg) else cfg.model.depth
    return moe_block_indices(depth, moe.placement, moe.n, layers)


def moe_blocks(cfg: DictConfig) -> list[int]:
    """The blocks with a routed MoE layer (none for the dense baseline)."""
    return replaced_blocks(cfg) if router_of(cfg).routed else []


def build_model(cfg: DictConfig, in_chans: int, num_classes: int,
                load_pretrained: bool = True) -> torch.nn.Module:
    """``load_pretrained=False``: the weights come from a checkpoint next, so model=timm's
    ``model.pretrained`` downloads nothing."""
    make = router_layer(cfg)
    if timm_backbone.is_timm(cfg):
        return timm_backbone.build(cfg, in_chans, num_classes, make, load_pretrained=load_pretrained)
    m = cfg.model
    num_tokens = (cfg.data.image_size // m.patch_size) ** 2 + (m.pool == "cls")
    router = router_of(cfg)
    # An unrouted layer that still replaces blocks is a capacity control (dense router.mlp_mult != 1).
    blocks = replaced_blocks(cfg) if router.routed or router.replaces_blocks(router_options(cfg)) else []
    return ViT(
        image_size=cfg.data.image_size, patch_size=m.patch_size, in_chans=in_chans, num_classes=num_classes,
        dim=m.dim, depth=m.depth, heads=m.heads, mlp_dim=m.mlp_dim, pool=m.pool,
        moe_blocks=blocks, make_moe=lambda _: make(m.dim, m.mlp_dim, num_tokens),
    )


def router_layer(cfg: DictConfig):
    """``make(dim, hidden_dim, num_tokens)``: the MLP replacement of one MoE block as ``cfg.router`` says
    (model=timm: its sizes come from the timm model)."""
    router, options = router_of(cfg), router_options(cfg)
    return lambda dim, hidden_dim, num_tokens: router.build(dim, hidden_dim, num_tokens, dict(options))


def load_cfg_data(cfg: DictConfig):
    """The dataset (``moebench.data.ImageData``) of ``cfg.data``, split with ``cfg.seed``."""
    d = cfg.data
    return load_data(
        d.name, root=d.root, image_size=d.image_size, download=d.download,
        num_train=d.num_train, num_test=d.num_test, seed=cfg.seed, val_fraction=d.val_fraction,
    )


def router_parameter_names(model: torch.nn.Module) -> set[str]:
    """Every parameter of an MoE layer outside its experts (routed and shared): Soft MoE's phi and
    scale, the Tokens/Experts Choice gate."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, MoELayer) and hasattr(module, "experts"):
            expert_ids = {id(p) for p in module.experts.parameters()}
            shared = getattr(module, "shared", None)  # Tokens Choice's shared experts: experts, not router
            expert_ids |= {id(p) for p in shared.parameters()} if isinstance(shared, torch.nn.Module) else set()
            names.update(f"{module_name}.{name}" for name, p in module.named_parameters()
                         if id(p) not in expert_ids)
    return names


def optimizer_groups(model: torch.nn.Module, cfg: DictConfig) -> list[dict]:
    """AdamW parameter groups: weight decay on matmul kernels only (by role, as the
    Soft MoE authors do: moe/decay.py), and ``router.lr_mult`` on router parameters.
    Each group carries its parameter ``names`` (recorded in result.json)."""
    decay, _ = weight_decay_split(model)
    decay = set(decay)
    router = router_parameter_names(model)
    lr_mult = cfg.router.get("lr_mult")
    # null means "as the rest"; 0 is a frozen router (lr 0, so AdamW's decoupled decay, lr * wd, is 0 too),
    # not "unset": `or 1.0` here once trained it at the full rate.
    lr_mult = 1.0 if lr_mult is None else float(lr_mult)
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        key = (name in decay, name in router and lr_mult != 1.0)
        group = groups.setdefault(key, {
            "params": [], "names": [], "weight_decay": cfg.train.weight_decay if key[0] else 0.0,
            "lr_mult": lr_mult if key[1] else 1.0,
        })
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def make_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.train.lr, betas=tuple(cfg.train.betas))


def optimizer_record(optimizer: torch.optim.Optimizer) -> dict:
    """Which parameters were decayed, and which had a learning-rate multiplier (result.json)."""
    groups = optimizer.param_groups
    record = {
        "decay": [n for g in groups if g["weight_decay"] for n in g["names"]],
        "no_decay": [n for g in groups if not g["weight_decay"] for n in g["names"]],
    }
    lr_mult = {n: g["lr_mult"] for g in groups if g["lr_mult"] != 1.0 for n in g["names"]}
    if lr_mult:
        record["lr_mult"] = lr_mult
    return record
