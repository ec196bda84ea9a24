"""Datasets decoded once into memory as uint8 tensors, and a batch loader over them.

Small image datasets fit in memory, so an epoch is bound by the model, never by
JPEG decoding. ``load_data`` returns an ``ImageData``; ``Loader`` shuffles,
augments and normalises whole batches with a generator seeded by
(seed, epoch), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .datasource import IMAGEFOLDER_LAYOUT, NAMES, DataError, imagefolder_dirs, is_imagefolder

# Images that share one draw of RandAugment's ops: one call per image costs ~7 ms of torchvision
# overhead on a CPU (about 1 s per batch of 128), one call per 8 images ~1 ms per image.
RANDAUGMENT_GROUP = 8
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


log = logging.getLogger("moebench")


@dataclass
class ImageData:
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units, from the training split
    std: tuple[float, ...]
    name: str
    val_images: torch.Tensor | None = None  # held out from the training split (val_fraction)
    val_labels: torch.Tensor | None = None

    @property
    def in_chans(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


def load_data(
    name: str,
    *,
    root: str | None = None,
    image_size: int | None = None,
    download: bool = False,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    val_fraction: float = 0.0,
) -> ImageData:
    """Load dataset ``name`` (one of ``NAMES``) into memory; see docs/running.md, Data.

    ``val_fraction`` of the training split (after ``num_train``) is held out as a
    validation split, stratified by class and the same for every seed, so that
    all arms and seeds of a comparison train and select on the same images.
    """
    if name == "digits":
        splits, classes = _digits(seed)
    elif name in ("cifar10", "cifar100") and is_imagefolder(root):
        splits, classes = _imagefolder(root, image_size, cache_dir)  # e.g. a JPEG copy, read in place
    elif name in ("cifar10", "cifar100"):
        splits, classes = _cifar(name, root, download)
    elif name == "imagefolder":
        splits, classes = _imagefolder(root, image_size, cache_dir)
    elif name == "synthetic":
        splits, classes = _synthetic(num_train or 512, num_test or 128, image_size or 32, seed)
    else:
        raise DataError(f"data.name={name!r} is unknown; allowed: {', '.join(NAMES)}")
    (xtr, ytr), (xte, yte) = splits
    if image_size is not None and xtr.shape[-1] != image_size:
        xtr, xte = _resize(xtr, image_size), _resize(xte, image_size)
    xtr, ytr = _subset(xtr, ytr, num_train, seed)
    xte, yte = _subset(xte, yte, num_test, seed + 1)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    xva = yva = None
    if val_fraction > 0:
        train_idx, val_idx = _stratified_split(ytr, val_fraction)
        if len(train_idx) == 0 or len(val_idx) == 0:
            raise DataError(f"data.val_fraction={val_fraction} leaves an empty split of {len(ytr)} training images")
        xva, yva = xtr[val_idx], ytr[val_idx]
        xtr, ytr = xtr[train_idx], ytr[train_idx]
    # Evaluation batches must not be runs of one class (ImageFolder trees and sorted splits
    # list images class by class): Tokens Choice routes groups of consecutive images, and a
    # group of 8 look-alike images competes for the same experts (35% of choices dropped
    # instead of 23%, ~3 points of test top-1). One fixed, seed-independent order for all.
    xte, yte = _fixed_shuffle(xte, yte)
    if xva is not None:
        xva, yva = _fixed_shuffle(xva, yva)
    mean, std = channel_stats(xtr)
    return ImageData(xtr, ytr, xte, yte, len(classes), classes, mean, std, name, xva, yva)


def _fixed_shuffle(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(20231105))
    return images[order], labels[order]


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 images, a chunk at a time:
    a float copy of a whole split (100k 64x64 images: 4.9 GB) would dominate a run's memory."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = max(1, images.numel() // channels)
    mean = total / count
    var = (total_sq / count - mean.square()) * count / max(1, count - 1)  # unbiased, as Tensor.std
    std = var.clamp_min(0).sqrt().div(255).clamp_min(1e-3)
    return tuple((mean / 255).tolist()), tuple(std.tolist())


def _stratified_split(labels: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: ``round(fraction * n_c)`` images of every class c go to val,
    chosen by a fixed generator (seed-independent), each split in its original order."""
    generator = torch.Generator().manual_seed(20231105)
    val = []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        take = int(round(fraction * len(members)))
        val.append(members[torch.randperm(len(members), generator=generator)[:take]])
    val_idx = torch.cat(val).sort().values if val else torch.empty(0, dtype=torch.int64)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().flatten(), val_idx


def _digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return ((images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])), [str(i) for i in range(10)]


def _cifar(name: str, root: str | None, download: bool):
    from torchvision import datasets

    root = Path(root or "data").expanduser()
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train, test = (cls(str(root), train=split, download=download) for split in (True, False))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted..."
        raise DataError(
            f"{name} not found in {root.resolve()} ({err}); set data.download=true when online, "
            f"or point data.root at torchvision's files or at an ImageFolder tree (ROOT/train/<class>/, ROOT/test/<class>/)"
        ) from None

    def to_tensors(ds):
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.int64)

    return (to_tensors(train), to_tensors(test)), list(train.classes)


def _synthetic(num_train: int, num_test: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: (torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (n,), generator=g))
    return (make(num_train), make(num_test)), [f"class{i}" for i in range(10)]


# ----------------------------------------------------------------------------- ImageFolder


def _imagefolder(root: str | None, image_size: int | None, cache_dir: str | None):
    layout = IMAGEFOLDER_LAYOUT
    root_path, train_dir, test_dir = imagefolder_dirs(root)
    train_files, classes = _scan(train_dir, layout)
    test_files, test_classes = _scan(test_dir, layout)
    if test_classes != classes:
        raise DataError(f"class dirs differ between {train_dir} ({len(classes)}) and {test_dir} ({len(test_classes)})")

    stat = hashlib.sha1(f"{root_path}|{image_size}".encode())
    for path, _ in train_files + test_files:
        info = path.stat()
        stat.update(f"{path}|{info.st_size}|{info.st_mtime_ns}".encode())
    cache = Path(cache_dir or os.environ.get("MOEBENCH_CACHE", "~/.cache/moebench")).expanduser()
    cache_file = cache / f"imagefolder-{stat.hexdigest()[:16]}.pt"
    if cache_file.is_file():
        try:
            saved = torch.load(cache_file, weights_only=True)
            log.info("data: %d images of %s from the cache %s", len(train_files) + len(test_files), root_path,
                     cache_file)
            return ((saved["xtr"], saved["ytr"]), (saved["xte"], saved["yte"])), list(saved["classes"])
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    # Decoding 60k-100k JPEGs takes minutes on a loaded CPU: say so, or the run looks hung.
    log.info("data: decoding %d images of %s once (minutes for 100k images); later runs read the cache %s",
             len(train_files) + len(test_files), root_path, cache_file)
    xtr, ytr = _decode(train_files, image_size)
    xte, yte = _decode(test_files, image_size)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    torch.save({"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "classes": classes}, tmp)
    os.replace(tmp, cache_file)
    return ((xtr, ytr), (xte, yte)), classes


def _scan(split_dir: Path, layout: str) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{split_dir} has no class directories; {layout}")
    files = []
    for label, cls in enumerate(classes):
        images = sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{split_dir / cls} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); {layout}")
        files += [(p, label) for p in images]
    return files, classes


def _decode(files: list[tuple[Path, int]], image_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(img)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        arrays = list(pool.map(read, [p for p, _ in files], chunksize=256))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise DataError(f"images differ in size ({sorted(sizes)[:3]}...); set data.image_size to resize them")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([label for _, label in files], dtype=torch.int64)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _subset(images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int):
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


# ----------------------------------------------------------------------------- batches

class Loader:
    """Batches of an in-memory split: ``(float32 normalised images, int64 labels)`` on ``device``.

    The shuffle order and augmentation draws of an epoch depend only on
    (seed, epoch) (call ``set_epoch``). ``batch_size`` is the global batch: with
    ``world_size > 1`` every rank draws the same global batch and keeps its
    equal part of it, so that N ranks see exactly the batches of one process.
    A last batch that does not split evenly is padded with label -1 (to be
    ignored) so that every rank runs the same number of equal batches.
    ``augment``: ``{"crop_padding": P, "hflip": bool}``; the crop pads with the
    zero pixel (black) before normalisation and shifts each image independently.
    Stronger, optional keys (``None`` = off): ``randaugment`` (torchvision
    RandAugment's magnitude, ``randaugment_ops`` ops each, default 2, drawn per
    group of ``RANDAUGMENT_GROUP`` images), ``mixup`` and ``cutmix`` (Beta alphas; with both, each batch
    draws one of the two). MixUp/CutMix mix the global batch and turn the labels
    into class probabilities ``(batch, num_classes)``, so they need
    ``num_classes``. Their draws come from the epoch's generator too.
    """

    def __init__(self, images, labels, batch_size, *, shuffle, drop_last, mean, std, augment=None,
                 seed=0, device="cpu", rank=0, world_size=1, num_classes=None):
        if batch_size % world_size and drop_last:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} ranks")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.augment = augment or {}
        self.randaugment = _randaugment(self.augment)
        self.mixer = _mixer(self.augment, num_classes)
        self.seed, self.device, self.rank, self.world_size = seed, device, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            images, labels = self.images[idx], self.labels[idx]
            if self.augment:  # drawn for the global batch: the same draws on every rank
                images = self._augment(images, generator)
            if self.mixer is not None:  # mixes the global batch, before it is split over ranks
                images, labels = _seeded(generator, self.mixer, self._normalise(images), labels)
            if self.world_size > 1:
                images, labels = self._own_part(images, labels)
            images = images.to(self.device, non_blocking=True)
            if self.mixer is None:  # mixed batches were normalised before mixing
                images = self._normalise(images)
            yield images, labels.to(self.device, non_blocking=True)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255) - self.mean.to(images.device)) / self.std.to(images.device)

    def _own_part(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = -len(labels) % self.world_size
        if pad:
            images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])])
            # padding is ignored: label -1, or all-zero class probabilities (mixed batches)
            labels = torch.cat([labels, labels.new_full((pad, *labels.shape[1:]), -1 if labels.ndim == 1 else 0)])
        per_rank = len(labels) // self.world_size
        part = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return images[part], labels[part]

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        pad = int(self.augment.get("crop_padding") or 0)
        if pad:
            padded = F.pad(images, (pad, pad, pad, pad))
            dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
            rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, images.shape[1], h, w + 2 * pad)
            images = padded.gather(2, rows)
            cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, images.shape[1], h, w)
            images = images.gather(3, cols)
        if self.augment.get("hflip"):
            flip = torch.rand(n, generator=generator) < 0.5
            images = torch.where(flip.view(n, 1, 1, 1), images.flip(-1), images)
        if self.randaugment is not None:  # torchvision draws one set of ops per call: per group, not per batch
            groups = lambda batch: torch.cat([self.randaugment(group) for group in batch.split(RANDAUGMENT_GROUP)])
            images = _seeded(generator, groups, images)
        return images


def _randaugment(augment: dict):
    if augment.get("randaugment") is None:
        return None
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=int(augment.get("randaugment_ops") or 2), magnitude=int(augment["randaugment"]))


def _mixer(augment: dict, num_classes: int | None):
    from_alpha = {"mixup": "MixUp", "cutmix": "CutMix"}
    chosen = {name: float(augment[name]) for name in from_alpha if augment.get(name) is not None}
    if not chosen:
        return None
    if num_classes is None:
        raise ValueError("MixUp/CutMix need the number of classes")
    from torchvision.transforms import v2

    mixers = [getattr(v2, from_alpha[name])(alpha=alpha, num_classes=num_classes) for name, alpha in chosen.items()]
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def _seeded(generator: torch.Generator, transform, *inputs):
    """``transform(*inputs)`` with torch's global RNG seeded from ``generator`` (torchvision's
    transforms draw from the global RNG): the draws follow (seed, epoch) and the global
    stream, which the model's own randomness uses, is left as it was."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(*inputs)
