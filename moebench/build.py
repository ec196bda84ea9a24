"""Config -> objects: the model, its data and its optimizer, as `moebench train` builds them.

Below the Hydra app (train.py) so that whatever needs a model from a config
(``runs.load_run``, ``bench``, ``measure``) imports this and never the app.
``validate`` holds the cross-key rules of a train config; types and ranges are
schema.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed, timm_backbone
from .data import load_data
from .errors import ConfigError
from .moe import DenseMLP, ExpertsChoiceMoE, MoELayer, SoftMoE, TokensChoiceMoE
from .moe.decay import weight_decay_split
from .vit import ViT, moe_block_indices

ROUTERS = {"soft": SoftMoE, "tokens_choice": TokensChoiceMoE, "experts_choice": ExpertsChoiceMoE, "dense": DenseMLP}


def validate(cfg: DictConfig) -> None:
    """Reject bad values with one line naming the key and what is allowed."""
    r = cfg.router
    if r.name not in ROUTERS:
        raise ConfigError(f"router.name={r.name!r} is unknown; allowed: {', '.join(ROUTERS)}")
    if r.name == "dense" and not r.get("mlp_mult", 1) > 0:
        raise ConfigError(f"router.mlp_mult must be > 0, got {r.mlp_mult}")
    if r.name != "dense":
        if r.num_experts < 1:
            raise ConfigError(f"experts (router.num_experts) must be >= 1, got {r.num_experts}")
    if r.name == "soft":
        if r.slot_factor is None and r.slots_per_expert < 1:
            raise ConfigError(f"slots (router.slots_per_expert) must be >= 1, got {r.slots_per_expert}")
        if r.slot_factor is not None and r.slot_factor <= 0:
            raise ConfigError(f"router.slot_factor must be > 0, got {r.slot_factor}")
        for key in ("dispatch", "combine"):
            if r[key] not in ("soft", "uniform", "identity"):
                raise ConfigError(f"router.{key}={r[key]!r} is unknown; allowed: soft, uniform, identity")
    if r.name == "tokens_choice" and not 1 <= r.k <= r.num_experts:
        raise ConfigError(f"k (router.k) must be in [1, experts={r.num_experts}], got {r.k}")
    if r.name in ("tokens_choice", "experts_choice"):
        if r.capacity_factor <= 0:
            raise ConfigError(f"capacity_factor (router.capacity_factor) must be > 0, got {r.capacity_factor}")
        if r.group_size < 1:
            raise ConfigError(f"router.group_size must be >= 1, got {r.group_size}")
        rounding = r.capacity_rounding
        if rounding not in ("ceil", "round") and not (isinstance(rounding, int) and rounding >= 1):
            raise ConfigError(f"router.capacity_rounding={rounding!r}; allowed: ceil, round or an int >= 1")
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
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={cfg.precision!r}; allowed: fp32, bf16")
    if cfg.train.schedule not in ("cosine", "rsqrt", "constant"):
        raise ConfigError(f"train.schedule={cfg.train.schedule!r}; allowed: cosine, rsqrt, constant")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    try:
        moe_blocks(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    world = distributed.current().world_size
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible "
                          f"by the {world} processes")
    if cfg.expert_parallel and r.name != "dense" and r.num_experts % world:
        raise ConfigError(f"expert_parallel=true needs experts ({r.num_experts}) divisible by the {world} processes")
    if cfg.threads not in (None, "auto") and not (isinstance(cfg.threads, int) and cfg.threads >= 1):
        raise ConfigError(f"threads={cfg.threads!r}; allowed: auto or an int >= 1")


def moe_blocks(cfg: DictConfig) -> list[int]:
    if cfg.router.name == "dense":
        return []
    moe = cfg.model.moe
    layers = list(moe.layers) if moe.layers is not None else None
    depth = timm_backbone.depth(cfg) if timm_backbone.is_timm(cfg) else cfg.model.depth
    return moe_block_indices(depth, moe.placement, moe.n, layers)


def build_model(cfg: DictConfig, in_chans: int, num_classes: int,
                load_pretrained: bool = True) -> torch.nn.Module:
    """``load_pretrained=False``: the weights come from a checkpoint next, so model=timm's
    ``model.pretrained`` downloads nothing."""
    if timm_backbone.is_timm(cfg):
        return timm_backbone.build(cfg, in_chans, num_classes, router_layer(cfg), load_pretrained=load_pretrained)
    m, r = cfg.model, cfg.router
    # Every router key is a constructor argument of its layer, but for the optimizer's.
    kwargs = {key: value for key, value in OmegaConf.to_container(r, resolve=True).items()
              if key not in ("name", "lr_mult")}
    num_tokens = (cfg.data.image_size // m.patch_size) ** 2 + (m.pool == "cls")
    if r.name == "soft":
        kwargs["num_tokens"] = num_tokens

    blocks = moe_blocks(cfg)
    if r.name == "dense" and kwargs.get("mlp_mult", 1) != 1:
        # A capacity control: the blocks an MoE would replace get a wider dense MLP instead.
        moe = m.moe
        blocks = moe_block_indices(m.depth, moe.placement, moe.n, list(moe.layers) if moe.layers is not None else None)

    def make_moe(_: int) -> torch.nn.Module:
        if r.name == "dense":
            return DenseMLP(m.dim, round(m.mlp_dim * kwargs.get("mlp_mult", 1)))
        return ROUTERS[r.name](m.dim, m.mlp_dim, **kwargs)

    return ViT(
        image_size=cfg.data.image_size, patch_size=m.patch_size, in_chans=in_chans, num_classes=num_classes,
        dim=m.dim, depth=m.depth, heads=m.heads, mlp_dim=m.mlp_dim, pool=m.pool,
        moe_blocks=blocks, make_moe=make_moe,
    )


def router_layer(cfg: DictConfig):
    """``make(dim, hidden_dim, num_tokens)``: the MLP replacement of one MoE block as ``cfg.router`` says
    (model=timm: its sizes come from the timm model)."""
    r = cfg.router
    kwargs = {key: value for key, value in OmegaConf.to_container(r, resolve=True).items()
              if key not in ("name", "lr_mult")}

    def make(dim: int, hidden_dim: int, num_tokens: int) -> torch.nn.Module:
        if r.name == "dense":
            return DenseMLP(dim, round(hidden_dim * kwargs.get("mlp_mult", 1)))
        extra = {"num_tokens": num_tokens} if r.name == "soft" else {}
        return ROUTERS[r.name](dim, hidden_dim, **kwargs, **extra)

    return make


def load_cfg_data(cfg: DictConfig):
    """The dataset (``moebench.data.ImageData``) of ``cfg.data``, split with ``cfg.seed``."""
    d = cfg.data
    return load_data(
        d.name, root=d.root, image_size=d.image_size, download=d.download,
        num_train=d.num_train, num_test=d.num_test, seed=cfg.seed, val_fraction=d.val_fraction,
    )


def router_parameter_names(model: torch.nn.Module) -> set[str]:
    """Every parameter of an MoE layer outside its experts: Soft MoE's phi and
    scale, the Tokens/Experts Choice gate."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, MoELayer) and hasattr(module, "experts"):
            expert_ids = {id(p) for p in module.experts.parameters()}
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


def conf_dir() -> str:
    """conf/ ships inside the installed package as moebench/conf; in a source
    checkout (editable install) it is the repository's top-level conf/."""
    installed = Path(__file__).resolve().parent / "conf"
    return str(installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "conf")
