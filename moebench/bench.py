"""`moebench bench`: the router layers against dense, the machine's matmul peak and public ports.

Everything is measured in ONE process, round-robin: every round times each
case once (layers, the peers' layers, and a plain fp32 matmul that gives the
machine's peak under the load of that moment), and medians over rounds are
compared. On a shared machine the absolute times swing with the load; the
ratios survive it far better, so the targets are ratios (issue #12), at dim
192, hidden 768, 64 tokens per example, batch 128, forward + backward:

1. ``SoftMoE`` >= 1.2x faster than lucidrains/soft-moe-pytorch at 8, 64, 256
   experts (64, 64, 256 slots);
2. ``TokensChoiceMoE`` top-2 >= 1.2x faster than lucidrains/st-moe-pytorch at
   equal expert buffers (st-moe at its capacity factor 1.25 routing the batch
   as one sequence, ours at C = 0.625 in groups of 8 images: both hold 1.25x
   the tokens), and <= 2.0x ``DenseMLP``'s time at every expert count;
3. time(256 experts) / time(8) <= 1.5 for Tokens and Experts Choice (k=1,
   C=1), <= 1.3 for Soft MoE at 256 slots; Soft MoE at 64 slots: time ratio to
   dense <= 1.15x its FLOP ratio;
4. every layer's forward + backward at >= 70% of the measured fp32 matmul peak;
5. inference (eval, no grad): batch-1 latency and batch-64 throughput of each
   router against dense, for the layer and for the ViT of ``experiment=cifar10``.

Beside the layers, ``experts_bmm/E=N`` times the stacked-expert call alone on
the tokens cut into N equal buffers: where the batched matmul itself stands
against the peak at that shape, i.e. how much of a layer's shortfall is routing
and how much is the matmul (no target applies to it). ``*_tracked/E=N`` (at
the first and last expert count) time Tokens and Experts Choice with the
opt-in routing statistics on, as ``moebench train`` runs them: their cost.

The peers are imported from ``--peers DIR`` (``DIR/soft-moe-pytorch`` and
``DIR/st-moe-pytorch``: snapshots of their public repositories, never part of
moebench; they need ``einops``, ``einx``, ``beartype``, ``colt5-attention``)
and skipped, with a note, when absent. Importing them runs their code: a peers dir
(or anything in it) owned by another user or writable by others is refused.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import arguments
from .allocator import allocator_tuning_applied
from .arguments import PEER_REPOS, unsafe_peers  # noqa: F401 (checked before torch is imported)
from .cost import CUSTOM_FLOPS
from .moe import DenseMLP, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, registry, track_routing
from .moe.experts import Experts

PEER_EXPERTS = (8, 64, 256)
ST_MOE_CAPACITY_FACTOR = 1.25  # st-moe's training default
ST_MOE_MIN_CAPACITY = 4  # st-moe never sizes a buffer below 4 rows
GROUP_IMAGES = 8  # Tokens Choice routing group (the paper's)


# ----------------------------------------------------------------------------- layers


def st_moe_capacity(sequence_tokens: int, experts: int) -> int:
    """Rows per expert and sequence in st-moe: floor(tokens * 1.25 / E), clamped to [4, tokens]
    (without k: top-2 choices share those rows)."""
    return max(min(sequence_tokens, int(sequence_tokens * ST_MOE_CAPACITY_FACTOR / experts)), ST_MOE_MIN_CAPACITY)


# Our top-2 layer at C = 1.25 / 2 holds 1.25x the tokens in its buffers, as many rows as st-moe
# holds when it routes the whole batch as one sequence (its rows per expert: st_moe_capacity);
# ceil per group of 8 images adds at most one row per expert and group (1.2x st-moe's rows at 256 experts).
EQUAL_BUFFER_FACTOR = ST_MOE_CAPACITY_FACTOR / 2


class ExpertsAlone(nn.Module):
    """The stacked-expert call alone, on the tokens cut into E equal buffers (no gate, no routing):
    Tokens Choice's expert work at k=1, C=1 with perfect balance. Its fraction of the matmul peak
    is what the batched matmul itself reaches at that shape, the ceiling for every sparse router."""

    def __init__(self, dim: int, hidden: int, experts: int):
        super().__init__()
        self.experts = Experts(experts, dim, hidden)
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        batch, tokens, dim = x.shape
        return self.experts(x.reshape(self.experts.num_experts, -1, dim)).reshape(batch, tokens, dim)


class PeerSoftMoE(nn.Module):
    """soft-moe-pytorch's SoftMoE with our expert MLP (Linear, GELU, Linear at 4x width)."""

    def __init__(self, module, dim: int, experts: int, slots: int):
        super().__init__()
        # offload_unused_experts_to_cpu=False: its per-forward .to(device) of every expert is no work
        # on a CPU; switched off so the peer is timed at its best.
        self.layer = module.SoftMoE(dim, num_experts=experts, num_slots=slots, expert_mult=4,
                                    offload_unused_experts_to_cpu=False)
        self.num_experts = experts
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        return self.layer(x)


class PeerSTMoE(nn.Module):
    """st-moe-pytorch's top-2 MoE with our expert MLP. It routes each sequence on its own; the
    whole batch is passed as one sequence (as issue #12 measured it), so that its buffers hold
    1.25x the tokens like ours at C = 0.625."""

    def __init__(self, module, dim: int, hidden: int, experts: int):
        super().__init__()
        experts_list = nn.ModuleList([nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                      for _ in range(experts)])
        self.layer = module.MoE(dim, num_experts=experts, gating_top_n=2,
                                capacity_factor_train=ST_MOE_CAPACITY_FACTOR, experts=experts_list)
        self.num_experts = experts
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        batch, tokens, dim = x.shape
        out = self.layer(x.reshape(1, batch * tokens, dim))
        self.aux_loss = out.total_aux_loss
        return out.outputs.reshape(batch, tokens, dim)


def import_peers(root: Path | None) -> tuple[dict, list[str]]:
    """{"soft": module, "st": module} for the peers found under ``root``, and notes on the missing."""
    found, notes = {}, []
    if root is None:
        return found, ["no --peers directory given: peers skipped"]
    for key, repo, package in PEER_REPOS:
        path = root / repo
        if not (path / package).is_dir():
            notes.append(f"{path / package} not found: {repo} skipped")
            continue
        sys.path.insert(0, str(path))
        try:
            found[key] = __import__(package)
        except ImportError as err:
            notes.append(f"{repo} not importable ({err}): skipped")
        finally:
            sys.path.remove(str(path))
    return found, notes


def training_specs(experts: list[int], tokens: int, peers: dict,
                   batch: int | None = None) -> dict[str, tuple[str, int | None, Callable]]:
    """name -> (sweep, experts, factory(dim, hidden))."""
    specs = {"dense": ("dense", None, lambda d, h: DenseMLP(d, h))}
    for e in experts:
        if batch is not None and (batch * tokens) % e == 0:
            specs[f"experts_bmm/E={e}"] = ("experts_bmm", e, lambda d, h, e=e: ExpertsAlone(d, h, e))
        if tokens % e == 0 and e <= tokens:
            specs[f"soft64/E={e}"] = ("soft_64_slots", e, lambda d, h, e=e: SoftMoE(d, h, e, tokens // e))
        if (4 * tokens) % e == 0:
            specs[f"soft256/E={e}"] = ("soft_256_slots", e, lambda d, h, e=e: SoftMoE(d, h, e, 4 * tokens // e))
        specs[f"tokens_choice/E={e}"] = (
            "tokens_choice", e, lambda d, h, e=e: TokensChoiceMoE(d, h, e, k=1, capacity_factor=1.0, noise_std=0.0))
        specs[f"experts_choice/E={e}"] = (
            "experts_choice", e, lambda d, h, e=e: ExpertsChoiceMoE(d, h, e, capacity_factor=1.0, group_size=8))
        specs[f"tokens_choice_top2/E={e}"] = (
            "tokens_choice_top2", e,
            lambda d, h, e=e: TokensChoiceMoE(d, h, e, k=2, capacity_factor=EQUAL_BUFFER_FACTOR, group_size=GROUP_IMAGES))
        if e in (experts[0], experts[-1]):  # what the opt-in routing statistics cost (a reference, not a target)
            specs[f"tokens_choice_tracked/E={e}"] = ("tokens_choice_tracked", e, lambda d, h, e=e: track_routing(
                TokensChoiceMoE(d, h, e, k=1, capacity_factor=1.0, noise_std=0.0), "train"))
            specs[f"experts_choice_tracked/E={e}"] = ("experts_choice_tracked", e, lambda d, h, e=e: track_routing(
                ExpertsChoiceMoE(d, h, e, capacity_factor=1.0, group_size=8), "train"))
    for router in registry.routers():  # routers that declare their own cases (plugins): one per expert count
        for e in experts if router.bench else ():
            specs.update({name: (name.split("/")[0], e, factory) for name, factory in router.bench(e, tokens).items()})
    for e in PEER_EXPERTS:
        if e not in experts:
            continue
        slots = max(1, tokens // e) if e <= tokens else 4 * tokens // e
        if "soft" in peers:
            specs[f"peer_soft_moe_pytorch/E={e}"] = (
                "peer_soft", e, lambda d, h, e=e, s=slots: PeerSoftMoE(peers["soft"], d, e, s))
        if "st" in peers:
            specs[f"peer_st_moe_pytorch/E={e}"] = ("peer_st", e, lambda d, h, e=e: PeerSTMoE(peers["st"], d, h, e))
    return specs


# ----------------------------------------------------------------------------- timing


def fwd_bwd_case(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        y = layer(x)
        (y * grad).sum().add(layer.aux_loss).backward()
        elapsed = time.perf_counter() - start
        layer.zero_grad(set_to_none=True)
        x.grad = None
        return elapsed
    return run


def matmul_case(m: int, k: int, n: int) -> tuple[Callable[[], float], int]:
    a, b = torch.randn(m, k), torch.randn(k, n)

    def run() -> float:
        start = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - start
    return run, 2 * m * k * n


def inference_case(model: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)
            return time.perf_counter() - start
    return run


def interleaved(cases: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per case; every round runs every case once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        for name, run in cases.items():
            elapsed = run()
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def fwd_bwd_flops(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        y = layer(x)
        (y * grad).sum().add(layer.aux_loss).backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return counter.get_total_flops()


def forward_flops(layer: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        layer(x.detach())
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- sections


def run_training(dim: int, hidden: int, tokens: int, batch: int, experts: list[int], peers: dict,
                 repeats: int, warmup: int, only: str | None = None) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    grad = torch.randn(batch, tokens, dim)
    specs = training_specs(experts, tokens, peers, batch)
    if only:
        specs = {name: spec for name, spec in specs.items() if name == "dense" or only in name}
    layers = {name: factory(dim, hidden).train() for name, (_, _, factory) in specs.items()}
    cases = {name: fwd_bwd_case(layer, x, grad) for name, layer in layers.items()}
    peak_shapes = {"mm 8192x192x768": (batch * tokens, dim, hidden), "mm 8192x768x192": (batch * tokens, hidden, dim),
                   "mm 1536^3": (1536, 1536, 1536)}
    peak_flops = {}
    for name, shape in peak_shapes.items():
        cases[f"matmul/{name}"], peak_flops[name] = matmul_case(*shape)
    medians = interleaved(cases, repeats, warmup)
    peak = {name: peak_flops[name] / medians[f"matmul/{name}"] for name in peak_shapes}
    peak_gflops = max(peak.values()) / 1e9

    dense_time = medians["dense"]
    dense_fwd = forward_flops(layers["dense"], x)
    rows = []
    for name, (sweep, e, _) in specs.items():
        flops = fwd_bwd_flops(layers[name], x, grad)
        gflops = flops / medians[name] / 1e9
        rows.append({
            "layer": name, "sweep": sweep, "experts": e, "median_ms": 1e3 * medians[name],
            "time_ratio_to_dense": medians[name] / dense_time,
            "flop_ratio_to_dense": forward_flops(layers[name], x) / dense_fwd,
            "fwd_bwd_gflop": flops / 1e9, "gflops_per_s": gflops, "fraction_of_peak": gflops / peak_gflops,
        })
    return {"rows": rows, "matmul_peak_gflops": peak_gflops,
            "matmul_gflops": {name: value / 1e9 for name, value in peak.items()}}


def vit_models(routers: list[str]) -> dict[str, nn.Module]:
    """The ViT of ``experiment=cifar10`` for each router, built as ``moebench train`` builds it."""
    from hydra import compose, initialize_config_dir

    from .build import build_model
    from .preflight import conf_dir

    models = {}
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        for router in routers:
            cfg = compose("train", overrides=["experiment=cifar10", f"router={router}"])
            torch.manual_seed(0)
            models[router] = build_model(cfg, 3, 10).eval()
            models[router].moebench_experts = None if router == "dense" else cfg.experts
    return models


def run_inference(dim: int, hidden: int, tokens: int, experts: int, repeats: int, warmup: int,
                  vit: bool = True) -> dict:
    torch.manual_seed(0)
    layers = {
        "dense": DenseMLP(dim, hidden),
        f"soft/E={experts}": SoftMoE(dim, hidden, experts, max(1, tokens // experts)),
        f"tokens_choice/E={experts}": TokensChoiceMoE(dim, hidden, experts, k=1, capacity_factor=1.0),
        f"experts_choice/E={experts}": ExpertsChoiceMoE(dim, hidden, experts, capacity_factor=1.0),
    }
    models = {f"layer {name}": layer.eval() for name, layer in layers.items()}
    inputs = {"layer": {b: torch.randn(b, tokens, dim) for b in (1, 64)}}
    notes = []
    if vit:
        try:
            for router, model in vit_models(["dense", "soft", "tokens_choice", "experts_choice"]).items():
                models[f"vit-cifar10 {router}"] = model
            inputs["vit-cifar10"] = {b: torch.randn(b, 3, 32, 32) for b in (1, 64)}
        except Exception as err:  # the layer figures stand on their own
            notes.append(f"ViT of experiment=cifar10 skipped: {type(err).__name__}: {err}")
    cases = {}
    for name, model in models.items():
        kind = name.split(" ")[0]
        for b in (1, 64):
            cases[f"{name}|{b}"] = inference_case(model, inputs[kind][b])
    medians = interleaved(cases, repeats, warmup)
    rows = []
    for name in models:
        kind = name.split(" ")[0]
        dense = f"{kind} dense"
        latency, batch_time = medians[f"{name}|1"], medians[f"{name}|64"]
        rows.append({
            "model": name, "batch1_latency_ms": 1e3 * latency, "batch64_images_per_s": 64 / batch_time,
            "latency_ratio_to_dense": latency / medians[f"{dense}|1"],
            "throughput_ratio_to_dense": medians[f"{dense}|64"] / batch_time,
        })
    return {"rows": rows, "notes": notes}


# ----------------------------------------------------------------------------- targets


def check_targets(rows: list[dict]) -> list[dict]:
    by_name = {row["layer"]: row for row in rows}
    by_sweep: dict[str, list[dict]] = {}
    for row in rows:
        by_sweep.setdefault(row["sweep"], []).append(row)
    targets = []

    def add(target: str, measured: float, met: bool):
        targets.append({"target": target, "measured": measured, "met": bool(met)})

    for e in PEER_EXPERTS:
        ours = by_name.get(f"soft64/E={e}") or by_name.get(f"soft256/E={e}")
        peer = by_name.get(f"peer_soft_moe_pytorch/E={e}")
        if ours and peer:
            speedup = peer["median_ms"] / ours["median_ms"]
            add(f"SoftMoE {ours['layer']} vs soft-moe-pytorch: speedup >= 1.2", speedup, speedup >= 1.2)
        ours, peer = by_name.get(f"tokens_choice_top2/E={e}"), by_name.get(f"peer_st_moe_pytorch/E={e}")
        if ours and peer:
            speedup = peer["median_ms"] / ours["median_ms"]
            add(f"TokensChoice top-2 E={e} vs st-moe-pytorch (equal buffers): speedup >= 1.2", speedup, speedup >= 1.2)
    for row in sorted(by_sweep.get("tokens_choice_top2", []), key=lambda r: r["experts"]):
        add(f"{row['layer']}: time / dense <= 2.0", row["time_ratio_to_dense"], row["time_ratio_to_dense"] <= 2.0)
    for sweep, limit in (("tokens_choice", 1.5), ("experts_choice", 1.5), ("soft_256_slots", 1.3)):
        sweep_rows = sorted(by_sweep.get(sweep, []), key=lambda r: r["experts"])
        if len(sweep_rows) >= 2:
            first, last = sweep_rows[0], sweep_rows[-1]
            growth = last["median_ms"] / first["median_ms"]
            add(f"{sweep}: time(E={last['experts']}) / time(E={first['experts']}) <= {limit}", growth, growth <= limit)
    for row in by_sweep.get("soft_64_slots", []):
        bound = 1.15 * row["flop_ratio_to_dense"]
        add(f"{row['layer']}: time / dense <= 1.15 x FLOP ratio ({bound:.3f})", row["time_ratio_to_dense"],
            row["time_ratio_to_dense"] <= bound)
    for row in rows:
        reference = row["sweep"].startswith("peer") or row["sweep"] == "experts_bmm" or row["sweep"].endswith("_tracked")
        if not reference:  # references, not the layers as imported
            add(f"{row['layer']}: fraction of fp32 matmul peak >= 0.70", row["fraction_of_peak"],
                row["fraction_of_peak"] >= 0.70)
    return targets


# ----------------------------------------------------------------------------- report


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "malloc_tuned": allocator_tuning_applied(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    training = result["training"]
    table = Table(title=f"fwd+bwd per layer (median of {result['setup']['repeats']} interleaved rounds; "
                        f"fp32 matmul peak {training['matmul_peak_gflops']:.0f} GFLOP/s)")
    for col in ("layer", "ms", "time/dense", "FLOPs/dense", "GFLOP/s", "of peak"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in training["rows"]:
        table.add_row(row["layer"], f"{row['median_ms']:.1f}", f"{row['time_ratio_to_dense']:.3f}",
                      f"{row['flop_ratio_to_dense']:.3f}", f"{row['gflops_per_s']:.0f}", f"{row['fraction_of_peak']:.0%}")
    console.print(table)
    if result.get("inference"):
        table = Table(title="inference (eval, no grad): batch-1 latency, batch-64 throughput")
        for col in ("model", "batch-1 ms", "latency/dense", "batch-64 img/s", "throughput/dense"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for row in result["inference"]["rows"]:
            table.add_row(row["model"], f"{row['batch1_latency_ms']:.2f}", f"{row['latency_ratio_to_dense']:.3f}",
                          f"{row['batch64_images_per_s']:.0f}", f"{row['throughput_ratio_to_dense']:.3f}")
        console.print(table)
    for note in result["notes"]:
        console.print(f"note: {note}")
    for t in result["targets"]:
        console.print(f"[{'green' if t['met'] else 'red'}]{'MET ' if t['met'] else 'MISS'}[/] {t['target']}: "
                      f"{t['measured']:.3f}")


def to_markdown(result: dict) -> str:
    """The tables and targets of one run, for experiments/results/bench_routers.md."""
    m, setup, training = result["machine"], result["setup"], result["training"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, glibc malloc tuning {'on' if m['malloc_tuned'] else 'off'}; "
        f"load average at start {', '.join(f'{v:.1f}' for v in m['load_average_at_start'] or [])}; {m['date']}.",
        f"Setup: dim {setup['dim']}, hidden {setup['hidden']}, {setup['tokens']} tokens per example, batch "
        f"{setup['batch']}; median of {setup['repeats']} interleaved rounds after {setup['warmup']} warm-up rounds.",
        "",
        f"fp32 matmul peak in the same rounds: {training['matmul_peak_gflops']:.1f} GFLOP/s "
        f"({', '.join(f'{k}: {v:.1f}' for k, v in training['matmul_gflops'].items())}).",
        "",
        "| layer | median ms | time / dense | FLOPs / dense | fwd+bwd GFLOP | GFLOP/s | of peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in training["rows"]:
        lines.append(f"| {row['layer']} | {row['median_ms']:.1f} | {row['time_ratio_to_dense']:.3f} | "
                     f"{row['flop_ratio_to_dense']:.3f} | {row['fwd_bwd_gflop']:.2f} | {row['gflops_per_s']:.1f} | "
                     f"{row['fraction_of_peak']:.0%} |")
    if result.get("inference"):
        lines += ["", "Inference (eval, no grad, same rounds scheme):", "",
                  "| model | batch-1 ms | latency / dense | batch-64 images/s | throughput / dense |",
                  "|---|---:|---:|---:|---:|"]
        for row in result["inference"]["rows"]:
            lines.append(f"| {row['model']} | {row['batch1_latency_ms']:.2f} | {row['latency_ratio_to_dense']:.3f} | "
                         f"{row['batch64_images_per_s']:.0f} | {row['throughput_ratio_to_dense']:.3f} |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else '**no**'} |")
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    return arguments.call("bench", run, argv)


def run(args) -> int:
    """``moebench bench`` on its checked arguments (arguments.bench_parser)."""
    peers, notes = import_peers(args.peers)
    result = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k not in ("out", "markdown")},
              "machine": machine(), "notes": notes}
    result["training"] = run_training(args.dim, args.hidden, args.tokens, args.batch, args.experts, peers,
                                      args.repeats, args.warmup, args.only)
    if not args.no_inference:
        inference_experts = 64 if 64 in args.experts else args.experts[-1]
        result["inference"] = run_inference(args.dim, args.hidden, args.tokens, inference_experts,
                                            max(args.repeats, 9), args.warmup)
        result["notes"] += result["inference"].pop("notes")
    result["targets"] = check_targets(result["training"]["rows"])
    print_report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(to_markdown(result))
    return 0


