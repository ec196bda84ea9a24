#!/usr/bin/env bash
# Recipe 14's frontiers and tables, from its sweeps (experiments/router_study.sh) and the committed runs it pools.
#
#   experiments/router_study_report.sh       # after router_study.sh; writes experiments/results/router_study_*/
#
# Pools each dataset's new arms (3 seeds each) with the committed softmax-router, Soft MoE and dense
# runs of recipes 1, 7, 8 and 11 (same setup), draws one frontier per dataset on the exact cost axes,
# compares every arm with dense, Soft MoE and the two Tokens Choice arms (Welch and paired 95%
# intervals), compares the seed-0 re-runs at this commit with their committed runs, and collects the
# routing diagnostics of the new runs. Runtime: a few minutes (the sparse-OT gap, when not yet
# written, about 5 more). Then `python experiments/report_tables.py` writes the recipe page's tables.
set -euo pipefail
moebench=${MOEBENCH:-moebench}
python=${PYTHON:-python}
study=multirun/router_study
res=experiments/results
soft="soft E64 p1 scale8"
tc="tokens_choice E32 k1 C1.0"
ec="experts_choice E32 C1.0"
ran() { compgen -G "$study/$1/s*/[0-9]*_*/result.json" > /dev/null; }  # a dataset with finished runs
for d in cifar10 tinyimagenet cifar10_rerun tinyimagenet_rerun; do
  ran "$d" || { echo "no runs in $study/$d: skipped"; continue; }
  "$moebench" pareto "$study/$d"/s* --out "$study/$d" --wandb-mode disabled > "$study/$d.pareto.txt"
done
if ran cifar10; then
# data.name=cifar10 given the ImageFolder tree is read by the imagefolder loader (moebench/data.py,
# load_data): the committed runs, made with data.name=imagefolder, read the same images the same way.
"$python" experiments/pool_frontier.py --out "$res/router_study_cifar10" --same-data cifar10=imagefolder \
  --title "CIFAR-10 (experiment=cifar10, 3 epochs): Liu et al.'s six routers and dense" \
  "$study/cifar10/pareto.json" "$res/cifar10_routers/pareto.json:dense,$tc,$ec" \
  "$res/cifar10_scale_grid/pareto.json:$soft"
fi
if ran tinyimagenet; then
"$python" experiments/pool_frontier.py --out "$res/router_study_tinyimagenet" \
  --title "Tiny-ImageNet-200 (experiment=tinyimagenet, 3 epochs): Liu et al.'s six routers and dense" \
  "$study/tinyimagenet/pareto.json" "$res/tinyimagenet_routers/pareto.json:dense,$soft" \
  "$res/tinyimagenet_routers2/pareto.json:$tc,$ec"
fi
for d in cifar10 tinyimagenet; do
  ran "$d" || continue
  out="$res/router_study_$d"
  # the recipe page's tables (written into it by experiments/report_tables.py from the same records)
  "$python" experiments/compare_arms.py "$out/pareto.json" --reference dense --reference "$soft"
  "$python" experiments/compare_arms.py "$out/pareto.json" --reference "$tc" --reference "$tc sinkhorn"
  "$python" experiments/routing_diagnostics.py "$study/$d"/s*/[0-9]*_*/ --json "$out/routing_diagnostics.json" > /dev/null
  if ran "${d}_rerun"; then  # the softmax routers' diagnostics at this commit, beside the new ones
    "$python" experiments/routing_diagnostics.py "$study/${d}_rerun"/s*/[0-9]*_*/ \
      --json "$out/routing_diagnostics_reruns.json" > /dev/null
  fi
done
"$python" - "$study" "$res" <<'PY'
import json, sys
from pathlib import Path
study, res = sys.argv[1:]
committed = {"cifar10": ["cifar10_routers"], "tinyimagenet": ["tinyimagenet_routers2"]}
lines = ["| dataset | arm | seed | committed top-1 % | re-run % | difference (points) |", "|---|---|---|---|---|---|"]
for d, files in committed.items():
    old = {(r["label"], r["seed"]): r["top1"] for f in files for r in json.load(open(f"{res}/{f}/pareto.json"))["runs"]}
    rerun = Path(f"{study}/{d}_rerun/pareto.json")
    for r in json.loads(rerun.read_text())["runs"] if rerun.exists() else []:
        before = old[(r["label"], r["seed"])]
        lines.append(f"| {d} | {r['label']} | {r['seed']} | {100 * before:.2f} | {100 * r['top1']:.2f} | "
                     f"{100 * (r['top1'] - before):+.2f} |")
open(f"{res}/router_study_reruns.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
[ -e "$res/sparse_ot_gap.json" ] || "$python" experiments/sparse_ot_gap.py --out "$res/sparse_ot_gap.json"  # minutes
