"""The interval statistics of arms over seeds: what `moebench pareto` and the experiment scripts share.

Student-t quantiles in closed form (no SciPy), the 95% interval of a mean over
seeds, Welch's interval of the difference of two arms' means, and the paired
interval over the seeds two arms share.
"""

from __future__ import annotations

import math
import statistics


def _t_within(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (closed form, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(2, df, 2):  # 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ... up to c^(df-2)
            term *= c2 * (j - 1) / j
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0
    for j in range(3, df, 2):  # 1 + (2/3) c^2 + (2*4)/(3*5) c^4 + ... up to c^(df-3)
        term *= c2 * (j - 1) / j
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(confidence: float, df: int) -> float:
    """The t such that P(|T| <= t) = ``confidence`` for ``df`` degrees of freedom (bisection)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while _t_within(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_within(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def ci95_half_width(values: list[float]) -> float | None:
    """Half-width of the 95% t-interval of the mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    return t_quantile(0.95, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def welch_ci95(a: list[float], b: list[float]) -> float | None:
    """Half-width of the 95% Welch interval of mean(a) - mean(b); None without two values on each side.
    Its degrees of freedom are rounded down (a slightly wider, conservative interval)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t_quantile(0.95, max(1, math.floor(df))) * math.sqrt(va + vb)


def paired_ci95(a: dict[int, float], b: dict[int, float]) -> tuple[float, float | None, int]:
    """Mean of a[seed] - b[seed] over the seeds both have, its 95% half-width, and how many seeds."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return math.nan, None, 0
    return statistics.fmean(diffs), ci95_half_width(diffs), len(diffs)
