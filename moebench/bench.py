"""`moebench bench`: forward+backward time of each router as a ratio to the dense MLP.

All layers of one run are timed interleaved (round-robin over repeats) on the
same machine, and medians are compared, so the ratios survive a noisy shared
machine better than absolute times. Targets (issue #2), at dim 192, hidden
768, 64 tokens per example, batch 128:

- soft_64_slots: Soft MoE with 64 slots in all (E = 8..64, p = 64/E): time
  ratio to dense <= 1.15 x its FLOP ratio to dense;
- soft_256_slots: 256 slots in all, E = 8 -> 256: time(256) <= 1.3 x time(8);
- tokens_choice / experts_choice (k=1, C=1): time(256) <= 1.5 x time(8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .moe import DenseMLP, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE


def layer_specs(experts: list[int]) -> dict[str, tuple[str, callable]]:
    """name -> (sweep, factory(dim, hidden))."""
    specs = {"dense": ("dense", lambda d, h: DenseMLP(d, h))}
    for e in experts:
        if 64 % e == 0 and e <= 64:
            specs[f"soft64/E={e}"] = ("soft_64_slots", lambda d, h, e=e: SoftMoE(d, h, e, 64 // e))
        if 256 % e == 0:
            specs[f"soft256/E={e}"] = ("soft_256_slots", lambda d, h, e=e: SoftMoE(d, h, e, 256 // e))
        specs[f"tokens_choice/E={e}"] = (
            "tokens_choice", lambda d, h, e=e: TokensChoiceMoE(d, h, e, k=1, capacity_factor=1.0, noise_std=0.0)
        )
        specs[f"experts_choice/E={e}"] = (
            "experts_choice", lambda d, h, e=e: ExpertsChoiceMoE(d, h, e, capacity_factor=1.0)
        )
    return specs


def forward_flops(layer: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x.detach())  # FlopCounterMode's module hooks reject no-grad views of grad-requiring leaves
    return counter.get_total_flops()


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    y = layer(x)
    (y * grad).sum().add(layer.aux_loss).backward()
    return time.perf_counter() - start


def run(dim: int, hidden: int, tokens: int, batch: int, experts: list[int], repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    grad = torch.randn(batch, tokens, dim)
    specs = layer_specs(experts)
    layers = {name: factory(dim, hidden).train() for name, (_, factory) in specs.items()}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for round_ in range(warmup + repeats):
        for name, layer in layers.items():  # interleaved: machine noise hits every layer alike
            t = fwd_bwd(layer, x, grad)
            layer.zero_grad(set_to_none=True)
            x.grad = None
            if round_ >= warmup:
                times[name].append(t)
    dense_time = statistics.median(times["dense"])
    dense_flops = forward_flops(layers["dense"], x)
    rows = []
    for name, (sweep, _) in specs.items():
        med = statistics.median(times[name])
        rows.append({
            "layer": name, "sweep": sweep, "experts": getattr(layers[name], "num_experts", None),
            "median_s": med, "time_ratio_to_dense": med / dense_time,
            "flop_ratio_to_dense": forward_flops(layers[name], x) / dense_flops,
        })
    return {"rows": rows, "targets": check_targets(rows)}


def check_targets(rows: list[dict]) -> list[dict]:
    by_sweep: dict[str, list[dict]] = {}
    for row in rows:
        by_sweep.setdefault(row["sweep"], []).append(row)
    targets = []
    for row in by_sweep.get("soft_64_slots", []):
        bound = 1.15 * row["flop_ratio_to_dense"]
        targets.append({"target": f"{row['layer']}: time ratio <= 1.15 x FLOP ratio ({bound:.3f})",
                        "measured": row["time_ratio_to_dense"], "met": row["time_ratio_to_dense"] <= bound})
    for sweep, limit in (("soft_256_slots", 1.3), ("tokens_choice", 1.5), ("experts_choice", 1.5)):
        sweep_rows = sorted(by_sweep.get(sweep, []), key=lambda r: r["experts"])
        if len(sweep_rows) >= 2:
            growth = sweep_rows[-1]["median_s"] / sweep_rows[0]["median_s"]
            targets.append({
                "target": f"{sweep}: time(E={sweep_rows[-1]['experts']}) / time(E={sweep_rows[0]['experts']}) <= {limit}",
                "measured": growth, "met": growth <= limit,
            })
    return targets


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "malloc_tuned": os.environ.get("MOEBENCH_MALLOC_TUNING", "1") != "0",
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moebench bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per example")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    result = run(args.dim, args.hidden, args.tokens, args.batch, args.experts, args.repeats, args.warmup)
    result["setup"] = {k: v for k, v in vars(args).items() if k != "out"}
    result["machine"] = machine()
    table = Table(title=f"fwd+bwd time per layer vs dense (median of {args.repeats}; {result['machine']['cores']} cores)")
    for col in ("layer", "median ms", "time / dense", "FLOPs / dense"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for row in result["rows"]:
        table.add_row(row["layer"], f"{1e3 * row['median_s']:.1f}", f"{row['time_ratio_to_dense']:.3f}",
                      f"{row['flop_ratio_to_dense']:.3f}")
    console = Console()
    console.print(table)
    for t in result["targets"]:
        console.print(f"[{'green' if t['met'] else 'red'}]{'MET ' if t['met'] else 'MISS'}[/] {t['target']}: {t['measured']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
