"""Will a run fit in memory? An estimate from the config alone, checked before anything is allocated.

A typo such as ``experts=1000000000`` would otherwise try to allocate terabytes
(and end in a traceback, or in the OOM killer). The estimate is deliberately
simple and on the high side, so it refuses only runs that cannot fit:

- parameters: counted exactly by building the model on PyTorch's ``meta`` device
  (shapes only, no storage); 16 bytes each in training: fp32 weights, gradients
  and AdamW's two moments. The classifier head is counted with 1000 classes.
- activations kept for the backward pass, fp32, per training batch: per block
  and token ``16 dim + 2 mlp_dim + 2 heads tokens`` numbers (layer norms, q/k/v,
  attention scores, the MLP's hidden layer, residuals); per MoE block and image
  also the slots' inputs, hidden layers and outputs (``slots (2 dim + 2 mlp_dim)``)
  and the routing tensors (logits, dispatch and combine weights).

The device's memory is its total: the RAM of the machine (``/proc/meminfo`` via
``os.sysconf``) or the GPU's (``torch.cuda.mem_get_info``). A run whose estimate
exceeds it is refused with one line naming the keys that size it.
"""

from __future__ import annotations

import math
import os

import torch
from omegaconf import DictConfig

from .errors import ConfigError
from .moe import registry

BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
HEAD_CLASSES = 1000
GB = 1024 ** 3


def device_memory(device: str) -> tuple[str, int] | None:
    """(what, bytes) of the device a run would use; None when unknown."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None  # train.select_device says so in its own line
        index = torch.device(device).index
        _, total = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
        return f"GPU {device}", total
    try:
        return "machine (RAM)", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def count_parameters(cfg: DictConfig, build_model) -> int | None:
    """The model's parameter count, from a build on the meta device (no memory used); None if it cannot be built."""
    try:
        with torch.device("meta"):
            model = build_model(cfg, 3, HEAD_CLASSES, load_pretrained=False)
    except Exception:  # e.g. a timm model that cannot be built without its files: no estimate, no refusal
        return None
    return sum(p.numel() for p in model.parameters())


def activation_bytes(cfg: DictConfig, moe_blocks: int) -> int | None:
    """Activations of one training batch kept for backward (fp32), for moebench's own ViT."""
    m, r, d = cfg.model, cfg.router, cfg.data
    if any(m.get(key) is None for key in ("dim", "depth", "heads", "mlp_dim", "patch_size")):
        return None  # model=timm with the model's own sizes: parameters only
    tokens = (d.image_size // m.patch_size) ** 2 + 1
    per_image = m.depth * tokens * (16 * m.dim + 2 * m.mlp_dim + 2 * m.heads * tokens)
    if r.name == "soft":
        slots = r.num_experts * (max(1, round(tokens * r.slot_factor / r.num_experts)) if r.get("slot_factor")
                                 else r.slots_per_expert)
        routing = 4 * tokens * slots
    elif r.name in ("tokens_choice", "experts_choice"):
        k = r.k if r.name == "tokens_choice" else 1
        slots = math.ceil(r.capacity_factor * k * tokens)
        group = min(r.group_size, d.batch_size) * tokens  # dispatch/combine over a group's tokens
        routing = 3 * tokens * r.num_experts + 2 * r.capacity_factor * k * group * tokens
    else:  # dense: its MLP is in the per-block figure
        slots, routing = 0, 0
    per_image += moe_blocks * (slots * (2 * m.dim + 2 * m.mlp_dim) + routing)
    return int(4 * d.batch_size * per_image)


def check(cfg: DictConfig, build_model, moe_blocks: int) -> None:
    """Refuse a run whose estimated training memory exceeds the device's memory (ConfigError, one line)."""
    device = device_memory(str(cfg.device))
    params = count_parameters(cfg, build_model)
    if device is None or params is None:
        return
    what, available = device
    weights = BYTES_PER_PARAM * params
    try:
        activations = activation_bytes(cfg, moe_blocks) or 0
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):  # an estimate never blocks a run
        activations = 0  # on its own account: parameters only
    if weights + activations <= available:
        return
    m, r = cfg.model, cfg.router
    router = registry.find(r.name)
    keys = [f"experts={r.num_experts}"] if router is None or router.routed else []
    keys += [f"model.{key}={m.get(key)}" for key in ("dim", "mlp_dim", "depth") if m.get(key) is not None]
    keys += [f"data.batch_size={cfg.data.batch_size}"]
    raise ConfigError(
        f"this run cannot fit in memory: {', '.join(keys)} need an estimated {(weights + activations) / GB:,.1f} GB "
        f"({params:,} parameters with gradients and AdamW state {weights / GB:,.1f} GB, activations "
        f"{activations / GB:,.1f} GB), the {what} has {available / GB:,.1f} GB; lower them (moebench/memory.py)"
    )
