"""Datasets in memory and the batch loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moebench import data as data_mod
from moebench.data import DataError, Loader, load_data


def test_digits_is_real_bundled_data_with_a_fixed_split():
    d = load_data("digits")
    assert d.train_images.shape == (1437, 1, 8, 8) and d.test_images.shape == (360, 1, 8, 8)
    assert d.train_images.dtype == torch.uint8 and d.train_images.max() == 255
    assert d.num_classes == 10 and torch.bincount(d.test_labels).min() >= 35  # stratified
    again = load_data("digits")
    assert torch.equal(d.test_images, again.test_images) and torch.equal(d.train_labels, again.train_labels)
    assert load_data("digits", image_size=16).train_images.shape[-1] == 16


def make_tree(root, splits=("train", "test"), classes=("cat", "dog"), per_class=3, size=8):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("test_split", ["test", "val"])
def test_imagefolder_loads_and_caches(tmp_path, test_split, monkeypatch, caplog):
    root = make_tree(tmp_path / "tree", splits=("train", test_split))
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="moebench"):
        d = load_data("imagefolder", root=str(root), cache_dir=str(cache))
    assert any(m.startswith("data: decoding 12 images of ") for m in caplog.messages)  # not minutes of silence
    assert d.train_images.shape == (6, 3, 8, 8) and d.class_names == ["cat", "dog"]
    assert torch.equal(d.train_labels, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert len(list(cache.glob("*.pt"))) == 1
    monkeypatch.setattr(data_mod, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    again = load_data("imagefolder", root=str(root), cache_dir=str(cache))
    assert torch.equal(again.train_images, d.train_images)


@pytest.mark.parametrize("breakage,needle", [
    (lambda r: None, "no such directory"),
    (lambda r: make_tree(r, splits=("train",)), "lacks train/ and test/"),
    (lambda r: (make_tree(r), (r / "test" / "dog" / "0.png").unlink(), (r / "test" / "dog" / "1.png").unlink(),
                (r / "test" / "dog" / "2.png").unlink()), "holds no images"),
    (lambda r: (make_tree(r), make_tree(r, splits=("test",), classes=("bird",))), "class dirs differ"),
])
def test_imagefolder_bad_layouts_name_the_path(tmp_path, breakage, needle):
    root = tmp_path / "tree"
    breakage(root)
    with pytest.raises(DataError, match=needle) as err:
        load_data("imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    assert str(root) in str(err.value)


def test_missing_cifar_and_unknown_names_explain_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data.download=true") as err:
        load_data("cifar10", root=str(tmp_path))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="allowed: digits, cifar10, cifar100, imagefolder, synthetic"):
        load_data("mnist")


def loader(n=10, batch=4, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return Loader(images, torch.arange(n), batch, mean=(0.0,), std=(1.0 / 255,), **{"shuffle": True,
                  "drop_last": False, **kw})


def labels_of(ld):
    return [y.tolist() for _, y in ld]


def test_loader_covers_each_epoch_reproducibly():
    ld = loader()
    ld.set_epoch(0)
    first = labels_of(ld)
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]
    assert labels_of(ld) == first  # same (seed, epoch): same order
    ld.set_epoch(1)
    assert labels_of(ld) != first
    assert len(loader(drop_last=True)) == 2 and [len(b) for b in labels_of(loader(drop_last=True))] == [4, 4]


def test_loader_normalises_and_splits_each_global_batch_over_ranks():
    x, y = next(iter(loader(shuffle=False)))
    torch.testing.assert_close(x[:, 0, 0, 0], y.float())  # mean 0, std 1/255: back to the raw value
    one = labels_of(loader(n=11))  # batches of 4, 4, 3
    parts = [labels_of(loader(n=11, rank=r, world_size=2)) for r in range(2)]
    # Rank r's part of batch b is its share of the single-process batch b...
    assert [a + b for a, b in zip(*parts)] == [batch + [-1] * (len(batch) % 2) for batch in one]
    # ...equal on every rank, the odd last batch padded with the label to ignore.
    assert [len(b) for b in parts[0]] == [len(b) for b in parts[1]] == [2, 2, 2]
    with pytest.raises(ValueError, match="does not split"):
        loader(batch=3, drop_last=True, world_size=2)


def test_ranks_get_the_augmentation_of_the_single_process_batch():
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    make = lambda rank, world: Loader(images, torch.arange(8), 8, shuffle=True, drop_last=True, mean=(0, 0, 0),
                                      std=(1, 1, 1), augment={"crop_padding": 2, "hflip": True}, seed=3,
                                      rank=rank, world_size=world)
    whole = next(iter(make(0, 1)))[0]
    torch.testing.assert_close(torch.cat([next(iter(make(r, 2)))[0] for r in range(2)]), whole)


def test_augmentation_is_deterministic_and_changes_images():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    make = lambda: Loader(images, torch.zeros(16, dtype=torch.long), 16, shuffle=False, drop_last=False,
                          mean=(0, 0, 0), std=(1, 1, 1), augment={"crop_padding": 2, "hflip": True}, seed=3)
    a, b = next(iter(make()))[0], next(iter(make()))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, images.float() / 255)


STRONG = {"crop_padding": 2, "hflip": True, "randaugment": 9, "mixup": 0.8, "cutmix": 1.0}


def test_strong_augmentation_mixes_labels_and_follows_seed_and_epoch():
    """RandAugment per image, then MixUp or CutMix per batch: class probabilities that sum to 1 and
    put weight on at most two classes; the draws depend on (seed, epoch) only and leave torch's
    global RNG (the model's noise stream) untouched; ranks get the parts of the single-process batch."""
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(16) % 4
    make = lambda seed=3, rank=0, world=1: Loader(images, labels, 8, shuffle=True, drop_last=True, mean=(0, 0, 0),
                                                  std=(1, 1, 1), augment=STRONG, seed=seed, num_classes=4,
                                                  rank=rank, world_size=world)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    (x, y), (x2, y2) = list(make())
    assert torch.equal(torch.rand(1), before)  # the global stream was not consumed
    assert y.shape == (8, 4) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    assert ((y > 0).sum(1) <= 2).all()  # each image mixes at most two
    mixup_only = Loader(images, labels, 8, shuffle=True, drop_last=True, mean=(0, 0, 0), std=(1, 1, 1),
                        augment={"mixup": 0.8}, seed=3, num_classes=4)
    y_mix = next(iter(mixup_only))[1]
    assert (y_mix.max(1).values < 1).any()  # a mixing weight strictly between 0 and 1
    again = list(make())
    assert torch.equal(again[0][0], x) and torch.equal(again[1][1], y2)
    assert not torch.equal(list(make(seed=4))[0][0], x)
    split = [next(iter(make(rank=r, world=2))) for r in range(2)]
    torch.testing.assert_close(torch.cat([part[0] for part in split]), x)
    torch.testing.assert_close(torch.cat([part[1] for part in split]), y)


def test_randaugment_alone_keeps_hard_labels_and_changes_images():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    plain = Loader(images, torch.arange(8), 8, shuffle=False, drop_last=False, mean=(0, 0, 0), std=(1, 1, 1))
    strong = Loader(images, torch.arange(8), 8, shuffle=False, drop_last=False, mean=(0, 0, 0), std=(1, 1, 1),
                    augment={"randaugment": 15, "randaugment_ops": 3})
    (x, y), (xa, ya) = next(iter(plain)), next(iter(strong))
    assert torch.equal(y, ya) and xa.shape == x.shape
    changed = [not torch.equal(a, b) for a, b in zip(x, xa)]
    assert sum(changed) >= 6  # 3 ops at magnitude 15 leave few images as they were (identity is one op of 14)


def test_mixup_needs_the_number_of_classes():
    with pytest.raises(ValueError, match="number of classes"):
        Loader(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 2, shuffle=True,
               drop_last=True, mean=(0,), std=(1,), augment={"mixup": 0.2})


def test_cifar10_reads_an_imagefolder_tree_in_place(tmp_path):
    """data=cifar10 takes torchvision's files or, when data.root holds train/<class>/ dirs, that tree."""
    root = make_tree(tmp_path / "cifar", classes=("airplane", "cat"), size=32)
    d = load_data("cifar10", root=str(root), cache_dir=str(tmp_path / "cache"))
    assert d.train_images.shape == (6, 3, 32, 32) and d.class_names == ["airplane", "cat"]
    with pytest.raises(DataError, match="data.download=true") as err:
        load_data("cifar10", root=str(tmp_path / "nothing"))
    assert "ImageFolder" in str(err.value)
