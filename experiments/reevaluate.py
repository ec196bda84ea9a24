"""Re-score finished runs on their test split as moebench now orders it, and record both scores.

    python experiments/reevaluate.py RUN_DIR... [--why TEXT]

Runs evaluated before the test and validation splits were shuffled once (commit "Test and
validation splits in one fixed shuffled order") saw ImageFolder test images class by class;
Tokens Choice, which routes groups of consecutive images, was then scored ~3 points low.
This loads each run's final weights (last.pt), evaluates test top-1 and loss exactly as
training does, and rewrites result.json atomically: ``quality.top1`` and ``quality.loss``
become the new scores, the old quality block is kept under ``quality.as_trained``, and
``quality.reevaluated`` says when and why. ``top1_at_best_val`` follows only when the best
validation epoch was the last one (its weights are the ones re-scored); otherwise it is null.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from pathlib import Path

import torch

from moebench import distributed
from moebench.data import Loader
from moebench.runs import load_run, load_run_data
from moebench.tracking import atomic_write_json
from moebench.train import evaluate


def reevaluate(run_dir: Path, why: str) -> dict:
    run = load_run(run_dir)
    data = load_run_data(run.config)
    norm = {"mean": data.mean, "std": data.std}
    loader = Loader(data.test_images, data.test_labels, run.config["data"]["eval_batch_size"],
                    shuffle=False, drop_last=False, **norm)
    with torch.no_grad():
        scores = evaluate(run.model, loader, torch.device("cpu"), contextlib.nullcontext, distributed.current())
    result = dict(run.result)
    old = dict(result["quality"])
    old = old.pop("as_trained", None) or old  # re-scored before: keep the scores training recorded
    epochs = run.config["train"]["epochs"]
    quality = {**old, "top1": scores["top1"], "loss": scores["loss"], "as_trained": old,
               "reevaluated": {"date": datetime.date.today().isoformat(), "why": why}}
    if "top5" in scores:
        quality["top5"] = scores["top5"]
    quality["top1_at_best_val"] = scores["top1"] if old.get("best_val_epoch") == epochs else None
    result["quality"] = quality
    atomic_write_json(run_dir / "result.json", result)
    return {"run": str(run_dir), "before": old.get("top1"), "after": scores["top1"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--why", default="test split was in class order; now one fixed shuffled order")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        row = reevaluate(run_dir, args.why)
        print(f"{row['run']}: top1 {row['before']:.4f} -> {row['after']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
