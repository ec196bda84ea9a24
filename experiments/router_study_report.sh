#!/usr/bin/env bash
# Recipe 14's frontiers and tables, from its sweeps (experiments/router_study.sh) and the committed runs it pools.
#
#   experiments/router_study_report.sh       # after router_study.sh; writes experiments/results/router_study_*/
#
# Pools each dataset's new arms (3 seeds each) with the committed softmax-router, Soft MoE and dense
# runs of recipes 1, 7, 8 and 11 (same setup), draws one frontier per dataset on the exact cost axes,
# compares every arm with dense, Soft MoE and the two Tokens Choice arms (Welch and paired 95%
# intervals), compares the seed-0 re-runs at this commit with their committed runs, and collects the
# routing diagnostics of the new runs. Runtime: a few minutes.
set -euo pipefail
moebench=${MOEBENCH:-moebench}
python=${PYTHON:-python}
study=multirun/router_study
res=experiments/results
soft="soft E64 p1 scale8"
tc="tokens_choice E32 k1 C1.0"
ec="experts_choice E32 C1.0"
for d in cifar10 tinyimagenet cifar10_rerun tinyimagenet_rerun; do
  "$moebench" pareto "$study/$d"/s* --out "$study/$d" --wandb-mode disabled > "$study/$d.pareto.txt"
done
"$python" experiments/pool_frontier.py --out "$res/router_study_cifar10" \
  --title "CIFAR-10 (experiment=cifar10, 3 epochs): Liu et al.'s six routers and dense" \
  "$study/cifar10/pareto.json" "$res/cifar10_routers/pareto.json:dense,$tc,$ec" \
  "$res/cifar10_scale_grid/pareto.json:$soft"
"$python" experiments/pool_frontier.py --out "$res/router_study_tinyimagenet" \
  --title "Tiny-ImageNet-200 (experiment=tinyimagenet, 3 epochs): Liu et al.'s six routers and dense" \
  "$study/tinyimagenet/pareto.json" "$res/tinyimagenet_routers/pareto.json:dense,$soft" \
  "$res/tinyimagenet_routers2/pareto.json:$tc,$ec"
for d in cifar10 tinyimagenet; do
  out="$res/router_study_$d"
  "$python" experiments/compare_arms.py "$out/pareto.json" --reference dense --reference "$soft" \
    --markdown "$out/vs_dense_and_soft.md"
  "$python" experiments/compare_arms.py "$out/pareto.json" --reference "$tc" --reference "$tc sinkhorn" \
    --markdown "$out/vs_tokens_choice.md"
  "$python" experiments/routing_diagnostics.py "$study/$d"/s*/*/ --json "$out/routing_diagnostics.json" > /dev/null
done
"$python" - "$study" "$res" <<'PY'
import json, sys
study, res = sys.argv[1:]
committed = {"cifar10": ["cifar10_routers"], "tinyimagenet": ["tinyimagenet_routers2"]}
lines = ["| dataset | arm | seed | committed top-1 % | re-run at this commit % | difference (points) |", "|---|---|---|---|---|---|"]
for d, files in committed.items():
    old = {(r["label"], r["seed"]): r["top1"] for f in files for r in json.load(open(f"{res}/{f}/pareto.json"))["runs"]}
    for r in json.load(open(f"{study}/{d}_rerun/pareto.json"))["runs"]:
        before = old[(r["label"], r["seed"])]
        lines.append(f"| {d} | {r['label']} | {r['seed']} | {100 * before:.2f} | {100 * r['top1']:.2f} | "
                     f"{100 * (r['top1'] - before):+.2f} |")
open(f"{res}/router_study_reruns.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
"$python" experiments/sparse_ot_gap.py --out "$res/sparse_ot_gap.json"
