"""Every arm is trained alike: weight decay by role, router learning rate, the
paper's Experts Choice settings, and a validation split for model selection."""

from __future__ import annotations

import pytest
import torch

from moebench.data import channel_stats, load_data
from moebench.moe.decay import weight_decay_split
from moebench.build import build_model, make_optimizer, optimizer_record
from conftest import compose_cfg

ROUTERS = ("soft", "tokens_choice", "experts_choice", "dense")


def groups_for(router: str, *overrides: str) -> tuple[set[str], set[str]]:
    model = build_model(compose_cfg(f"router={router}", "experts=4", *overrides), in_chans=1, num_classes=10)
    decay, no_decay = weight_decay_split(model)
    assert set(decay).isdisjoint(no_decay)
    assert set(decay) | set(no_decay) == {name for name, _ in model.named_parameters()}
    return set(decay), set(no_decay)


def test_dense_and_moe_models_decay_their_shared_parts_alike():
    dense_decay, dense_no = groups_for("dense")
    for router in ROUTERS[:3]:
        decay, no = groups_for(router)
        shared = {n for n in dense_decay | dense_no if not n.startswith(("blocks.2.mlp", "blocks.3.mlp"))}
        assert decay & shared == dense_decay & shared, router
        assert no & shared == dense_no & shared, router


@pytest.mark.parametrize("router", ROUTERS)
def test_only_matmul_kernels_are_decayed(router):
    decay, no_decay = groups_for(router, "model.pool=cls")
    for name in decay:  # kernels of the patch embedding, attention, MLPs, experts, gates, head
        assert name.endswith((".weight", ".w1", ".w2")) and "norm" not in name, name
    for name in ("pos_embed", "cls_token", "head.bias", "norm.weight", "norm.bias", "blocks.0.mlp.fc1.bias"):
        assert name in no_decay
    assert {"head.weight", "patch_embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"} <= decay
    if router != "dense":
        assert {"blocks.3.mlp.experts.w1", "blocks.3.mlp.experts.w2"} <= decay
        assert {"blocks.3.mlp.experts.b1", "blocks.3.mlp.experts.b2"} <= no_decay  # 2-D, still biases
    if router == "soft":
        assert {"blocks.3.mlp.phi", "blocks.3.mlp.scale"} <= no_decay
    if router in ("tokens_choice", "experts_choice"):
        assert "blocks.3.mlp.gate.weight" in decay


def test_optimizer_groups_carry_decay_and_the_router_lr_multiplier():
    cfg = compose_cfg("router=soft", "experts=4", "router.lr_mult=10", "train.weight_decay=0.1")
    model = build_model(cfg, in_chans=1, num_classes=10)
    optimizer = make_optimizer(model, cfg)
    by_name = {n: g for g in optimizer.param_groups for n in g["names"]}
    assert by_name["blocks.3.mlp.phi"]["lr_mult"] == 10 and by_name["blocks.3.mlp.phi"]["weight_decay"] == 0
    assert by_name["blocks.3.mlp.scale"]["lr_mult"] == 10
    assert by_name["blocks.3.mlp.experts.w1"]["lr_mult"] == 1 and by_name["blocks.3.mlp.experts.w1"]["weight_decay"] == 0.1
    record = optimizer_record(optimizer)
    assert set(record["lr_mult"]) == {"blocks.2.mlp.phi", "blocks.2.mlp.scale", "blocks.3.mlp.phi", "blocks.3.mlp.scale"}
    assert "blocks.3.mlp.experts.b1" in record["no_decay"] and "head.weight" in record["decay"]


def test_experts_choice_defaults_are_the_papers_and_keep_images_independent():
    cfg = compose_cfg("router=experts_choice", "experts=4")
    r = cfg.router
    assert (r.group_size, r.noise_std, r.capacity_rounding, r.identical_init) == (1, 1.0, "round", True)
    torch.manual_seed(0)
    model = build_model(cfg, in_chans=1, num_classes=10).eval()
    images = torch.randn(4, 1, 8, 8)
    others = images.clone()
    others[1:] = torch.randn(3, 1, 8, 8)
    with torch.no_grad():  # image 0's prediction must not depend on the rest of its batch
        torch.testing.assert_close(model(images)[0], model(others)[0])


def test_validation_split_is_stratified_disjoint_and_the_same_for_every_seed():
    a = load_data("digits", val_fraction=0.1, seed=0)
    full = load_data("digits", val_fraction=0.0, seed=0)
    assert a.val_labels is not None and full.val_labels is None
    assert len(a.train_labels) + len(a.val_labels) == len(full.train_labels)
    counts = torch.bincount(a.val_labels, minlength=10)
    expected = torch.round(0.1 * torch.bincount(full.train_labels, minlength=10).float()).long()
    assert torch.equal(counts, expected)
    # disjoint: no validation image is also a training image
    train_keys = {bytes(x.numpy().tobytes()) + bytes([int(y)]) for x, y in zip(a.train_images, a.train_labels)}
    val_keys = [bytes(x.numpy().tobytes()) + bytes([int(y)]) for x, y in zip(a.val_images, a.val_labels)]
    dupes_in_full = len(full.train_labels) - len({bytes(x.numpy().tobytes()) + bytes([int(y)])
                                                  for x, y in zip(full.train_images, full.train_labels)})
    assert sum(k in train_keys for k in val_keys) <= dupes_in_full
    # CIFAR's and ImageFolder's fixed training splits give every seed the same validation images
    s1 = load_data("synthetic", num_train=200, num_test=10, image_size=8, val_fraction=0.25, seed=1)
    torch.manual_seed(123)  # the global RNG plays no part
    s2 = load_data("synthetic", num_train=200, num_test=10, image_size=8, val_fraction=0.25, seed=1)
    assert torch.equal(s1.val_images, s2.val_images) and 45 <= len(s1.val_labels) <= 55  # rounded per class


def test_channel_stats_in_chunks_equal_the_whole_split_in_float():
    images = torch.randint(0, 256, (1000, 3, 6, 6), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=97)
    pixels = images.float() / 255
    torch.testing.assert_close(torch.tensor(mean), pixels.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(std), pixels.std(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6)


def test_dense_wide_control_widens_only_the_blocks_an_moe_would_replace():
    base = build_model(compose_cfg("router=dense"), in_chans=1, num_classes=10)
    wide = build_model(compose_cfg("router=dense", "router.mlp_mult=4"), in_chans=1, num_classes=10)
    assert [b.mlp.fc1.out_features for b in base.blocks] == [256, 256, 256, 256]
    assert [b.mlp.fc1.out_features for b in wide.blocks] == [256, 256, 1024, 1024]


def test_evaluation_splits_are_not_in_class_order(tmp_path):
    """Sorted splits (ImageFolder lists class by class) are shuffled once, the same way for
    every seed: groups of consecutive test images must not be one class (Tokens Choice)."""
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b", "c", "d"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(20):
                Image.fromarray(np.full((4, 4, 3), i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    one = load_data("imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), val_fraction=0.25, seed=0)
    two = load_data("imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), val_fraction=0.25, seed=5)
    for labels in (one.test_labels, one.val_labels):
        runs = (labels[1:] != labels[:-1]).sum().item()
        assert runs > len(labels) // 2  # sorted would give 3 class changes
        assert torch.bincount(labels).tolist() == [len(labels) // 4] * 4
    assert torch.equal(one.test_labels, two.test_labels) and torch.equal(one.test_images, two.test_images)


def test_router_dispatch_normalized_reaches_the_soft_moe_layers_and_is_off_by_default():
    default = build_model(compose_cfg("router=soft", "experts=4"), in_chans=1, num_classes=10)
    port = build_model(compose_cfg("router=soft", "experts=4", "router.dispatch_normalized=true"), 1, 10)
    assert default.blocks[3].mlp.dispatch_normalized is False and port.blocks[3].mlp.dispatch_normalized is True


def test_router_lr_mult_zero_freezes_the_router_and_trains_the_rest():
    """router.lr_mult=0 is a frozen router: its parameters keep their initial values
    (lr 0, and AdamW's decoupled decay is lr * weight_decay, so 0 too) while the experts move."""
    torch.manual_seed(0)
    cfg = compose_cfg("router=tokens_choice", "experts=4", "router.lr_mult=0", "train.weight_decay=0.1")
    model = build_model(cfg, in_chans=1, num_classes=10)
    optimizer = make_optimizer(model, cfg)
    by_name = {n: g for g in optimizer.param_groups for n in g["names"]}
    assert by_name["blocks.3.mlp.gate.weight"]["lr_mult"] == 0
    assert optimizer_record(optimizer)["lr_mult"]["blocks.3.mlp.gate.weight"] == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):  # as the training loop sets each group's lr
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * group["lr_mult"]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.arange(8)).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert params["blocks.3.mlp.gate.weight"].grad is not None  # it had a gradient: lr 0 is what froze it
    for name in ("blocks.2.mlp.gate.weight", "blocks.3.mlp.gate.weight"):
        assert torch.equal(params[name], before[name]), name
    assert not torch.equal(params["blocks.3.mlp.experts.w1"], before["blocks.3.mlp.experts.w1"])
