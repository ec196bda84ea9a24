"""The MoE layer contract and helpers that walk a model's MoE layers.

Every layer maps (batch, tokens, dim) -> (batch, tokens, dim). After each
forward it leaves on itself:

- ``aux_loss``: a differentiable 0-dim tensor (0 for routers without one, and
  0 in eval mode unless tracking, see below);
- ``metrics``: that forward's routing statistics (a dict of detached 0-dim
  tensors; empty when not tracking).

Bookkeeping costs time, so a layer pays only for what is asked:

- in training mode it computes the auxiliary losses that have a weight (the
  training objective), and nothing else;
- routing statistics (and the unweighted losses as metrics) only while
  *tracking*: after ``track_routing(model)`` on every forward, or after
  ``track_routing(model, "train")`` on training-mode forwards only (what
  moebench's trainer uses, so evaluation stays out of the training means).
  At 256 experts the statistics cost up to 5% of a Tokens Choice layer's
  forward + backward (entropies and a logsumexp over every token's gates).

Every tracked forward adds its statistics to running sums on the layer;
``collect_metrics(model)`` returns their means since its previous call and
starts new sums, so a log line shows the whole interval, not one batch.
"""

from __future__ import annotations

import torch
from torch import nn


class MoELayer(nn.Module):
    """Base class of the token-mixing MLP replacements (dense included)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.metrics: dict[str, torch.Tensor] = {}
        self.track_routing: bool | str = False  # False, True, or "train" (see track_routing)
        self._metric_keys: tuple[str, ...] = ()
        self._metric_sums: torch.Tensor | None = None

    @property
    def tracking(self) -> bool:
        """Whether this forward computes routing statistics."""
        mode = self.track_routing
        return mode is True or (mode == "train" and self.training)

    @property
    def computes_losses(self) -> bool:
        """Whether this forward computes auxiliary losses: in training (the weighted ones), and
        while tracking (every one, as metrics)."""
        return self.training or self.tracking

    def record_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        """Keep one tracked forward's statistics and add them to the running sums."""
        metrics = {key: value.detach() for key, value in metrics.items()}
        self.metrics = metrics
        keys = tuple(metrics)
        if not keys:
            return
        if keys != self._metric_keys:  # first tracked forward of this layer
            self._metric_keys, self._metric_sums = keys, None
        # One tensor [sum of each key..., count], rebound rather than updated in place:
        # under torch.compile an int counter or a dict of sums would be guarded on
        # and recompile every step.
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in metrics.values()) else torch.float32
        values = [value.to(dtype) for value in metrics.values()]
        row = torch.stack([*values, torch.ones_like(values[0])])
        self._metric_sums = row if self._metric_sums is None else self._metric_sums + row

    def pop_metric_means(self) -> dict[str, float]:
        """Means of the statistics over the tracked forwards since the last call; resets the sums."""
        sums, self._metric_sums = self._metric_sums, None
        if sums is None:
            return {}
        *totals, count = sums.tolist()
        return {key: total / count for key, total in zip(self._metric_keys, totals)}

    def diagnostics(self) -> dict[str, float]:
        """Statistics of the weights themselves (no forward needed); see ``collect_diagnostics``."""
        return {}

    def active_expert_fraction(self) -> float:
        """Share of this layer's expert parameters one token passes through."""
        return 1.0


def moe_layers(model: nn.Module):
    """``(name, layer)`` for every MoE layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def layers_with(model: nn.Module, flag: str) -> list[nn.Module]:
    """The MoE layers of ``model`` whose attribute ``flag`` is true: ``"balancing"`` for the layers that
    ``update_balancing_bias`` moves, ``"adapts_l1"`` for those of ``update_l1_coefficient``."""
    return [layer for _, layer in moe_layers(model) if getattr(layer, flag, False)]


def several_ranks(group=None) -> bool:
    """Whether a per-step update must sum its counts over ranks first: torch.distributed initialised, with
    more than one process in ``group``."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def track_routing(model: nn.Module, enabled: bool | str = True) -> nn.Module:
    """Make every MoE layer of ``model`` compute routing statistics (and every auxiliary
    loss as a metric): ``True`` on every forward, ``"train"`` on training-mode forwards
    only, ``False`` never (the default: training then computes only the weighted
    auxiliary losses). Returns ``model``."""
    if enabled not in (True, False, "train"):
        raise ValueError(f"track_routing takes True, False or 'train', got {enabled!r}")
    for _, layer in moe_layers(model):
        layer.track_routing = enabled
    return model


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of every MoE layer's last forward."""
    losses = [m.aux_loss for _, m in moe_layers(model)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


@torch.no_grad()
def update_balancing_bias(model: nn.Module, group=None) -> int:
    """Auxiliary-loss-free balancing (Wang et al. 2024): call after each optimizer step. Every MoE
    layer with a balancing bias (Tokens Choice with ``bias_rate`` > 0) moves it by
    b_i <- b_i + u * sign(mean load - load_i), the load being the choices of its training forwards
    since the previous call, which then start again from 0. Under torch.distributed (initialised,
    more than one process in ``group``) the loads are summed over the ranks first (one
    ``all_reduce`` for all layers; every rank must call this), so every rank applies the same
    update and the bias stays replicated, with or without expert parallelism. Returns the number of
    layers updated."""
    import torch.distributed as dist

    layers = layers_with(model, "balancing")
    if not layers:
        return 0
    loads = [layer.take_load() for layer in layers]
    if several_ranks(group):
        flat = torch.cat([load.to(torch.float64) for load in loads])  # exact sums of counts
        dist.all_reduce(flat, group=group)
        loads = list(flat.split([load.numel() for load in loads]))
    for layer, load in zip(layers, loads):
        layer.apply_load(load)
    return len(layers)


@torch.no_grad()
def discard_balancing_load(model: nn.Module) -> None:
    """Forget the loads counted since the last bias update (a skipped optimizer step changes no bias)."""
    for layer in layers_with(model, "balancing"):
        layer.take_load()


def collect_metrics(model: nn.Module) -> dict[str, float]:
    """Routing metrics as ``{"<module name>/<key>": float}`` (just ``key`` for a bare layer): for each layer the mean
    over its tracked forwards since the previous call (which are then forgotten).
    A layer with no tracked forward since then contributes nothing."""
    out = {}
    for name, module in moe_layers(model):
        for key, value in module.pop_metric_means().items():
            out[f"{name}/{key}" if name else key] = value
    return out


@torch.no_grad()
def collect_diagnostics(model: nn.Module) -> dict[str, float]:
    """Weight statistics of every MoE layer as ``{"<module name>/<key>": float}``:
    mean pairwise cosine similarity of the experts' weights (do experts diverge?),
    of Soft MoE's slot parameters and of the sparse routers' gate rows, and Soft
    MoE's logit scale. Costs one pass over the weights: cheap enough per epoch."""
    out = {}
    for name, module in moe_layers(model):
        for key, value in module.diagnostics().items():
            out[f"{name}/{key}" if name else key] = value
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters, and the "active" ones a single token passes through.

    Active counts every non-expert parameter once, plus each MoE layer's expert
    parameters scaled by the share of experts a token reaches (Soft MoE: all of
    them, every token feeds every slot; Tokens Choice: k/E; Experts Choice: C/E
    in expectation). This is the usual "active parameters" of the MoE literature.
    """
    from .experts import Experts  # local: avoid an import cycle

    total = sum(p.numel() for p in model.parameters())
    active = float(total)
    for module in model.modules():
        if isinstance(module, MoELayer):
            expert_params = sum(
                p.numel() for m in module.modules() if isinstance(m, Experts) for p in m.parameters()
            )
            active -= expert_params * (1.0 - module.active_expert_fraction())
    return {"total": int(total), "active": int(round(active))}
