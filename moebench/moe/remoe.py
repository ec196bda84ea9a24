"""ReMoE (Wang, Zhu and Chen, ICLR 2025, arXiv 2412.14711; code thu-ml/ReMoE): ReLU gates, no top-k.

Gates g = ReLU(x W) (a bias-free gate, no softmax, no top-k, no noise); every expert whose gate is
positive processes the token, so a token runs 0 to E experts and the dropless expert call
(``dropless.py``) is the only one that fits. y = sum_e g_e * expert_e(x).

Sparsity comes from an L1 penalty on the gates that also balances the load (the paper's section 3.4,
the code's ``ReLURouter.apply_l1_reg``, which reuses Switch's load-balancing formula): per layer and
forward over its N tokens,

    reg = E / (k N^2) * sum_e (sum_t g_te) * n_e,    n_e = #{t : g_te > 0} (a count: no gradient)

and the layer's auxiliary loss is lambda * reg. Like every other auxiliary loss here, and like the code,
each layer adds its own (the paper writes the mean over layers, 1/L of this: lambda absorbs the factor).

lambda (buffer ``l1_coeff``, shared in value by every ReMoE layer, as the code's one coefficient) starts
at ``l1_init`` (the code's 1e-8) and after each optimizer step ``update_l1_coefficient(model)`` moves it
by lambda <- lambda * factor^sign(target - S) (``l1_factor``: the paper's alpha = 1.2), with target
1 - k/E and S the realised sparsity (share of zero gates) of every ReMoE layer's training forwards since
the previous update, summed over the data-parallel ranks. At S = target lambda stays (the paper's sign;
the code divides then). Evaluation forwards count nothing and move nothing. lambda is state, not a
parameter: in ``state_dict``, float32 in a bf16 model (as the code keeps it).

FLOPs: the gate (2 d E per token) plus 4 d h per processed (token, expert) pair: k experts per token in
expectation at the target sparsity; ``gflops_per_image`` measures the trained model's actual count. Training
costs more early on (a fresh layer passes half its gates): the buffer ``trained_gates`` counts the gates
of the training steps, and ``trained_forward_flops()`` turns them into the FLOPs that the training compute
(``cost.train_gflops_total``) counts for this layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..router_options import REMOE, remoe_problem
from .base import MoELayer, layers_with, several_ranks
from .dropless import MATMULS, Pairs, combine_rows, expert_rows, select_matmul
from .experts import Experts
from .metrics import load_stats, mean_pairwise_cosine
from .precision import as_float32, routing_precision
from .registry import Router, register
from .sparse import SparseRouting


class ReMoE(MoELayer):
    """ReLU-gated experts with the adaptive, load-balancing L1 penalty (see the module's docstring)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        k: int = 1,
        *,
        l1_init: float = 1e-8,
        l1_factor: float = 1.2,
        identical_init: bool = False,
        dropless_matmul: str | None = None,
    ):
        super().__init__()
        problem = remoe_problem({"num_experts": num_experts, "k": k, "l1_init": l1_init, "l1_factor": l1_factor})
        if problem:
            raise ValueError(problem)
        if dropless_matmul not in (None, *MATMULS):
            raise ValueError(f"dropless_matmul must be grouped, padded or None, got {dropless_matmul!r}")
        self.num_experts, self.k, self.l1_factor = num_experts, k, l1_factor
        self.target_sparsity = 1.0 - k / num_experts
        self.dropless_matmul = dropless_matmul
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden_dim, identical_init=identical_init)
        self.register_buffer("l1_coeff", torch.tensor(float(l1_init)))  # persistent: checkpoints carry lambda
        # (positive gates, gates) of every counted training forward so far, summed over ranks: the training
        # compute, which moves with the sparsity (half the experts per token at the start, k at the target)
        self.register_buffer("trained_gates", torch.zeros(2, dtype=torch.float64))
        self._gate_counts: torch.Tensor | None = None  # (positive gates, gates) since the last lambda update

    def active_expert_fraction(self) -> float:
        return self.k / self.num_experts  # in expectation, at the target sparsity

    adapts_l1 = True  # update_l1_coefficient's mark

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(x W) in float32 (x: (..., d))."""
        return F.relu(F.linear(x, as_float32(self.gate.weight)))

    @staticmethod
    def pairs(gates: torch.Tensor) -> Pairs:
        """The positive gates of (N, E) as (token, expert) pairs in expert order (nonzero of the transpose is)."""
        active = gates > 0
        expert, token = active.t().nonzero(as_tuple=True)
        return Pairs(token, expert, gates[token, expert], active.sum(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        with routing_precision(x):
            flat = as_float32(x).reshape(batch * tokens, dim)
            gates = self.gates(flat)
            pairs = self.pairs(gates)
        out, padding = expert_rows(self.experts, flat, pairs, select_matmul(self.dropless_matmul, self.experts, x))
        with routing_precision(x):
            y = combine_rows(flat, as_float32(out), pairs).view(batch, tokens, dim)
            self.aux_loss = flat.new_zeros(())
            reg = self.l1_penalty(gates, pairs.counts) if self.computes_losses else None
            if reg is not None:
                self.aux_loss = self.l1_coeff.to(reg.dtype) * reg
            if self.training:  # lambda's evidence: training forwards only; rebound, not in place (torch.compile)
                counts = torch.stack([pairs.counts.sum(), torch.tensor(gates.numel(), device=x.device)]).double()
                self._gate_counts = counts if self._gate_counts is None else self._gate_counts + counts
            if self.tracking:
                self.record_metrics(self.statistics(gates, pairs, reg, padding))
            else:
                self.metrics = {}
        return y.to(x.dtype)

    def l1_penalty(self, gates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """E / (k N^2) * sum_e (sum_t g_te) * n_e: the L1 norm of the gates, each expert's weighted by its load."""
        tokens = gates.shape[0]
        return (gates.sum(0) * counts.to(gates.dtype)).sum() * (self.num_experts / (self.k * tokens * tokens))

    @torch.no_grad()
    def statistics(self, gates, pairs: Pairs, reg, padding: float) -> dict[str, torch.Tensor]:
        per_token = (gates > 0).sum(-1).to(gates.dtype)
        return {
            "sparsity": 1.0 - per_token.mean() / self.num_experts,
            "experts_per_token": per_token.mean(),
            "tokens_0_experts": (per_token == 0).to(gates.dtype).mean(),
            "l1_coeff": self.l1_coeff.to(gates.dtype),
            "l1_loss": reg.detach() if reg is not None else gates.new_zeros(()),
            **load_stats(pairs.counts),
            "padding": gates.new_tensor(padding),
        }

    @torch.no_grad()
    def take_gate_counts(self) -> torch.Tensor:
        """(positive gates, gates) of the training forwards since the last call, float64 (zeros if none)."""
        counts, self._gate_counts = self._gate_counts, None
        return torch.zeros(2, dtype=torch.float64, device=self.l1_coeff.device) if counts is None else counts

    def trained_forward_flops(self) -> float:
        """The forward FLOPs of the training steps so far (``trained_gates``), counted as ``FlopCounterMode`` counts
        this layer: the gate, 2 d per gate, and 4 d h per processed (token, expert) pair (the grouped matmul's
        rows; the padded fallback's padding rows are left out)."""
        positive, gates = (float(v) for v in self.trained_gates)
        d, h = self.experts.dim, self.experts.hidden_dim
        return 2.0 * d * gates + 4.0 * d * h * positive

    @torch.no_grad()
    def apply_sparsity(self, sparsity: float) -> None:
        """lambda <- lambda * factor^sign(target - sparsity)."""
        if sparsity < self.target_sparsity:
            self.l1_coeff.mul_(self.l1_factor)
        elif sparsity > self.target_sparsity:
            self.l1_coeff.div_(self.l1_factor)

    @torch.no_grad()
    def routing(self, x: torch.Tensor) -> SparseRouting:
        """Per token and expert (B, T, E): the ReLU gates are the combine weights; every positive one is
        processed (nothing is dropped)."""
        with routing_precision(x):
            gates = self.gates(as_float32(x))
        active = gates > 0
        return SparseRouting(gates, active, active, gates, chooser=self.chooser)

    chooser = "experts"  # as Experts Choice: a token may get no expert or several (inspect's statistics)

    def diagnostics(self) -> dict[str, float]:
        return {
            "expert_similarity": float(self.experts.weight_similarity()),
            "gate_similarity": float(mean_pairwise_cosine(self.gate.weight.detach())),
        }

    def _apply(self, fn, recurse: bool = True):
        """The coefficient follows the device but stays float32 (or wider) in a bf16 or fp16 model: 1.2x steps
        from 1e-8 must not round. The training counts stay float64."""
        coeff, counts = self._buffers["l1_coeff"], self._buffers["trained_gates"]
        out = super()._apply(fn, recurse)
        moved = self._buffers["l1_coeff"]
        if moved.dtype not in (torch.float32, torch.float64):
            self._buffers["l1_coeff"] = coeff.to(device=moved.device, dtype=torch.float32)
        # the counts stay float64 whatever the model's dtype: float32 is exact only to 2^24 gates
        self._buffers["trained_gates"] = counts.to(device=self._buffers["trained_gates"].device, dtype=torch.float64)
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, k={self.k} (target sparsity {self.target_sparsity:g}), "
                f"l1_factor={self.l1_factor}")


@torch.no_grad()
def update_l1_coefficient(model: nn.Module, group=None) -> int:
    """ReMoE: call after each optimizer step. The realised sparsity S of every ReMoE layer's training forwards
    since the previous call (pooled over layers and, under torch.distributed, summed over the ranks: one
    ``all_reduce``, every rank must call this) moves every layer's lambda by factor^sign(target - S), so it
    stays one value replicated over layers and ranks. Returns the number of layers updated (0 when there
    was no training forward: nothing moves)."""
    import torch.distributed as dist

    layers = layers_with(model, "adapts_l1")
    if not layers:
        return 0
    per_layer = torch.stack([layer.take_gate_counts().to(layers[0].l1_coeff.device) for layer in layers])
    if several_ranks(group):
        dist.all_reduce(per_layer, group=group)
    counts = per_layer.sum(0)
    if counts[1] == 0:
        return 0
    sparsity = 1.0 - float(counts[0] / counts[1])
    for layer, layer_counts in zip(layers, per_layer):
        layer.apply_sparsity(sparsity)
        layer.trained_gates += layer_counts.to(layer.trained_gates)
    return len(layers)


@torch.no_grad()
def discard_gate_counts(model: nn.Module) -> None:
    """Forget the gate counts since the last update (a skipped optimizer step moves no lambda)."""
    for layer in layers_with(model, "adapts_l1"):
        layer.take_gate_counts()


class AtTargetSparsity(ReMoE):
    """For ``moebench bench``: a ReMoE whose gates are shifted down so that, on standard normal tokens, k/E of
    them are positive, as after training (a fresh ReMoE passes half: logits ~ N(0, |w|^2) at x ~ N(0, I))."""

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        weight = as_float32(self.gate.weight)
        std = weight.norm(dim=1)  # each logit's std at x ~ N(0, I)
        shift = std * torch.special.ndtri(torch.tensor(1.0 - self.k / self.num_experts, dtype=weight.dtype))
        return F.relu(F.linear(x, weight) - shift)



def _label(get) -> list[str]:
    words = [f"E{get('num_experts')}", f"k{get('k')}"]
    if get("l1_factor") not in (None, 1.2):
        words.append(f"alpha{get('l1_factor'):g}")
    if get("l1_init") not in (None, 1e-8):
        words.append(f"lambda0_{get('l1_init'):g}")
    return words


register(Router(
    name="remoe",
    build=lambda dim, hidden_dim, num_tokens, options: ReMoE(dim, hidden_dim, **options),
    options=REMOE.options, check=REMOE.check,  # router_options.py
    label=_label, marker="X", order=4,
    # At init about half of the gates are positive (E/2 experts per token: ReMoE's first steps); the bench times
    # the layer as training leaves it, at its target sparsity: k=1 expert per token in expectation.
    bench=lambda experts, tokens: {
        f"remoe_{matmul}/E={experts}": (lambda matmul: lambda d, h: AtTargetSparsity(
            d, h, experts, k=1, dropless_matmul=matmul))(matmul) for matmul in MATMULS},
))
