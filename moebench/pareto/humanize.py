"""Numbers for humans: SI prefixes, FLOPs, megabytes, percentages with intervals.
"""

from __future__ import annotations





def si(value: float, digits: int = 3) -> str:
    """1234567 -> '1.23M', 30e6 -> '30M', 8779 -> '8.78k', 0.5 -> '0.5'."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def human_flops(gflops: float) -> str:
    return _with_unit(si(gflops * 1e9), "FLOPs")


def _with_unit(number: str, unit: str) -> str:
    """'30M', 'FLOPs' -> '30 MFLOPs': the SI prefix joins the unit."""
    prefix = number[-1] if number[-1] in "kMGT" else ""
    return f"{number[:-1] if prefix else number} {prefix}{unit}"


def human_mb(mb: float) -> str:
    return f"{mb / 1024:.3g} GB" if mb >= 1024 else f"{mb:.3g} MB"


def human_percent(fraction: float, half_width: float | None = None) -> str:
    text = f"{100 * fraction:.2f}"
    return f"{text} ± {100 * half_width:.2f}%" if half_width is not None else f"{text}%"


def human(value: float, unit: str) -> str:
    if unit == "flops":
        return human_flops(value)
    if unit == "count":
        return si(value)
    if unit == "mb":
        return human_mb(value)
    return f"{value:.3g} ms"
