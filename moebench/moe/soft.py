"""Soft MoE (Puigcerver et al., 2023): every slot is a convex mix of one example's tokens."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..router_options import SOFT, SOFT_MODES
from .base import MoELayer
from .experts import Experts
from .metrics import mean_entropy, mean_pairwise_cosine
from .precision import as_float32, routing_precision
from .registry import Router, register

MODES = SOFT_MODES


def l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x * rsqrt(sum x^2 + 1e-6)`` along ``dim``, as in the reference code."""
    return x * torch.rsqrt(x.pow(2).sum(dim, keepdim=True) + 1e-6)


class SoftMoE(MoELayer):
    """Soft MoE layer over groups of ONE example each: (B, T, d) -> (B, T, d).

    Logits between the L2-normalised tokens and slot parameters ``phi``
    (d, n, p), times a learnable ``scale``. Dispatch weights are a softmax over
    the tokens of an example (each slot is a convex combination of the raw
    tokens); combine weights are a softmax over all n*p slots (each token is a
    convex combination of the slot outputs). Slot ``s`` goes to expert
    ``s // p``. Nothing is dropped and there is no auxiliary loss.

    Args:
        slots_per_expert: p. Ignored when ``slot_factor`` is given.
        slot_factor: derive p = max(1, round(num_tokens * slot_factor / n));
            needs ``num_tokens``.
        normalize: L2-normalise tokens and ``phi`` for the logits (the paper's
            choice; without it logits grow with d and routing turns one-hot).
        identical_init: start every expert from the same draw (reference code).
        scale_init: the logit scale at init (1.0 in the paper). At small width
            and short schedules a scale of 1 keeps every logit near 0, so every
            slot starts as the mean token and routing may never leave uniform;
            a larger start lets it (see the ``*_similarity`` diagnostics).
        dispatch, combine: "soft" (the method), "uniform" (every weight 1/m or
            1/S) or "identity" (slot i <-> token i; needs n*p == tokens): the
            ablations of the paper's Table 2.
        dispatch_normalized: dispatch the RMS-normalised tokens (unit L2 norm
            times sqrt(d)) instead of the raw ones, as lucidrains/soft-moe-pytorch
            does (its RMSNorm at init). A deviation from the paper, which mixes
            raw tokens and so keeps their magnitudes; off by default.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        *,
        slot_factor: float | None = None,
        num_tokens: int | None = None,
        normalize: bool = True,
        identical_init: bool = True,
        dispatch: str = "soft",
        combine: str = "soft",
        scale_init: float = 1.0,
        dispatch_normalized: bool | None = False,
    ):
        super().__init__()
        if slot_factor is not None:
            if num_tokens is None:
                raise ValueError("slot_factor needs num_tokens (tokens per example)")
            slots_per_expert = max(1, math.floor(num_tokens * slot_factor / num_experts + 0.5))
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        for name, mode in (("dispatch", dispatch), ("combine", combine)):
            if mode not in MODES:
                raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
        self.num_experts, self.slots_per_expert = num_experts, slots_per_expert
        self.num_slots = num_experts * slots_per_expert
        if "identity" in (dispatch, combine) and num_tokens is not None and num_tokens != self.num_slots:
            raise ValueError(f"identity dispatch/combine needs slots == tokens, got {self.num_slots} != {num_tokens}")
        self.normalize, self.dispatch, self.combine = normalize, dispatch, combine
        self.dispatch_normalized = bool(dispatch_normalized)  # None (a config's "off") is False
        self.phi = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.full((), float(scale_init)))
        self.experts = Experts(num_experts, dim, hidden_dim, identical_init=identical_init)
        # lecun-normal as JAX computes it for a (d, n, p) kernel: fan_in = d * n.
        std = 1.0 / math.sqrt(dim * num_experts) / 0.87962566103423978
        nn.init.trunc_normal_(self.phi, std=std, a=-2 * std, b=2 * std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Slot logits (B, m, n*p) in float32 (autocast off); ``x`` is (B, m, d)."""
        with routing_precision(x):
            x = as_float32(x)
            phi = as_float32(self.phi).reshape(x.shape[-1], self.num_slots)
            if not self.normalize:
                return x @ (phi * as_float32(self.scale))
            # Normalising a token scales its row of logits, so the norm is applied to the
            # (m, S) logits instead of building a normalised (m, d) copy of the tokens;
            # the scale goes on the smaller operand.
            inv_norm = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() + 1e-6)
            return (x @ (l2_normalize(phi, 0) * as_float32(self.scale))) * inv_norm

    @torch.no_grad()
    def routing(self, x: torch.Tensor) -> "SoftRouting":
        """What this layer dispatches and combines for ``x`` (B, m, d), as ``forward`` computes it
        (float32, no graph): `moebench inspect` draws it and rebuilds the output from it."""
        with routing_precision(x):
            return self._route(x)

    def _route(self, x: torch.Tensor) -> "SoftRouting":
        """The routing of ``x``; call it inside ``routing_precision`` (forward and ``routing`` do)."""
        batch, tokens, dim = x.shape
        slots = self.num_slots
        logits = self.logits(x) if "soft" in (self.dispatch, self.combine) else None
        x32 = as_float32(x)
        if self.dispatch_normalized:
            x32 = l2_normalize(x32, -1) * math.sqrt(dim)

        def weights(mode: str, softmax_dim: int, uniform: float) -> torch.Tensor:
            if mode == "soft":
                return logits.softmax(dim=softmax_dim)
            if mode == "uniform":  # a broadcast view: no (B, m, S) tensor is stored
                return x32.new_full((1, 1, 1), uniform).expand(batch, tokens, slots)
            return torch.eye(tokens, slots, device=x.device).expand(batch, tokens, slots)  # slot i <-> token i

        return SoftRouting(weights(self.dispatch, 1, 1.0 / tokens), weights(self.combine, -1, 1.0 / slots),
                           self.slots_per_expert, x32, self.dispatch, self.combine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        n, p, slots = self.num_experts, self.slots_per_expert, self.num_slots
        if "identity" in (self.dispatch, self.combine) and tokens != slots:
            raise ValueError(f"identity dispatch/combine needs slots == tokens, got {slots} != {tokens}")
        track = self.tracking
        metrics = {}
        with routing_precision(x):
            routing = self._route(x)
            slot_in = routing.slot_inputs()  # (B, S, d)
            if track:
                if self.dispatch == "soft":
                    metrics.update(_weight_stats("dispatch", routing.dispatch.detach(), dim=1))
                metrics["slot_similarity"] = mean_pairwise_cosine(slot_in.detach())

        # (B, n*p, d) -> (n, B*p, d): each expert gets its p slots of every example.
        expert_in = slot_in.reshape(batch, n, p, dim).transpose(0, 1).reshape(n, batch * p, dim)
        expert_out = self.experts(expert_in)  # under the caller's autocast, if any

        with routing_precision(x):
            slot_out = as_float32(expert_out).reshape(n, batch, p, dim).transpose(0, 1).reshape(batch, slots, dim)
            y = routing.combine_outputs(slot_out)
            if track and self.combine == "soft":
                metrics.update(_weight_stats("combine", routing.combine.detach(), dim=-1))
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        if track:
            self.record_metrics(metrics)
        else:
            self.metrics = {}
        return y.to(x.dtype)

    def diagnostics(self) -> dict[str, float]:
        return {
            "expert_similarity": float(self.experts.weight_similarity()),
            "phi_similarity": float(mean_pairwise_cosine(self.phi.detach().reshape(self.phi.shape[0], -1).T)),
            "scale": float(self.scale.detach()),
        }

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
            f"normalize={self.normalize}, dispatch={self.dispatch!r}, combine={self.combine!r}"
            + (", dispatch_normalized=True" if self.dispatch_normalized else "")
        )


@dataclass
class SoftRouting:
    """One batch's Soft MoE routing: the one description ``forward`` computes with and
    `moebench inspect` draws. Tensors are float32 with the batch first."""
    dispatch: torch.Tensor  # (B, m, S): slot s mixes the m tokens with weights [:, :, s] (sums to 1 over dim 1)
    combine: torch.Tensor  # (B, m, S): token t mixes the S slot outputs with weights [:, t] (sums to 1 over dim 2)
    slots_per_expert: int
    tokens: torch.Tensor | None = None  # (B, m, d): what the slots mix (RMS-normalised under
    # dispatch_normalized); None: the layer's input itself
    dispatch_mode: str = "soft"  # "uniform" and "identity" take exact shortcuts (a mean, a copy) over the weights
    combine_mode: str = "soft"

    def expert_of_slot(self, slot: torch.Tensor) -> torch.Tensor:
        return slot // self.slots_per_expert

    def slot_inputs(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, d): each slot's input, from ``self.tokens`` (or ``x`` when they are None)."""
        tokens = self.tokens if self.tokens is not None else x.float()
        if self.dispatch_mode == "uniform":
            return tokens.mean(1, keepdim=True).expand(tokens.shape[0], self.dispatch.shape[2], tokens.shape[2])
        if self.dispatch_mode == "identity":
            return tokens
        return self.dispatch.transpose(1, 2) @ tokens  # raw tokens (the paper)

    def combine_outputs(self, slot_out: torch.Tensor) -> torch.Tensor:
        """(B, m, d): each token's output from the slot outputs (B, S, d)."""
        if self.combine_mode == "uniform":
            return slot_out.mean(1, keepdim=True).expand(slot_out.shape[0], self.combine.shape[1], slot_out.shape[2])
        if self.combine_mode == "identity":
            return slot_out
        return self.combine @ slot_out  # over all slots jointly

    def take(self, n: int) -> "SoftRouting":
        """The routing of the first ``n`` examples."""
        return dataclasses.replace(self, **{f: getattr(self, f)[:n] for f in BATCHED if getattr(self, f) is not None})

    @staticmethod
    def concat(parts: list["SoftRouting"]) -> "SoftRouting":
        """The routing of several batches, one after the other."""
        tensors = {f: torch.cat([getattr(p, f) for p in parts]) for f in BATCHED
                   if all(getattr(p, f) is not None for p in parts)}
        return dataclasses.replace(parts[0], **{"tokens": None, **tensors})


BATCHED = ("dispatch", "combine", "tokens")


def _weight_stats(prefix: str, weights: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
    """Mean max weight and mean entropy of the distributions along ``dim``."""
    return {f"{prefix}_max": weights.amax(dim).mean(), f"{prefix}_entropy": mean_entropy(weights, dim)}


def _label(get) -> list[str]:
    parts = [f"E{get('num_experts')}", f"p{get('slots_per_expert')}"]
    if (get("dispatch"), get("combine")) != ("soft", "soft"):
        parts.append(f"{get('dispatch')}/{get('combine')}")
    # Knobs of the recipes' control arms, named when off their defaults.
    if get("scale_init") not in (None, 1, 1.0):
        parts.append(f"scale{get('scale_init'):g}")
    if get("identical_init") is False:
        parts.append("indep-init")
    if get("dispatch_normalized"):
        parts.append("normed-dispatch")
    return parts


register(Router(
    name="soft",
    build=lambda dim, hidden_dim, num_tokens, options: SoftMoE(dim, hidden_dim, **options, num_tokens=num_tokens),
    options=SOFT.options,  # router_options.py
    label=_label,
    unused_parameters=lambda options: "soft" not in (options["dispatch"], options["combine"]),  # phi unused
    marker="o", order=0,
))
