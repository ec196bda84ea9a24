"""The inspect pictures (matplotlib, Agg): each function draws arrays it is given into one PNG.

Maps over the patch grid are drawn on top of the image they belong to, with
every patch cell the size of its pixels. Categorical maps (which expert or
slot a patch went to) also print the id in each cell, since 32-128 colours
cannot all be told apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: reruns give the same bytes
    _plt().close(fig)


def show_image(ax, image: np.ndarray, title: str | None = None) -> None:
    """``image``: uint8 (C, H, W) with C = 1 or 3."""
    h, w = image.shape[-2:]
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0), interpolation="nearest")
    else:
        ax.imshow(image.transpose(1, 2, 0), extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _category_colors(n: int) -> np.ndarray:
    plt = _plt()
    base = np.concatenate([plt.get_cmap(name).colors for name in ("tab20", "tab20b", "tab20c")])
    return base[np.arange(n) % len(base)]


def _cell_text(ax, grid_h: int, grid_w: int, cell: float, texts: list[list[str]], size: float) -> None:
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=1.5, foreground="black")]
    for i in range(grid_h):
        for j in range(grid_w):
            if texts[i][j]:
                ax.text((j + 0.5) * cell, (i + 0.5) * cell, texts[i][j], ha="center", va="center",
                        fontsize=size, color="white", path_effects=outline)


def draw_heatmaps(path: Path, images: list[np.ndarray], captions: list[str], maps: np.ndarray,
                  column_titles: list[str], title: str) -> None:
    """Rows = images; column 0 the image, then one heatmap per column of ``maps`` (N, K, gh, gw),
    overlaid on the image, all on one colour scale from 0 to the largest value."""
    plt = _plt()
    n, k = maps.shape[:2]
    fig, axes = plt.subplots(n, k + 1, figsize=(1.7 * (k + 1) + 0.8, 1.8 * n + 0.6), squeeze=False)
    vmax = float(maps.max()) or 1.0
    for row in range(n):
        show_image(axes[row][0], images[row], captions[row])
        h, w = images[row].shape[-2:]
        for col in range(k):
            ax = axes[row][col + 1]
            show_image(ax, images[row], column_titles[col] if row == 0 else None)
            heat = ax.imshow(maps[row, col], cmap="inferno", vmin=0, vmax=vmax, alpha=0.75,
                             extent=(0, w, h, 0), interpolation="nearest")
    fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.6, label="weight")
    fig.suptitle(_wrap(title, 25 + 18 * k), fontsize=9)
    _save(fig, path)


def draw_categories(path: Path, images: list[np.ndarray], captions: list[str],
                    rows: list[tuple[str, np.ndarray, list]], num_categories: int, title: str) -> None:
    """Row 0: the images; then one row per (row title, labels (N, gh, gw) with -1 = none, texts).
    Each patch is coloured by its label; label -1 is greyed and crossed out."""
    plt = _plt()
    n = len(images)
    colors = _category_colors(max(1, num_categories))
    fig, axes = plt.subplots(len(rows) + 1, n, figsize=(2.3 * n, 2.4 * (len(rows) + 1) + 0.4), squeeze=False)
    for col in range(n):
        show_image(axes[0][col], images[col], captions[col])
    for r, (row_title, labels, texts) in enumerate(rows, start=1):
        for col in range(n):
            ax = axes[r][col]
            image = images[col]
            h, w = image.shape[-2:]
            grid_h, grid_w = labels.shape[1:]
            cell = h / grid_h
            show_image(ax, image)
            rgba = np.zeros((grid_h, grid_w, 4))
            lab = labels[col]
            rgba[lab >= 0, :3] = colors[lab[lab >= 0]]
            rgba[lab >= 0, 3] = 0.6
            rgba[lab < 0] = (0.5, 0.5, 0.5, 0.85)
            ax.imshow(rgba, extent=(0, w, h, 0), interpolation="nearest")
            for i, j in zip(*np.nonzero(lab < 0)):
                ax.plot([(j + 0.15) * cell, (j + 0.85) * cell], [(i + 0.15) * cell, (i + 0.85) * cell], "k-", lw=1)
                ax.plot([(j + 0.15) * cell, (j + 0.85) * cell], [(i + 0.85) * cell, (i + 0.15) * cell], "k-", lw=1)
            _cell_text(ax, grid_h, grid_w, cell, texts[col], size=max(3.5, 40 / max(grid_h, grid_w)))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            if col == 0:
                ax.set_ylabel(row_title, fontsize=8)
    fig.suptitle(_wrap(title, 20 + 30 * n), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def draw_load(path: Path, layers: dict[str, dict], title: str) -> None:
    """One panel per layer: bars = load share per expert, dots = first-choice share, line = uniform."""
    plt = _plt()
    fig, axes = plt.subplots(len(layers), 1, figsize=(9, 2.4 * len(layers) + 0.5), squeeze=False)
    for ax, (name, s) in zip(axes[:, 0], layers.items()):
        load, first = np.asarray(s["load_share"]), np.asarray(s["first_choice_share"])
        experts = np.arange(len(load))
        ax.bar(experts, load, color="tab:blue", alpha=0.8, label="load share")
        ax.plot(experts, first, "o", color="tab:orange", ms=3, label="first-choice share")
        ax.axhline(1 / len(load), color="gray", ls="--", lw=1, label="uniform 1/E")
        ax.set_title(f"{name}: load CV {s['load_cv']:.2f}, max/mean {s['load_max_over_mean']:.2f}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("share")
        ax.set_xlim(-1, len(load))
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle(_wrap(title, 110), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def draw_position_maps(path: Path, maps: dict[str, np.ndarray], title: str, fixed_range: bool) -> None:
    """One heatmap over the patch grid per layer, the value printed in each cell.

    ``fixed_range``: colours span [0, 1] (rates); otherwise the data's own range (relative weights near 1)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps) + 1.2, 4.0), squeeze=False, layout="constrained")
    values = np.concatenate([m.ravel() for m in maps.values()])
    low, top = (0.0, 1.0) if fixed_range else (float(values.min()), float(values.max()))
    top = top if top > low else low + 1e-6
    for ax, (name, grid) in zip(axes[0], maps.items()):
        image = ax.imshow(grid, cmap="viridis", vmin=low, vmax=top, interpolation="nearest")
        if grid.size <= 256:
            for (i, j), value in np.ndenumerate(grid):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if value < low + 0.6 * (top - low) else "black")
        ax.set_title(f"{name} (mean {grid.mean():.3f})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(_wrap(title, 30 + 40 * len(maps)), fontsize=9)
    _save(fig, path)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def draw_similarity(path: Path, matrices: dict[str, np.ndarray], title: str) -> None:
    """Colours span [lowest off-diagonal value, 1] over all layers, so structure shows even
    when all experts are nearly alike (the titles give the numbers)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.8 * len(matrices) + 1.2, 4.0), squeeze=False,
                             layout="constrained")
    offs = {name: sim[~np.eye(len(sim), dtype=bool)] for name, sim in matrices.items()}
    low = min((float(off.min()) for off in offs.values() if off.size), default=0.0)
    low = min(np.floor(low * 100) / 100, 0.99)
    for ax, (name, sim) in zip(axes[0], matrices.items()):
        image = ax.imshow(sim, cmap="viridis", vmin=low, vmax=1, interpolation="nearest")
        off = offs[name]
        ax.set_title(f"{name}\noff-diagonal mean {off.mean():.3f}, min {off.min():.3f}", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=f"cosine similarity ({low:g} to 1)")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def draw_curves(path: Path, curves: dict[str, dict[str, tuple[list, list]]], title: str) -> None:
    """One panel per metric key: ``curves[key][layer] = (epochs, values)``."""
    plt = _plt()
    keys = sorted(curves)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows + 0.4), squeeze=False)
    for ax, key in zip(axes.ravel(), keys):
        for layer, (epochs, values) in sorted(curves[key].items()):
            ax.plot(epochs, values, "o-", ms=3, label=layer)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
