"""Routing in float32 under mixed precision.

ST-MoE (Zoph et al., 2022) traced training instabilities to routers run in
bfloat16: the exponent in a softmax amplifies rounding errors, and top-k and
capacity decisions flip on near-ties. Every router here therefore computes its
logits, softmaxes, top-k, dispatch and combine with autocast switched off, on
float32 copies of its inputs; only the expert MLPs (the bulk of the FLOPs) run
under the caller's autocast.
"""

from __future__ import annotations

import contextlib

import torch


def routing_precision(x: torch.Tensor):
    """A context in which ``x.device``'s autocast is off (a no-op when it was not on)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 unless it already is float32 or wider (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
