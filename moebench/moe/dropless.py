"""Dropless expert calls (MegaBlocks, Gale et al., arXiv 2211.15841): every (token, expert) pair a
router asks for is processed; no capacity, no buffer of fixed size, nothing dropped.

The pairs are sorted by expert (stable: token order inside each expert) and the experts then run
in one of two ways, both without a Python loop over experts:

- ``grouped``: ``torch._grouped_mm`` over the sorted rows, one contiguous run of rows per
  expert. It computes exactly one expert MLP per pair: no padding, FLOPs = the useful work.
  It needs float32/bf16/fp16 on CPU (bf16 on a Hopper GPU), rows of a multiple of 16 bytes
  (dim and hidden width multiples of 8 cover every case), and plain ``Experts`` (not sharded).
- ``padded``: the rows scattered into (E, max load, d) buffers, one ``baddbmm`` over the stacked
  weights (``Experts.forward``, so expert parallelism's ``ShardedExperts`` works too). Rows past
  an expert's load read token 0 and are never combined (their gradient is exactly 0); they are
  computed, and ``FlopCounterMode`` counts them: padded FLOPs = E * max load rows.

Measured on this project's CPU (2 cores shared with training, 1 thread, ViT-Ti widths d=192,
h=768, forward + backward, one run each). The expert part alone, N=4096 tokens: E=32, k=1
(max/mean load 1.20): grouped 1.44 s, padded 1.56 s (padded/grouped 1.09); k=2: 0.94; E=128,
k=3 (max/mean 1.38): 1.28; d=64, h=256, N=1024: 1.07. The whole layer in ``moebench bench``
(E=32, k=1, 32 images x 64 tokens): grouped 768 ms, padded 953 ms (1.24; FLOPs 1.43x dense's
against 1.02x), capacity Tokens Choice at C=1 705 ms. Padding costs in proportion to max/mean
load, which a router early in training (or ReMoE's varying number of experts per token) makes
large; the grouped matmul's cost does not depend on it. So ``grouped`` is the default wherever
it runs (``select_matmul``), ``padded`` the fallback (float64, odd widths, sharded experts) and
a choice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .experts import Experts

MATMULS = ("grouped", "padded")


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_runs(experts, x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these experts on rows like ``x`` in this precision."""
    if not grouped_mm_available() or type(experts) is not Experts:
        return False
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else experts.w1.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0)):
        return False  # CUDA's kernel: bf16 on Hopper or later (untested here; CPU is what this project measured)
    if x.device.type not in ("cpu", "cuda"):
        return False
    align = 128 // torch.finfo(dtype).bits  # elements per 16 bytes
    return experts.dim % align == 0 and experts.hidden_dim % align == 0


def select_matmul(choice: str | None, experts, x: torch.Tensor) -> str:
    """The expert call a forward uses: the requested one, the grouped matmul by default where it runs, else padding.
    A requested ``grouped`` that cannot run here (float64, odd widths) pads too: the result is the same."""
    if choice == "padded":
        return "padded"
    return "grouped" if grouped_runs(experts, x) else "padded"


@dataclass
class Pairs:
    """(token, expert) pairs sorted by expert: ``token``, ``expert`` and ``weight`` (A,), ``counts`` (E,)."""
    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor


def sort_pairs(token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, num_experts: int) -> Pairs:
    """The pairs in expert order (a stable sort keeps token order inside each expert)."""
    expert, order = expert.sort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))
    return Pairs(token.index_select(0, order), expert, weight.index_select(0, order), counts)


def _grouped(experts: Experts, rows: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    autocast = torch.is_autocast_enabled(rows.device.type)
    dtype = torch.get_autocast_dtype(rows.device.type) if autocast else experts.w1.dtype
    offsets = pairs.counts.cumsum(0).to(torch.int32)
    w1, b1, w2, b2 = (p.to(dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    h = F.gelu(torch._grouped_mm(rows.to(dtype), w1, offs=offsets) + b1.index_select(0, pairs.expert))
    return torch._grouped_mm(h, w2, offs=offsets) + b2.index_select(0, pairs.expert)


def _padded(experts, x: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, int]:
    num_experts, dim = pairs.counts.numel(), x.shape[-1]
    load = int(pairs.counts.max())
    start = pairs.counts.cumsum(0) - pairs.counts
    rank = torch.arange(pairs.expert.numel(), device=x.device) - start.index_select(0, pairs.expert)
    slot = pairs.expert * load + rank
    # As Tokens Choice's buffers: an unfilled slot reads token 0, is never read back, gets no gradient.
    source = torch.zeros(num_experts * load, dtype=torch.long, device=x.device).scatter_(0, slot, pairs.token)
    out = experts(x.index_select(0, source).view(num_experts, load, dim))
    return out.reshape(num_experts * load, dim).index_select(0, slot), load


def eager_under_compile(fn):
    """``torch.compiler.disable(fn)``, made at the first call: the decorator imports torch._dynamo, which costs
    as much as importing torch itself and which only a compiled model needs (torch.compile has imported it)."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


# Eager under torch.compile: the shapes are data-dependent, and the grouped matmul's meta kernel (what tracing
# runs) refuses float32, which the CPU kernel computes.
@eager_under_compile
def expert_rows(experts, x: torch.Tensor, pairs: Pairs, matmul: str) -> tuple[torch.Tensor, float]:
    """Every pair's expert output (A, d), in pair order, under the caller's autocast; and the share of the
    computed rows that were padding (0 for the grouped matmul)."""
    if pairs.token.numel() == 0:  # (ReMoE: no positive gate in the batch) the experts still get a gradient, of
        # zeros: data-parallel training expects one for every parameter at every step
        untouched = sum(p.sum() for p in experts.parameters()) * 0
        return x.new_zeros(0, x.shape[-1]) + untouched, 0.0
    if matmul == "grouped":
        return _grouped(experts, x.index_select(0, pairs.token), pairs), 0.0
    out, load = _padded(experts, x, pairs)
    return out, 1.0 - pairs.token.numel() / (load * pairs.counts.numel())


def combine_rows(x: torch.Tensor, out: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """sum over each token's pairs of weight * expert output: (N, d) in x's dtype; 0 for a token without pairs."""
    weighted = out.to(x.dtype) * pairs.weight.unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, pairs.token, weighted)


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's count of ``aten._grouped_mm`` (it has none): 2 per multiply-add. Every case contracts
    a's last axis or rows with b's: 2D x 3D (M, K) x (G, K, N), the weight gradient's 2D x 2D (K, M) x (M, N)
    and 3D x 3D all cost 2 x (elements of a) x N."""
    elements = 1
    for size in a_shape:
        elements *= size
    return 2 * elements * b_shape[-1]
