"""`moebench probe RUN_DIR`: few-shot linear probes on frozen features, as the Soft MoE paper evaluates.

The model is frozen; its pre-logit features (after the final norm and the
pooling: the head's input) feed a closed-form ridge regression to +-1 one-hot
targets, the big_vision recipe:

1. k examples per class are drawn from the probed dataset's TRAINING split;
   their features are standardised with those k-shot examples' own mean and
   std (the only statistics the probe may use);
2. ridge regression (unregularised intercept) is solved for every L2 strength
   of a log grid at once, from one eigendecomposition;
3. the L2 strength is the one with the best accuracy on a fixed set of
   held-out TRAINING examples, disjoint from every k-shot draw (ties: the
   larger L2); the test split is never used to choose anything;
4. the chosen classifier is scored once on the test split.

Steps 1-4 are repeated over several random draws of the k-shot sets; the
mean, the spread and every draw go into ``result.json`` under
``probe.<dataset>.<k>shot`` (e.g. ``probe.cifar10.10shot.top1_mean``), written
atomically without touching the file's other keys.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from . import arguments
from .arguments import DEFAULT_DRAWS, DEFAULT_SHOTS, parse_shots, probe_data_kind
from .data import DataError, ImageData, Loader, load_data
from .errors import ProbeError, UserError
from .tracking import atomic_write_json

log = logging.getLogger("moebench")

L2_GRID = 2.0 ** np.arange(-10, 20)  # big_vision's grid
HELDOUT_TOTAL = 1000  # held-out training examples for the L2 choice (per class: 2..50 of them)
FEATURE_BATCH = 256  # images per forward when extracting features: bounded memory, modest CPU bursts


# ----------------------------------------------------------------------------- the linear probe

def ridge_predictions(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, others: list[np.ndarray],
                      l2_grid: np.ndarray = L2_GRID) -> list[np.ndarray]:
    """Scores (len(l2_grid), n_other, classes) of the ridge fit on (train_x, train_y) for each L2 in the grid.

    Features are standardised with the training set's statistics; targets are
    +-1 one-hot; the intercept is the (unregularised) target mean. One
    eigendecomposition of X^T X (or of X X^T when there are fewer examples
    than features) gives the solutions for every L2 at once.
    """
    x = train_x.astype(np.float64)
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    x = (x - mean) / std  # zero mean: the intercept decouples from the weights
    targets = 2.0 * np.eye(num_classes)[train_y] - 1.0
    bias = targets.mean(0)
    y = targets - bias
    n, d = x.shape
    if n >= d:
        eigs, q = np.linalg.eigh(x.T @ x)
        right = q.T @ (x.T @ y)  # (d, C)
        lefts = [((o - mean) / std) @ q for o in others]  # (n_o, d)
    else:
        eigs, u = np.linalg.eigh(x @ x.T)
        right = u.T @ y  # (n, C)
        lefts = [(((o - mean) / std) @ x.T) @ u for o in others]  # (n_o, n)
    eigs = np.clip(eigs, 0.0, None)
    inverse = 1.0 / (eigs[None, :] + l2_grid[:, None])  # (L, r)
    return [np.einsum("nr,lr,rc->lnc", left, inverse, right) + bias for left in lefts]


def fewshot_draw(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], shot_idx: np.ndarray,
                 heldout_idx: np.ndarray, num_classes: int, l2_grid: np.ndarray = L2_GRID) -> dict:
    """One draw: fit on ``shot_idx`` of the train features, choose L2 on ``heldout_idx``, score the test split."""
    train_x, train_y = features["train"][shot_idx], labels["train"][shot_idx]
    held_scores, test_scores = ridge_predictions(
        train_x, train_y, num_classes, [features["train"][heldout_idx], features["test"]], l2_grid)
    held_acc = (held_scores.argmax(-1) == labels["train"][heldout_idx][None]).mean(1)
    best = int(np.flatnonzero(held_acc == held_acc.max())[-1])  # ties: the larger L2
    test_acc = float((test_scores[best].argmax(-1) == labels["test"]).mean())
    return {"top1": test_acc, "l2": float(l2_grid[best]), "heldout_top1": float(held_acc[best])}


def heldout_split(labels: np.ndarray, num_classes: int, max_shots: int, seed: int) -> tuple[np.ndarray, list]:
    """A fixed held-out set (per class the same count) and, per class, the pool the k-shot sets come from."""
    rng = np.random.default_rng([seed, 7_919])
    per_class = max(2, min(50, HELDOUT_TOTAL // num_classes))
    heldout, pools = [], []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < max_shots + 1:
            raise ProbeError(f"class {c} has only {len(members)} training examples: {max_shots}-shot needs at least "
                             f"{max_shots + 1} (shots plus held-out ones for the L2 choice); use smaller --shots")
        take = min(per_class, len(members) - max_shots)
        heldout.append(members[:take])
        pools.append(members[take:])
    return np.concatenate(heldout), pools


def draw_shots(pools: list[np.ndarray], k: int, seed: int, draw: int) -> np.ndarray:
    rng = np.random.default_rng([seed, k, draw])
    return np.concatenate([rng.choice(pool, size=k, replace=False) for pool in pools])


def summarize(draws: list[dict], k: int, num_classes: int, test_examples: int, heldout_examples: int) -> dict:
    top1 = np.array([d["top1"] for d in draws])
    return {
        "top1_mean": float(top1.mean()),
        "top1_std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0,  # spread over the draws
        "top1_min": float(top1.min()),
        "top1_max": float(top1.max()),
        "top1_per_draw": top1.tolist(),
        "l2_per_draw": [d["l2"] for d in draws],
        "heldout_top1_per_draw": [d["heldout_top1"] for d in draws],
        "draws": len(draws), "shots": k, "classes": num_classes,
        "test_examples": test_examples, "heldout_examples": heldout_examples,
    }


# ----------------------------------------------------------------------------- features and data

@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor, mean, std, batch_size: int = FEATURE_BATCH
                     ) -> np.ndarray:
    """Pre-logit features (the classifier head's input) of uint8 ``images``, a batch at a time.

    The images go through in a fixed random order: Tokens Choice routes groups
    of consecutive images together, and a split stored class by class would
    otherwise fill every group with one class (as training never does, since
    it shuffles), which changes drops and features."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    captured: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().float().cpu()))
    try:
        loader = Loader(images[order], torch.zeros(len(images), dtype=torch.long), batch_size, shuffle=False,
                        drop_last=False, mean=mean, std=std)
        for batch, _ in loader:
            model(batch)
    finally:
        hook.remove()
    if not captured:
        return np.zeros((0, model.head.in_features), np.float32)
    features = torch.empty(len(images), captured[0].shape[1])
    features[order] = torch.cat(captured)
    return features.numpy()


def dataset_key(data_cfg: dict) -> str:
    """The name a probe dataset is filed under: the loader's name, or an ImageFolder root's directory name."""
    name = data_cfg.get("name")
    if name == "imagefolder" and data_cfg.get("root"):
        name = Path(str(data_cfg["root"])).expanduser().resolve().name
    return str(name).replace(".", "_")  # keys are dotted paths (pareto --quality probe.<key>.<k>shot)


def _match_channels(data: ImageData, channels: int) -> ImageData:
    """Grey images to RGB by repetition, RGB to grey by the channel mean, so any dataset fits the model."""
    if data.in_chans == channels:
        return data

    def convert(images: torch.Tensor) -> torch.Tensor:
        if channels == 3 and images.shape[1] == 1:
            return images.expand(-1, 3, -1, -1).contiguous()
        if channels == 1 and images.shape[1] == 3:
            return images.float().mean(1, keepdim=True).round().to(torch.uint8)
        raise ProbeError(f"cannot feed {images.shape[1]}-channel images to a {channels}-channel model")

    train, test = convert(data.train_images), convert(data.test_images)
    pixels = train.float().div(255)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    extra = {"val_images": convert(data.val_images)} if getattr(data, "val_images", None) is not None else {}
    return dataclasses.replace(data, train_images=train, test_images=test, mean=mean, std=std, **extra)


def probe_data(spec: str | None, config: dict, channels: int, data_root: str | None = None) -> tuple[str, ImageData]:
    """(key, data) of the dataset to probe: ``None``/"own" = the run's own, a loader name, or an ImageFolder root.

    Another dataset is resized to the run's image size and normalised with its
    own training-split statistics."""
    from .runs import load_run_data

    kind = probe_data_kind(spec)
    if kind == "own":
        return dataset_key(config["data"]), _match_channels(load_run_data(config, root=data_root), channels)
    size = config["data"]["image_size"]
    if kind == "name":
        data = load_data(spec, root=data_root, image_size=size, seed=config.get("seed", 0))
        return spec, _match_channels(data, channels)
    data = load_data("imagefolder", root=spec, image_size=size)
    return dataset_key({"name": "imagefolder", "root": spec}), _match_channels(data, channels)


# ----------------------------------------------------------------------------- a run

def probe_model(model: torch.nn.Module, data: ImageData, shots: list[int], draws: int, seed: int,
                max_test: int | None = None) -> dict[str, dict]:
    """``{"<k>shot": summary}`` for the frozen ``model`` on ``data``; features only of the images used."""
    train_labels = data.train_labels.numpy()
    heldout, pools = heldout_split(train_labels, data.num_classes, max(shots), seed)
    draws_idx = {(k, d): draw_shots(pools, k, seed, d) for k in shots for d in range(draws)}
    needed = np.unique(np.concatenate([heldout, *draws_idx.values()]))
    position = np.full(len(train_labels), -1)
    position[needed] = np.arange(len(needed))
    test_n = len(data.test_labels) if max_test is None else min(max_test, len(data.test_labels))
    was_training = model.training
    model.eval()
    try:
        features = {
            "train": extract_features(model, data.train_images[torch.from_numpy(needed)], data.mean, data.std),
            "test": extract_features(model, data.test_images[:test_n], data.mean, data.std),
        }
    finally:
        model.train(was_training)
    labels = {"train": train_labels[needed], "test": data.test_labels[:test_n].numpy()}
    out = {}
    for k in shots:
        runs = [fewshot_draw(features, labels, position[draws_idx[(k, d)]], position[heldout], data.num_classes)
                for d in range(draws)]
        out[f"{k}shot"] = summarize(runs, k, data.num_classes, test_n, len(heldout))
    return out


def write_probe(run_dir: Path, key: str, results: dict[str, dict]) -> dict:
    """Merge ``results`` into result.json under probe.<key> (read just before the atomic write)."""
    import json

    path = Path(run_dir) / "result.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        raise ProbeError(f"{path} is unreadable ({err}); not overwriting it") from None
    record.setdefault("probe", {}).setdefault(key, {}).update(results)
    atomic_write_json(path, record)
    return record


def probe_run(run_dir: Path, *, data: str | None = None, shots=DEFAULT_SHOTS, draws: int = DEFAULT_DRAWS,
              checkpoint: str = "last.pt", data_root: str | None = None, max_test: int | None = None,
              seed: int = 0) -> tuple[str, dict]:
    from .runs import load_run

    if draws < 1:
        raise ProbeError(f"draws must be >= 1, got {draws}")
    shots = parse_shots(shots)
    loaded = load_run(run_dir, checkpoint)
    key, dataset = probe_data(data, loaded.config, loaded.model.patch_embed.in_channels, data_root)
    results = probe_model(loaded.model, dataset, shots, draws, seed, max_test)
    for summary in results.values():
        summary["checkpoint"] = checkpoint
    write_probe(run_dir, key, results)
    return key, results


# ----------------------------------------------------------------------------- after training (eval.probe)

check_config = arguments.check_eval_probe  # (also run before torch is imported: preflight.check_config)


def after_training(cfg, result: dict, run_dir: Path) -> None:
    """``eval.probe``: probe the just-trained run (its last.pt) and put the numbers into ``result``.

    A probe that fails leaves the training result intact: the error goes to
    the log and to ``result["probe_errors"]``."""
    from omegaconf import OmegaConf

    probe = OmegaConf.to_container(cfg.eval.probe, resolve=True) if "eval" in cfg and "probe" in cfg.eval else {}
    if not probe or not probe.get("datasets") or result.get("status") != "completed":
        return
    from . import distributed
    from .runs import load_run

    if not distributed.current().is_main:
        return
    try:
        loaded = load_run(run_dir)
    except UserError as err:
        result["probe_errors"] = {"*": str(err)}
        log.error("eval.probe: %s", err)
        return
    channels = loaded.model.patch_embed.in_channels
    for spec in probe["datasets"]:
        try:
            key, dataset = probe_data(spec, loaded.config, channels, None)
            results = probe_model(loaded.model, dataset, parse_shots(probe["shots"]), probe["draws"], cfg.seed)
        except (UserError, DataError) as err:
            result.setdefault("probe_errors", {})[spec] = str(err)
            log.error("eval.probe %s: %s", spec, err)
            continue
        result.setdefault("probe", {})[key] = results
        log.info("eval.probe %s: %s", key, ", ".join(f"{k} {v['top1_mean']:.4f}" for k, v in results.items()))


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str]) -> int:
    return arguments.call("probe", run, argv)


def run(args) -> int:
    """``moebench probe`` on its checked arguments (arguments.probe_parser)."""
    try:
        key, results = probe_run(args.run_dir, data=args.data, shots=args.shots, draws=args.draws,
                                 checkpoint=args.checkpoint, data_root=args.data_root, max_test=args.max_test,
                                 seed=args.seed)
    except (UserError, DataError) as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2
    for name, s in results.items():
        print(f"{key} {name}: top-1 {s['top1_mean']:.4f} +- {s['top1_std']:.4f} over {s['draws']} draws "
              f"(min {s['top1_min']:.4f}, max {s['top1_max']:.4f}; L2 {', '.join(f'{v:g}' for v in s['l2_per_draw'])})")
    print(f"-> {args.run_dir / 'result.json'} probe.{key}")
    return 0
