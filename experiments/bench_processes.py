"""Training throughput with 1 process vs 2 processes (torchrun) on this machine.

Command:  python experiments/bench_processes.py            (make bench-processes)
Runtime:  ~6 min on 2 CPU cores (3 repeats of 3 arms, ~40 s per run).
Result:   experiments/results/bench_processes.{json,md}: training images/s of
          each arm (median over repeats, arms interleaved) and its ratio to
          one process, all measured in this one invocation.

The same run in three arms, with the same global batch and the same cores:
one process with all threads; 2 DDP ranks splitting the cores; 2 ranks with
the experts sharded (expert_parallel=true). Images/s is moebench's own
`cost.train_images_per_s` (forward, backward and optimizer step, first steps
left out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = [
    "data=synthetic", "data.num_train=3072", "data.num_test=256", "data.batch_size=128",
    "model=tiny", "router=soft", "experts=32", "train.epochs=1", "train.save_checkpoints=false",
    "wandb.mode=disabled", "cost.repeats=3",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moebench"]
ARMS = {
    "1 process": [sys.executable, "-m", "moebench", "train", *CONFIG],
    "2 processes (DDP)": [*TORCHRUN, "train", *CONFIG],
    "2 processes (DDP + expert parallel)": [*TORCHRUN, "train", *CONFIG, "expert_parallel=true"],
}


def run(cmd: list[str], run_dir: Path) -> float:
    proc = subprocess.run([*cmd, f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          env={**os.environ, "WANDB_SILENT": "true"})
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "result.json").read_text())["cost"]["train_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="experiments/results/bench_processes.json")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, (arm, cmd) in enumerate(ARMS.items()):  # interleaved: drift hits every arm alike
                samples[arm].append(run(cmd, Path(tmp) / f"{repeat}_{i}"))
                print(f"repeat {repeat}: {arm}: {samples[arm][-1]:.1f} images/s", flush=True)
    base = statistics.median(samples["1 process"])
    rows = [{"arm": arm, "images_per_s": statistics.median(s), "ratio_to_1_process": statistics.median(s) / base,
             "samples": s} for arm, s in samples.items()]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    out = Path(args.out)
    out.write_text(json.dumps({"machine": machine, "config": CONFIG, "repeats": args.repeats, "rows": rows},
                              indent=2) + "\n")
    lines = [f"# Training images/s: 1 vs 2 processes\n", f"Machine: {machine}. Config: `{' '.join(CONFIG)}`; "
             f"median of {args.repeats} interleaved repeats.\n", "| arm | images/s | ratio to 1 process |",
             "|---|---:|---:|"]
    lines += [f"| {r['arm']} | {r['images_per_s']:.1f} | {r['ratio_to_1_process']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
