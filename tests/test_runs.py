"""Loading a trained run back (moebench.runs) from a real tiny run."""

from __future__ import annotations

import pytest
import torch

from moebench.errors import CheckpointError
from moebench.runs import load_run, load_run_data



@pytest.fixture
def run_dir(tiny_run):
    return tiny_run  # conftest: a tiny Soft MoE run, seed 3


def test_load_run_rebuilds_the_trained_model_without_the_data(run_dir):
    loaded = load_run(run_dir)
    assert not loaded.model.training
    assert loaded.config["router"]["name"] == "soft" and loaded.config["seed"] == 3
    assert loaded.result["status"] == "completed"
    saved = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # Same predictions as the run's own evaluation would give: the test accuracy it recorded.
    data = load_run_data(loaded.config)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = loaded.model((data.test_images.float() / 255 - mean) / std)
    top1 = (logits.argmax(1) == data.test_labels).float().mean().item()
    assert top1 == pytest.approx(loaded.result["quality"]["top1"])
    assert logits.shape[1] == data.num_classes


def test_missing_dir_missing_or_corrupt_checkpoint_are_one_line_errors(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_run(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no checkpoint epoch9\.pt; it holds .*last\.pt"):
        load_run(run_dir, checkpoint="epoch9.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_run(empty)
    (empty / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as err:
        load_run(empty)
    assert "\n" not in str(err.value)
    torch.save({"weights": {}}, empty / "last.pt")
    with pytest.raises(CheckpointError, match="not a moebench checkpoint"):
        load_run(empty)
