"""`moebench inspect RUN_DIR`: pictures of what a trained run's routers do, with an index page.

Everything lands in ``RUN_DIR/inspect/`` at once (built in a temporary dir, then
swapped in), so a failure leaves the previous pictures, never half of new ones:

- ``index.md``: every picture with one line saying what it shows;
- ``inspect.json``: the numbers the pictures are drawn from, per layer (load
  shares, position rates, similarity summaries), the test images shown, and
  how closely the recomputed routing reproduces each layer's output;
- ``routing.npz``: the per-image routing arrays drawn (e.g. ``<layer>/dispatch``
  of shape (images, tokens, slots));
- the PNGs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..data import Loader
from ..tracking import atomic_write_json, current_umask, read_metrics
from . import figures
from .routing import SoftRouting, SparseRouting, capture, moe_layers, rebuild_output, route
from .summary import LayerSummary, expert_similarity

SLOTS_SHOWN = 4  # Soft MoE dispatch: the most selective slots of each layer


class InspectError(Exception):
    """A run that cannot be inspected; the message says why."""


def short(layer_name: str) -> str:
    """blocks.2.mlp -> block2 (file names and panel titles)."""
    parts = layer_name.split(".")
    return f"block{parts[1]}" if len(parts) == 3 and parts[0] == "blocks" else layer_name.replace(".", "_")


def inspect_run(run_dir: Path, *, images: int = 4, checkpoint: str = "last.pt", data_root: str | None = None,
                max_images: int | None = None, log_wandb: bool = True) -> dict:
    """Write ``run_dir/inspect/``; returns the inspect.json record."""
    from ..runs import load_run, load_run_data

    run_dir = Path(run_dir)
    loaded = load_run(run_dir, checkpoint)
    cfg = loaded.config
    data = load_run_data(cfg, root=data_root)
    model, router = loaded.model, cfg["router"]["name"]
    layers = moe_layers(model)
    patch = cfg["model"]["patch_size"] or model.patch_embed.patch_size[0]  # null: a timm model's own
    grid = data.test_images.shape[-1] // patch
    offset = 1 if cfg["model"].get("pool") == "cls" else 0  # the cls token has no place on the grid
    offset = getattr(model, "num_prefix_tokens", offset)  # a timm model: its class and register tokens
    shown = min(images, len(data.test_labels))
    limit = len(data.test_labels) if max_images is None else max(shown, min(max_images, len(data.test_labels)))

    summaries = {name: LayerSummary(router, layer.num_experts, grid * grid + offset) for name, layer in layers}
    kept: dict[str, list] = defaultdict(list)  # routing of the shown images, per layer
    agreement: dict[str, float] = {}
    predictions: list[int] = []
    # Batches as the run's evaluation cut them: sparse routers route groups of consecutive images.
    loader = Loader(data.test_images[:limit], data.test_labels[:limit], cfg["data"]["eval_batch_size"],
                    shuffle=False, drop_last=False, mean=data.mean, std=data.std)
    done = 0
    for batch, _ in loader:
        logits, seen = capture(model, batch)
        take = max(0, min(shown - done, len(batch)))
        predictions += logits[:take].argmax(1).tolist()
        for name, layer in layers:
            x, y = seen[name]
            routing = route(layer, x)
            summaries[name].add(routing)
            if take:
                part = _slice(routing, take)
                kept[name].append(part)
                diff = (rebuild_output(layer, x[:take], part) - y[:take].float()).abs().max().item()
                agreement[name] = max(agreement.get(name, 0.0), diff)
        done += len(batch)

    record = {
        "run_dir": str(run_dir), "checkpoint": checkpoint, "router": router,
        "test_top1": (loaded.result or {}).get("quality", {}).get("top1"),
        "shown_test_images": list(range(shown)), "stats_test_images": limit,
        "patch_grid": [grid, grid], "layers": {}, "figures": [],
        "agreement_max_abs_diff": agreement,
    }
    out = run_dir / "inspect"
    tmp = Path(tempfile.mkdtemp(prefix=".inspect.", dir=run_dir))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; inspect/ is shared like the files in it
    try:
        pictures = [test_image(data, i) for i in range(shown)]
        names = data.class_names
        # "#0 5 -> 4" read as a routing; say which is the label and which the model's answer
        captions = [f"test image {i}: {names[data.test_labels[i]]}\npredicted: {names[predictions[i]]}"
                    for i in range(shown)]
        arrays: dict[str, np.ndarray] = {"shown_test_images": np.arange(shown)}
        routings = {name: _concat(parts) for name, parts in kept.items()}
        soft = bool(routings) and isinstance(next(iter(routings.values())), SoftRouting)  # its kind, not its name
        if soft:
            _soft_pictures(tmp, record, arrays, routings, pictures, captions, grid, offset)
        elif layers:
            _sparse_pictures(tmp, record, arrays, routings, pictures, captions, grid, offset, router)
        if layers:
            _common_pictures(tmp, record, summaries, layers, grid, offset, soft)
        _training_pictures(tmp, record, run_dir / "metrics.jsonl")
        np.savez_compressed(tmp / "routing.npz", **arrays)
        atomic_write_json(tmp / "inspect.json", record)
        (tmp / "index.md").write_text(index_page(record, cfg))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log_wandb:
        record["wandb_run_id"] = log_to_wandb(run_dir, cfg, out, record)
    return record


def test_image(data, index: int) -> np.ndarray:
    return data.test_images[index].numpy()


def _slice(routing, n: int):
    return routing.take(n)


def _concat(parts: list):
    return type(parts[0]).concat(parts)


def _on_grid(values: torch.Tensor, grid: int, offset: int) -> np.ndarray:
    """(..., tokens) -> (..., grid, grid): the patch tokens in raster order."""
    return values[..., offset:].reshape(*values.shape[:-1], grid, grid).cpu().numpy()


def _add_figure(record: dict, file: str, kind: str, caption: str, layer: str | None = None) -> None:
    record["figures"].append({"file": file, "kind": kind, "layer": layer, "caption": caption})


def _soft_pictures(tmp, record, arrays, routings, pictures, captions, grid, offset) -> None:
    combine_rows = []
    for name, r in routings.items():
        arrays[f"{name}/dispatch"] = r.dispatch.numpy()
        arrays[f"{name}/combine"] = r.combine.numpy()
        # The slots whose dispatch is most concentrated on the shown images (a flat one shows nothing).
        slots = r.dispatch.amax(1).mean(0).argsort(descending=True)[:SLOTS_SHOWN].sort().values
        arrays[f"{name}/dispatch_slots_shown"] = slots.numpy()
        maps = _on_grid(r.dispatch[:, :, slots].transpose(1, 2), grid, offset)  # (N, K, g, g)
        m = r.dispatch.shape[1]
        file = f"soft_dispatch_{short(name)}.png"
        figures.draw_heatmaps(
            tmp / file, pictures, captions, maps,
            [f"slot {int(s)} (expert {int(s) // r.slots_per_expert})" for s in slots],
            f"{name}: dispatch weights of {len(slots)} slots over the patches (each sums to 1 over the "
            f"{m} tokens; uniform = {1 / m:.4f})",
        )
        _add_figure(record, file, "soft_dispatch",
                    f"{name}: dispatch weights of the {len(slots)} most selective slots over each image's patches "
                    f"(a slot's input is this weighted mix of the patches; uniform = 1/{m}).", name)
        top = r.combine.argmax(-1)  # (N, m): the slot each token mixes in most
        weight = r.combine.amax(-1)
        labels = _on_grid(top, grid, offset)
        texts = [[[f"{int(v)}" for v in row] for row in image] for image in labels]
        arrays[f"{name}/combine_top_slot"] = labels
        arrays[f"{name}/combine_top_weight"] = _on_grid(weight, grid, offset)
        combine_rows.append((f"{short(name)}: top slot", labels, texts))
    file = "soft_combine.png"
    num_slots = next(iter(routings.values())).combine.shape[-1]
    figures.draw_categories(tmp / file, pictures, captions, combine_rows, num_slots,
                            "Soft MoE combine: for each patch, the slot whose output it mixes in most (slot id printed)")
    _add_figure(record, file, "soft_combine",
                "For each patch and MoE layer, the slot with the largest combine weight (the slot output it mixes in "
                "most); colour and number = slot id.")


def _sparse_pictures(tmp, record, arrays, routings, pictures, captions, grid, offset, router) -> None:
    rows = []
    num_experts = 1
    for name, r in routings.items():
        for field in ("gates", "requested", "processed", "weights"):
            arrays[f"{name}/{field}"] = getattr(r, field).numpy()
        num_experts = r.gates.shape[-1]
        # Colour: the processing expert with the largest gate; none -> -1 (crossed out).
        best = torch.where(r.processed, r.gates, torch.full_like(r.gates, -1.0)).argmax(-1)
        best = torch.where(r.processed.any(-1), best, torch.full_like(best, -1))
        labels = _on_grid(best, grid, offset)
        texts = []
        for b in range(len(r.gates)):
            cells = [_cell_label(r, b, t) for t in range(offset, r.gates.shape[1])]
            texts.append([cells[i * grid:(i + 1) * grid] for i in range(grid)])
        arrays[f"{name}/top_processing_expert"] = labels
        rows.append((short(name), labels, texts))
    chooser = next(iter(routings.values())).chooser
    if chooser == "tokens":
        title = (f"{router}: each patch coloured by the expert that processed it (ids printed, in choice order); "
                 "grey X = every choice dropped, trailing x = some choice dropped")
        caption = ("Each patch coloured by the expert(s) that processed it, per MoE layer; grey with a cross: the "
                   "token was dropped by every expert it chose (only the residual carries it).")
    else:
        title = (f"{router}: each patch coloured by the highest-gate expert that picked it (ids printed, "
                 "+n = more); grey X = picked by no expert")
        caption = ("Each patch coloured by the expert(s) that picked it, per MoE layer; grey with a cross: no expert "
                   "picked the token (the layer outputs 0 for it).")
    file = f"{router}_assignment.png"
    figures.draw_categories(tmp / file, pictures, captions, rows, num_experts, title)
    _add_figure(record, file, f"{router}_assignment", caption)


def _cell_label(r: SparseRouting, b: int, t: int) -> str:
    gates = r.gates[b, t]
    order = [int(e) for e in gates.argsort(descending=True) if r.requested[b, t, e]]
    kept = [e for e in order if r.processed[b, t, e]]
    if not kept:
        return ""
    if r.chooser == "tokens":
        return "/".join(map(str, kept)) + ("x" if len(kept) < len(order) else "")
    return str(kept[0]) + (f"+{len(kept) - 1}" if len(kept) > 1 else "")


def _common_pictures(tmp, record, summaries, layers, grid, offset, soft: bool) -> None:
    stats = {name: s.result() for name, s in summaries.items()}
    for name, s in stats.items():
        s["position_rate"] = _on_grid(torch.tensor(s["position_rate"]), grid, offset).tolist()
    similarity = {name: expert_similarity(layer).numpy() for name, layer in layers}
    for name, sim in similarity.items():
        off = sim[~np.eye(len(sim), dtype=bool)]
        stats[name]["expert_similarity_offdiag_mean"] = float(off.mean()) if off.size else None
        stats[name]["expert_similarity_offdiag_min"] = float(off.min()) if off.size else None
    record["layers"] = stats
    images = next(iter(stats.values()))["images"]

    file = "expert_load.png"
    load_word = "combine weight" if soft else "tokens processed"
    largest = "combine weight" if soft else "gate"
    figures.draw_load(tmp / file, {short(n): s for n, s in stats.items()},
                      f"Per-expert load over {images} test images (load = {load_word}; first choice = largest {largest})")
    _add_figure(record, file, "expert_load",
                f"Per-expert load histogram per MoE layer over {images} test images: bars = share of "
                f"{load_word}, dots = share of tokens whose largest {largest} is that expert, dashed = uniform.")

    meaning = next(iter(stats.values()))["position_meaning"]
    file = "position_rate.png"
    maps = {short(n): np.asarray(s["position_rate"]) for n, s in stats.items()}
    figures.draw_position_maps(tmp / file, maps, f"By patch position, {images} test images: {meaning}",
                               fixed_range=not soft)
    _add_figure(record, file, "position_rate", f"By patch position, per MoE layer: {meaning}.")

    file = "expert_similarity.png"
    figures.draw_similarity(tmp / file, {short(n): m for n, m in similarity.items()},
                            "Cosine similarity of the experts' flattened weights (1 = identical experts)")
    _add_figure(record, file, "expert_similarity",
                "Expert-weight similarity matrix per MoE layer: cosine similarity of the experts' flattened "
                "weights (w1, b1, w2, b2).")


def epoch_curves(lines: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """``{metric key: {layer: (epochs, per-epoch mean)}}`` from the ``routing/<layer>/<key>`` lines."""
    sums: dict[tuple[str, str], dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for line in lines:
        epoch = line.get("epoch")
        for key, value in line.items():
            if key.startswith("routing/") and epoch is not None and isinstance(value, (int, float)):
                layer, _, metric = key[len("routing/"):].rpartition("/")
                sums[(metric, layer)][int(epoch)].append(float(value))
    curves: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for (metric, layer), by_epoch in sums.items():
        epochs = sorted(by_epoch)
        curves[metric][short(layer)] = (epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs])
    return dict(curves)


def _training_pictures(tmp, record, metrics_path: Path) -> None:
    if not metrics_path.is_file():
        return
    curves = epoch_curves(read_metrics(metrics_path))
    if not curves:
        return
    record["training_curves"] = {k: {layer: list(map(list, v)) for layer, v in c.items()} for k, c in curves.items()}
    file = "training_routing.png"
    figures.draw_curves(tmp / file, curves, "Routing statistics over training (metrics.jsonl, mean per epoch)")
    _add_figure(record, file, "training_routing",
                "Over training, from metrics.jsonl (mean of the logged steps of each epoch): per-expert load "
                "statistics (load_cv, load_max_over_mean; drops / coverage), routing entropies "
                "(gate_entropy; Soft MoE dispatch_entropy, combine_entropy) and, for Tokens Choice with "
                "router.bias_rate, the balancing bias's trajectory (bias_min, bias_max, bias_spread); for ReMoE the "
                "realised sparsity, experts per token and the L1 coefficient (sparsity, experts_per_token, "
                "l1_coeff); one line per MoE layer.")


def index_page(record: dict, cfg: dict) -> str:
    r = cfg["router"]
    details = ", ".join(f"{k}={v}" for k, v in r.items() if k in ("num_experts", "slots_per_expert", "k",
                                                                   "capacity_factor", "group_size", "bpr"))
    top1 = record["test_top1"]
    lines = [
        f"# Inspect: {Path(record['run_dir']).name}",
        "",
        f"Router **{r['name']}** ({details}), checkpoint `{record['checkpoint']}`, "
        f"test top-1 {top1:.4f}." if isinstance(top1, (int, float)) else f"Router **{r['name']}** ({details}).",
        f"Pictures of test images #0-#{len(record['shown_test_images']) - 1}; statistics over the first "
        f"{record['stats_test_images']} test images, batched as the run's evaluation batches them.",
        "",
    ]
    if record["agreement_max_abs_diff"]:
        worst = max(record["agreement_max_abs_diff"].values())
        lines += [f"Recomputed routing reproduces each MoE layer's output on the shown images to within "
                  f"{worst:.2g} (max abs difference; `inspect.json`).", ""]
    if not record["figures"]:
        lines += ["No MoE layer in this model (dense): there is no routing to draw.", ""]
    for fig in record["figures"]:
        lines += [f"## {fig['file']}", "", fig["caption"], "", f"![{fig['kind']}]({fig['file']})", ""]
    lines += ["Numbers behind the pictures: `inspect.json`; per-image routing arrays: `routing.npz`.", ""]
    return "\n".join(lines)


def log_to_wandb(run_dir: Path, cfg: dict, out: Path, record: dict) -> str | None:
    """Add the pictures to the run's own W&B run (resumed by id) when the run used W&B."""
    wb = cfg.get("wandb") or {}
    mode = wb.get("mode", "disabled")
    if mode == "disabled" or not record["figures"]:
        return None
    run_id, step = _wandb_id_and_step(run_dir / record["checkpoint"])
    import os

    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(
        project=wb.get("project"), entity=wb.get("entity"), group=wb.get("group"), dir=str(run_dir), mode=mode,
        id=run_id, resume="allow" if run_id else None, job_type="train" if run_id else "inspect",
        name=None if run_id else f"inspect-{run_dir.name}", reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True),
    )
    images = {f"inspect/{Path(f['file']).stem}": wandb.Image(str(out / f["file"]), caption=f["caption"])
              for f in record["figures"]}
    # After the run's last training step: W&B drops history rows whose step goes backwards.
    run.log(images, step=(step or 0) + 1)
    run_id = run.id
    run.finish()
    return run_id


def _wandb_id_and_step(checkpoint: Path) -> tuple[str | None, int | None]:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return ckpt.get("wandb_id"), ckpt.get("step")


def main(argv: list[str]) -> int:
    from .. import arguments

    return arguments.call("inspect", run, argv)


def run(args) -> int:
    """``moebench inspect`` on its checked arguments (arguments.inspect_parser)."""
    import sys

    from ..data import DataError
    from ..errors import UserError

    try:
        record = inspect_run(args.run_dir, images=args.images, checkpoint=args.checkpoint, data_root=args.data_root,
                             max_images=args.max_images, log_wandb=not args.no_wandb)
    except (UserError, DataError, InspectError) as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2
    out = args.run_dir / "inspect"
    print(f"{len(record['figures'])} pictures -> {out}/index.md")
    return 0


__all__ = ["InspectError", "epoch_curves", "inspect_run", "main", "run"]
