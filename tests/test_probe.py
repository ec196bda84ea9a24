"""Few-shot linear probe: the ridge solution, the L2 choice (held-out training data only), the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moebench.probe import L2_GRID, draw_shots, fewshot_draw, heldout_split, ridge_predictions

from conftest import moebench


def toy(num_classes=10, per_class=60, dim=32, seed=0, separable=True):
    """Features with a class signal along one axis per class (or none), plus noise; train and test splits."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.repeat(np.arange(num_classes), n)
        x = rng.normal(scale=0.5, size=(len(labels), dim))
        if separable:  # classes 8 noise stds apart along their own axis: linearly separable in practice
            x[np.arange(len(labels)), labels] += 4.0
        return x, labels

    (xtr, ytr), (xte, yte) = split(per_class), split(per_class)
    if not separable:
        ytr, yte = rng.permutation(ytr), rng.permutation(yte)
    return {"train": xtr, "test": xte}, {"train": ytr, "test": yte}


@pytest.mark.parametrize("n,d", [(40, 8), (6, 20)])  # the primal (n >= d) and the dual (n < d) forms
def test_ridge_predictions_equal_the_direct_solution(n, d):
    rng = np.random.default_rng(1)
    x, labels, other = rng.normal(size=(n, d)), rng.integers(0, 3, n), rng.normal(size=(5, d))
    grid = np.array([0.1, 3.0, 100.0])
    scores = ridge_predictions(x, labels, 3, [other], grid)[0]
    mean, std = x.mean(0), x.std(0) + 1e-5
    xs = (x - mean) / std
    y = 2.0 * np.eye(3)[labels] - 1.0
    for i, l2 in enumerate(grid):
        w = np.linalg.solve(xs.T @ xs + l2 * np.eye(d), xs.T @ (y - y.mean(0)))
        np.testing.assert_allclose(scores[i], ((other - mean) / std) @ w + y.mean(0), rtol=1e-8, atol=1e-8)


def run_draws(features, labels, k, draws=3, seed=0):
    heldout, pools = heldout_split(labels["train"], 10, k, seed)
    return [fewshot_draw(features, labels, draw_shots(pools, k, seed, d), heldout, 10) for d in range(draws)]


def test_separable_features_probe_to_one_and_random_labels_to_chance():
    features, labels = toy()
    assert min(r["top1"] for r in run_draws(features, labels, k=5)) >= 0.99
    features, labels = toy(separable=False, per_class=200)
    chance = np.mean([r["top1"] for r in run_draws(features, labels, k=10)])
    assert abs(chance - 0.1) < 0.04


def test_l2_is_chosen_on_heldout_training_examples_never_on_the_test_split():
    features, labels = toy(dim=48, seed=3)
    # Noisy training features: the held-out accuracy then depends on the L2 strength.
    features["train"] = features["train"] + np.random.default_rng(4).normal(scale=2.0, size=features["train"].shape)
    heldout, pools = heldout_split(labels["train"], 10, 5, seed=0)
    shots = draw_shots(pools, 5, seed=0, draw=0)
    assert not set(heldout) & set(np.concatenate(pools))  # the k-shot pools never contain a held-out example
    assert set(shots) <= set(np.concatenate(pools)) and len(shots) == 50
    chosen = fewshot_draw(features, labels, shots, heldout, 10)
    # The choice is the held-out argmax (ties: larger L2)...
    held = ridge_predictions(features["train"][shots], labels["train"][shots], 10, [features["train"][heldout]])[0]
    held_acc = (held.argmax(-1) == labels["train"][heldout]).mean(1)
    assert chosen["l2"] == L2_GRID[np.flatnonzero(held_acc == held_acc.max())[-1]]
    assert chosen["heldout_top1"] == held_acc.max()
    # ...and the test labels cannot move it: scrambled test labels, same L2.
    scrambled = dict(labels, test=np.random.default_rng(5).permutation(labels["test"]))
    assert fewshot_draw(features, scrambled, shots, heldout, 10)["l2"] == chosen["l2"]


def test_too_few_examples_per_class_is_a_clear_error():
    from moebench.probe import ProbeError

    with pytest.raises(ProbeError, match="25-shot needs at least 26"):
        heldout_split(np.repeat(np.arange(3), 10), 3, 25, seed=0)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("probe") / "run"
    proc = moebench("train", "experiment=smoke", "data=digits", "data.num_train=null", "data.num_test=100", "router=soft",
                    f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_probe_cli_writes_result_json_probe_keys_and_keeps_the_rest(digits_run, cli_in_process):
    path = digits_run / "result.json"
    before = json.loads(path.read_text())
    proc = moebench("probe", str(digits_run), "--shots", "1,5", "--draws", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads(path.read_text())
    assert {k: v for k, v in after.items() if k != "probe"} == before  # nothing else touched
    for k in (1, 5):
        s = after["probe"]["digits"][f"{k}shot"]
        assert s["draws"] == 2 and len(s["top1_per_draw"]) == 2 and s["shots"] == k and s["classes"] == 10
        assert 0.0 <= s["top1_min"] <= s["top1_mean"] <= s["top1_max"] <= 1.0
        assert s["top1_mean"] == pytest.approx(np.mean(s["top1_per_draw"]))
        assert s["test_examples"] == 100 and all(l2 in L2_GRID for l2 in s["l2_per_draw"])
    assert f"digits 5shot: top-1 {after['probe']['digits']['5shot']['top1_mean']:.4f}" in proc.stdout

    # A second probe (another dataset, other shots) adds to the record and keeps the first one
    # (the CLI in this process: the first call above is the fresh-process one).
    code, _, err = cli_in_process("probe", str(digits_run), "--data", "synthetic", "--shots", "2", "--draws", "1",
                                  cwd=digits_run.parent)
    assert code == 0, err[-3000:]
    merged = json.loads(path.read_text())["probe"]
    assert set(merged) == {"digits", "synthetic"} and merged["digits"] == after["probe"]["digits"]
    assert set(merged["synthetic"]) == {"2shot"}

    # The probe as the quality axis of a frontier.
    out = digits_run.parent / "pareto"
    code, _, err = cli_in_process("pareto", str(digits_run), "--quality", "probe.digits.5shot", "--out", str(out),
                                  "--wandb-mode", "disabled", cwd=digits_run.parent)
    assert code == 0, err[-3000:]
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["quality"] == "probe.digits.5shot"
    assert [row["probe.digits.5shot"] for row in summary["runs"]] == [merged["digits"]["5shot"]["top1_mean"]]


def test_probe_bad_input_is_one_line_and_leaves_result_json_alone(digits_run, tmp_path, cli_in_process):
    # in this process: a fresh one per case spent seconds importing torch before refusing
    path = digits_run / "result.json"
    before = path.read_bytes()
    for args, needle in ((["--shots", "0"], "shots"), (["--shots", "a,b"], "shots"),
                         (["--data", "nope"], "'nope'"), (["--draws", "0"], "draws"),
                         (["--shots", "500"], "500-shot")):
        code, _, err = cli_in_process("probe", str(digits_run), *args, cwd=tmp_path)
        assert code == 2, args
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert path.read_bytes() == before
    code, _, err = cli_in_process("probe", str(tmp_path / "missing"), cwd=tmp_path)
    assert code == 2 and "missing" in err


@pytest.mark.slow  # two runs; the probe command is tested on one run above
def test_eval_probe_runs_after_training_and_bad_settings_stop_before_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = moebench("train", "experiment=smoke", "data=digits", "data.num_train=null", "data.num_test=60",
                    "router=tokens_choice", "router.group_size=2", "eval.probe.datasets=[own]",
                    "eval.probe.shots=[1,3]", "eval.probe.draws=2", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "completed" and "top1" in record["quality"]
    probe = record["probe"]["digits"]
    assert set(probe) == {"1shot", "3shot"} and probe["3shot"]["draws"] == 2
    assert probe["3shot"]["test_examples"] == 60

    for override, needle in (("eval.probe.shots=[0]", "eval.probe.shots"),
                             ("eval.probe.draws=0", "eval.probe.draws"),
                             ("eval.probe.datasets=own", "eval.probe.datasets")):
        proc = moebench("train", "experiment=smoke", "eval.probe.datasets=[own]", override,
                        f"hydra.run.dir={tmp_path / 'bad'}")
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "bad" / "last.pt").exists()  # refused before any training


def test_features_come_back_in_input_order_though_fed_shuffled():
    import torch

    from moebench.probe import extract_features

    class Echo(torch.nn.Module):  # the "pre-logit feature" of an image is its first pixel
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, 1)

        def forward(self, x):
            return self.head(x[:, :1, 0, 0])

    images = torch.arange(70, dtype=torch.uint8).view(70, 1, 1, 1)
    features = extract_features(Echo(), images, mean=(0.0,), std=(1 / 255,), batch_size=16)
    np.testing.assert_allclose(features[:, 0], np.arange(70), atol=1e-4)
