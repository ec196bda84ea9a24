"""Expert capacity (buffer size per expert and group), shared by the sparse routers."""

from __future__ import annotations

import math

Rounding = str | int  # "ceil", "round", or N: ceil, then up to a multiple of N


def compute_capacity(
    num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1, rounding: Rounding = "ceil"
) -> int:
    """Tokens each expert may take from a group of ``num_tokens`` tokens.

    ``raw = k * num_tokens * capacity_factor / num_experts``, then ``"ceil"``
    (Tokens Choice default), ``"round"`` (half up; the paper's Experts Choice
    comparison) or an integer N (ceil, then up to a multiple of N: the V-MoE
    code's default of 4). Clamped to [1, num_tokens]: an expert can never
    receive a token twice, and an empty buffer would silently disable it.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    raw = k * num_tokens * capacity_factor / num_experts
    if rounding == "ceil":
        capacity = math.ceil(raw - 1e-9)  # float fuzz: 30 * 0.1 must give 3, not 4
    elif rounding == "round":
        capacity = math.floor(raw + 0.5)
    elif isinstance(rounding, int) and not isinstance(rounding, bool) and rounding >= 1:
        capacity = math.ceil(raw - 1e-9)
        capacity += -capacity % rounding
    else:
        raise ValueError(f"capacity rounding must be 'ceil', 'round' or an int >= 1, got {rounding!r}")
    return max(1, min(capacity, num_tokens))
