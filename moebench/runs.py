"""Load a finished run back: its model with trained weights, its config and its record.

For tools that work on trained runs (re-timing, analysis, plots). The model is
rebuilt from the checkpoint alone: the input channels and the number of classes
are read off the weights, so no dataset has to be loaded to get it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoint import verify
from .errors import CheckpointError
from .rundirs import checkpoint_path


@dataclass
class LoadedRun:
    run_dir: Path
    model: torch.nn.Module  # eval mode, trained weights, on the requested device
    config: dict  # the run's full resolved config
    result: dict | None  # result.json, or None when the run left none (or it is unreadable)
    checkpoint: Path

    @property
    def precision(self) -> str:
        return self.config.get("precision", "fp32")

    @property
    def compile(self) -> bool:
        return bool(self.config.get("compile", False))


def _read_result(run_dir: Path) -> dict | None:
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) else None


def _read_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unpickling refused...
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a moebench checkpoint (no model state dict and config)")
    verify(ckpt, path)
    return ckpt


def _shapes(state: dict, path: Path) -> tuple[int, int]:
    """(in_chans, num_classes): patch_embed.weight is (dim, in_chans, p, p), head.weight is (classes, dim)
    (a timm model: patch_embed.proj.weight)."""
    try:
        embed = state["patch_embed.weight"] if "patch_embed.weight" in state else state["patch_embed.proj.weight"]
        return embed.shape[1], state["head.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        raise CheckpointError(f"{path}: the model has no patch_embed/head weights; not a moebench ViT") from None


def load_run(run_dir: str | Path, checkpoint: str = "last.pt", device: str | torch.device = "cpu") -> LoadedRun:
    """The model of ``run_dir`` with the weights of ``checkpoint`` (a file name in the run dir)."""
    from .build import build_model  # the one place that turns a config into a model

    run_dir = Path(run_dir).expanduser()
    path = checkpoint_path(run_dir, checkpoint)
    ckpt = _read_checkpoint(path)
    config = ckpt["config"]
    in_chans, num_classes = _shapes(ckpt["model"], path)
    try:
        model = build_model(OmegaConf.create(config), in_chans, num_classes, load_pretrained=False)
        model.load_state_dict(ckpt["model"])
    except Exception as err:  # the config and weights disagree, or an older config lacks a key
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{path}: cannot rebuild the model from its config: {type(err).__name__}: {first}") from None
    model.to(device).eval()
    return LoadedRun(run_dir=run_dir, model=model, config=config, result=_read_result(run_dir), checkpoint=path)


def load_run_data(config: dict, root: str | None = None):
    """The run's dataset (``moebench.data.ImageData``), loaded with the run's data settings and seed.

    ``root`` replaces ``data.root``, which a run records as given (often relative to where it was started)."""
    from .data import load_data

    data = dict(config.get("data") or {})
    if "name" not in data:
        raise CheckpointError("the run's config has no data.name")
    accepted = inspect.signature(load_data).parameters
    # Pass every data key load_data knows (e.g. a split fraction), so the splits match training.
    kwargs = {key: value for key, value in data.items() if key in accepted and key not in ("name", "seed")}
    if root is not None:
        kwargs["root"] = root
    return load_data(data["name"], seed=config.get("seed", 0), **kwargs)
