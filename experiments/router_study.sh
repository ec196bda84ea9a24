#!/usr/bin/env bash
# Recipe 14 (issue 27): Liu et al. (2024)'s new routers at CPU scale, on CIFAR-10 and Tiny-ImageNet-200.
#
#   experiments/router_study.sh CIFAR10_ROOT TINYIMAGENET_ROOT [LANES]
#
# A root given as - skips that dataset (e.g. `- /data/tiny-imagenet-200` runs Tiny-ImageNet only).
# Runs every run below in LANES (default 2) parallel lanes of one thread each (run_queue.sh), so
# the 2 cores stay busy until the last run. Runs are written one by one under
# multirun/router_study/; re-running this script resumes whatever was cut off (finished runs are
# kept, a preempted one resumes from its checkpoint).
# Expected runtime on 2 CPU cores (measured 2026-12-01 on CIFAR-10, two lanes beside other work):
# CIFAR-10 13-30 minutes per run, 11 runs in about 2.5 hours; Tiny-ImageNet 26-42 minutes per run
# (measured 2026-12-01/02), 11 runs in about 3.5 hours. Then:  experiments/router_study_report.sh
set -euo pipefail
cifar=${1:?CIFAR-10 root (an ImageFolder tree or torchvision files), or - to skip it}
tiny=${2:?Tiny-ImageNet-200 root (made by tinyimagenet.sh), or - to skip it}
lanes=${3:-2}
# One queue item per run (dataset, seed, arm), run by run_queue.sh in parallel lanes.
for data in "cifar10 experiment=cifar10 data.root=$cifar" "tinyimagenet experiment=tinyimagenet data.root=$tiny"; do
  read -r name overrides <<< "$data"
  [ "${overrides##*=}" = - ] && continue
  for s in 0 1 2; do
    for v in tc_e32_k1_sinkhorn ec_e32_sinkhorn ec_e32_sparse_ot; do echo "$name $s $v variant=$v $overrides"; done
  done
  # The softmax routers of recipes 1 and 11, re-run at this commit (seed 0): do their committed
  # runs, pooled into the frontier, still stand for this code?
  for v in tc_e32_k1 ec_e32; do echo "${name}_rerun 0 $v variant=$v $overrides"; done
done | "$(dirname "$0")/run_queue.sh" multirun/router_study "$lanes"
