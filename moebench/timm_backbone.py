"""`model=timm`: a timm Vision Transformer as the backbone, its MoE blocks' MLPs replaced by moebench routers.

timm (``pip install 'moebench[timm]'``) builds the model through its own entry
point, ``timm.create_model(name, pretrained=..., num_classes=..., in_chans=...,
img_size=..., **overrides)``; the MLP of every chosen block
(``model.blocks[i].mlp``) is then swapped for a moebench router layer. Nothing
of timm is copied or patched: the block still computes
``x + drop_path(ls(mlp(norm2(x))))``, only ``mlp`` is ours, so layer names
(``blocks.3.mlp``), routing metrics, weight decay by role, checkpoints,
inspection and cost all work as with moebench's own ViT.

Routers see every token of the sequence, the class token and any register
tokens included (as V-MoE routes its class token); they are one routing
position each, and ``moebench inspect`` draws only the patch tokens.

``pretrained=true`` loads timm's weights (from the Hugging Face Hub on first use,
then from its cache); with ``upcycle=true`` every expert of an MoE block starts
as a copy of that block's pretrained MLP (sparse upcycling), the router's own
parameters fresh. Offline without cached weights the run stops with one line.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import socket
import threading
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import ConfigError, UserError
from .moe import registry
from .vit import moe_block_indices

BACKBONE = "timm"  # model.backbone of conf/model/timm.yaml
LIST_HINT = "python -c \"import timm; print(timm.list_models('vit_*'))\""
POOL = {"gap": "avg", "cls": "token"}  # moebench's model.pool -> timm's global_pool


class PretrainedError(UserError):
    """timm's pretrained weights cannot be had (offline, not cached) or do not fit the model."""


def is_timm(cfg) -> bool:
    """Whether the config's model is a timm model (model=timm)."""
    return cfg.model.get("backbone") == BACKBONE


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("model=timm needs timm: pip install 'moebench[timm]'") from None
    return timm


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def check_name(name: str) -> None:
    """Refuse a name timm does not know, with the nearest known name and how to list them."""
    timm = _timm()
    if timm.is_model(name):
        return
    near = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}? " if near else ""
    raise ConfigError(f"model.name={name!r} is not a timm model; {hint}list them with: {LIST_HINT}")


def timm_kwargs(model_cfg, base_dim: Callable[[], int] | None = None) -> dict:
    """``timm.create_model`` keyword arguments of ``model_cfg`` (conf/model/timm.yaml), classes and
    channels aside. Null keys keep the architecture's own value."""
    m = model_cfg
    kwargs = {"img_size": m.img_size, "drop_path_rate": float(m.get("drop_path") or 0.0)}
    for key, timm_key in (("patch_size", "patch_size"), ("dim", "embed_dim"), ("depth", "depth"),
                          ("heads", "num_heads")):
        if m.get(key) is not None:
            kwargs[timm_key] = m[key]
    if m.get("mlp_dim") is not None:  # timm sizes the MLP by a ratio of the width
        dim = m.get("dim") or (base_dim() if base_dim else None)
        kwargs["mlp_ratio"] = m.mlp_dim / dim
    if m.get("pool") is not None:
        kwargs["global_pool"] = POOL[m.pool]
    return kwargs


@dataclass(frozen=True)
class Layout:
    """What moebench needs to know of a timm architecture before building it for real."""
    depth: int
    dim: int
    patch_size: int
    prefix_tokens: int  # class and register tokens, before the patches
    num_tokens: int  # the sequence the blocks (and routers) see
    mlp_hidden: int = 0  # the hidden width of the first block's MLP (what an expert's width becomes)


def _layout(model: nn.Module, name: str) -> Layout:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not all(hasattr(b, "mlp") for b in blocks):
        raise ConfigError(f"model.name={name!r}: moebench replaces blocks[i].mlp, and this timm model has no "
                          f"such blocks; use a ViT-family model, e.g. vit_small_patch16_224 ({LIST_HINT})")
    embed = model.patch_embed
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    dim = int(getattr(model, "embed_dim", None) or model.num_features)
    patch = embed.patch_size[0] if isinstance(embed.patch_size, (tuple, list)) else int(embed.patch_size)
    return Layout(depth=len(blocks), dim=dim, patch_size=int(patch), prefix_tokens=prefix,
                  num_tokens=prefix + int(embed.num_patches), mlp_hidden=_hidden_width(blocks[0].mlp, dim))


@functools.lru_cache(maxsize=32)
def _meta_layout(name: str, kwargs: tuple) -> Layout:
    """The layout of ``name`` built with ``kwargs`` on the meta device: no memory, no init cost."""
    timm = _timm()
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **dict(kwargs))
    except Exception as err:  # an override the architecture refuses (heads not dividing dim...)
        shown = ", ".join(f"{k}={v}" for k, v in kwargs if k not in ("num_classes", "in_chans"))
        raise ConfigError(f"timm cannot build {name} with {shown}: {_first_line(err)}") from None
    return _layout(model, name)


def arch_dim(name: str) -> int:
    """The width of ``name`` as timm defines it (to turn model.mlp_dim into timm's mlp_ratio)."""
    return _meta_layout(name, (("num_classes", 1),)).dim


def layout(cfg) -> Layout:
    """The layout of the config's timm model (config errors as one line)."""
    m = cfg.model
    check_name(m.name)
    kwargs = {**timm_kwargs(m, lambda: arch_dim(m.name)), "num_classes": 1}
    return _meta_layout(m.name, tuple(sorted(kwargs.items())))


def depth(cfg) -> int:
    return layout(cfg).depth


def replaced_blocks(cfg, depth: int) -> list[int]:
    """Blocks whose MLP moebench replaces: the MoE blocks; none for dense, but for a
    ``router.mlp_mult`` capacity control (a wider dense MLP where an MoE would go)."""
    r, moe = cfg.router, cfg.model.moe
    router = registry.get(r.name)
    options = {key: value for key, value in r.items() if key not in ("name", "lr_mult")}
    if not router.routed and not router.replaces_blocks(options):
        return []  # timm's own MLPs: the dense baseline as timm defines it
    return moe_block_indices(depth, moe.placement, moe.n, list(moe.layers) if moe.layers is not None else None)


def validate(cfg) -> None:
    """Cross-key checks of a timm model config (types are schema.py's); raises ConfigError."""
    m, d = cfg.model, cfg.data
    if m.img_size != d.image_size:
        raise ConfigError(f"model.img_size={m.img_size} differs from data.image_size={d.image_size}: the model "
                          "takes the loader's images; set data.image_size (model.img_size follows it)")
    lay = layout(cfg)
    if d.image_size % lay.patch_size:
        raise ConfigError(f"data.image_size={d.image_size} is not divisible by the patch size {lay.patch_size} "
                          f"of {m.name}; set data.image_size or model.patch_size")
    router = registry.get(cfg.router.name)
    if router.routed:  # the router's rules on the expert width (router.granularity dividing it...)
        options = {key: value for key, value in cfg.router.items() if key not in ("name", "lr_mult")}
        problem = router.check_sizes(options, lay.dim, lay.mlp_hidden)
        if problem:
            raise ConfigError(problem.replace("model.mlp_dim=", f"the MLP width of {m.name}: "))
    weights = m.get("pretrained_file")
    resumed = bool(cfg.get("resume"))  # a resumed run's weights are in its checkpoint
    if m.get("pretrained") and weights and not resumed and not os.path.isfile(os.path.expanduser(weights)):
        raise ConfigError(f"model.pretrained_file={weights}: no such file")


# ----------------------------------------------------------------------------- building

def offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a connection to the Hugging Face Hub opens within ``timeout`` seconds, name lookup
    included (without one, the hub client retries each file for ~25 s, printing every retry)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    probe = threading.Thread(target=connect, daemon=True)  # a name lookup has no timeout of its own
    probe.start()
    probe.join(timeout)
    return bool(opened and opened[0])


@contextlib.contextmanager
def hub_offline(offline: bool):
    """The hub client in offline mode (cached files only, no requests) for the duration."""
    try:
        from huggingface_hub import constants
    except ImportError:
        offline = False
    if not offline:
        yield
        return
    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _create(name: str, pretrained: bool, kwargs: dict, weights_file: str | None = None) -> nn.Module:
    timm = _timm()
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights_file:  # timm's own way to load its weights from a local file
        kwargs = {**kwargs, "pretrained_cfg_overlay": {"file": os.path.expanduser(weights_file)}}
    offline = not weights_file and (offline_env() or not hub_reachable())
    try:
        with hub_offline(offline):  # cached weights load at once; missing ones fail at once
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:
        raise PretrainedError(pretrained_error(name, err, weights_file)) from None


def pretrained_error(name: str, err: BaseException, weights_file: str | None = None) -> str:
    """One line: why timm's pretrained weights of ``name`` could not be loaded, and what to do."""
    text = _first_line(err)
    if weights_file and isinstance(err, OSError):
        return f"model.pretrained_file={weights_file}: cannot read it: {text}"
    network = not weights_file and (isinstance(err, OSError) or "Hub" in text or "connection" in text.lower())
    if network:
        why = "HF_HUB_OFFLINE is set and they are not cached" if offline_env() else \
            "they are not cached and the Hugging Face Hub cannot be reached"
        return (f"model.pretrained=true: cannot get timm's pretrained weights of {name}: {why}; "
                "run once online to cache them (HF_HOME) or use model.pretrained=false")
    if "Invalid pretrained config" in text:
        return f"model.pretrained=true: timm has no pretrained weights for {name}; use model.pretrained=false"
    return (f"model.pretrained=true: timm's pretrained weights of {name} do not fit this model "
            f"(overridden model.dim/depth/heads/mlp_dim?): {text}")


def _hidden_width(mlp: nn.Module, dim: int) -> int:
    fc2 = getattr(mlp, "fc2", None)
    return fc2.in_features if isinstance(fc2, nn.Linear) else 4 * dim


def can_upcycle(mlp: nn.Module) -> bool:
    """Whether ``mlp`` computes what a moebench expert computes: Linear -> exact GELU -> Linear."""
    fc1, fc2, act = (getattr(mlp, key, None) for key in ("fc1", "fc2", "act"))
    norm = getattr(mlp, "norm", nn.Identity())
    return (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.bias is not None
            and fc2.bias is not None and isinstance(act, nn.GELU) and act.approximate == "none"
            and isinstance(norm, nn.Identity) and fc1.out_features == fc2.in_features)


@torch.no_grad()
def upcycle_experts(layer: nn.Module, mlp: nn.Module) -> None:
    """Every expert of ``layer`` (a moebench router) becomes a copy of the dense ``mlp``."""
    experts = layer.experts
    experts.w1.copy_(mlp.fc1.weight.t().expand_as(experts.w1))
    experts.b1.copy_(mlp.fc1.bias.expand_as(experts.b1))
    experts.w2.copy_(mlp.fc2.weight.t().expand_as(experts.w2))
    experts.b2.copy_(mlp.fc2.bias.expand_as(experts.b2))


def build(cfg, in_chans: int, num_classes: int, make_layer: Callable[[int, int, int], nn.Module],
          *, load_pretrained: bool = True) -> nn.Module:
    """The timm model of ``cfg`` with ``make_layer(dim, hidden_dim, num_tokens)`` as the MLP of its
    MoE blocks. ``load_pretrained=False``: weights come from a checkpoint next (resume, reloading
    a run), so ``model.pretrained`` downloads nothing."""
    m = cfg.model
    lay = layout(cfg)  # the name and the overrides are known to work
    kwargs = {**timm_kwargs(m, lambda: arch_dim(m.name)), "in_chans": in_chans, "num_classes": num_classes}
    pretrained = bool(m.get("pretrained")) and load_pretrained
    model = _create(m.name, pretrained, kwargs, m.get("pretrained_file"))
    upcycle = pretrained and bool(m.get("upcycle", True)) and registry.get(cfg.router.name).routed
    for i in replaced_blocks(cfg, lay.depth):
        block = model.blocks[i]
        old = block.mlp
        layer = make_layer(lay.dim, _hidden_width(old, lay.dim), lay.num_tokens)
        if upcycle:
            if not can_upcycle(old):
                raise PretrainedError(f"model.upcycle=true: the MLP of block {i} of {m.name} is not "
                                      f"Linear-GELU-Linear ({type(old).__name__}), so the experts cannot copy it; "
                                      "set model.upcycle=false (fresh experts)")
            upcycle_experts(layer, old)
        block.mlp = layer
    # What moebench's tools read off its own ViT (log line, probe, measure).
    model.num_tokens = lay.num_tokens
    if not hasattr(model.patch_embed, "in_channels"):
        model.patch_embed.in_channels = in_chans
    return model
