#!/usr/bin/env bash
# Recipe 14 (issue 27): Liu et al. (2024)'s new routers at CPU scale, on CIFAR-10 and Tiny-ImageNet-200.
#
#   experiments/router_study.sh CIFAR10_ROOT TINYIMAGENET_ROOT [LANES]
#
# A root given as - skips that dataset (e.g. `- /data/tiny-imagenet-200` runs Tiny-ImageNet only).
# Runs every sweep below in LANES (default 2) parallel lanes of one thread each, taking sweeps
# from a shared queue, so the 2 cores stay busy until the last run. Every sweep writes run by
# run into its own dir under multirun/router_study/; re-running this script resumes whatever
# was cut off (finished runs are kept, a preempted one resumes from its checkpoint).
# Expected runtime on 2 CPU cores (measured 2026-12-01 on CIFAR-10, two lanes beside other work):
# CIFAR-10 20-30 minutes per run, 11 runs in about 2.5 hours; Tiny-ImageNet about twice that per
# run (estimate). Then:  experiments/router_study_report.sh
set -euo pipefail
cifar=${1:?CIFAR-10 root (an ImageFolder tree or torchvision files), or - to skip it}
tiny=${2:?Tiny-ImageNet-200 root (made by tinyimagenet.sh), or - to skip it}
lanes=${3:-2}
moebench=${MOEBENCH:-moebench}
out=multirun/router_study
mkdir -p "$out"
# One queue item per run (dataset, seed, arm): the lanes share the work evenly. Runs of one dataset
# and seed share a sweep dir (moebench keeps concurrent launches in one sweep dir apart).
queue=()
for data in "cifar10 experiment=cifar10 data.root=$cifar" "tinyimagenet experiment=tinyimagenet data.root=$tiny"; do
  read -r name overrides <<< "$data"
  [ "${overrides##*=}" = - ] && continue
  for s in 0 1 2; do
    for v in tc_e32_k1_sinkhorn ec_e32_sinkhorn ec_e32_sparse_ot; do queue+=("$name $s variant=$v $overrides"); done
  done
  # The softmax routers of recipes 1 and 11, re-run at this commit (seed 0): do their committed
  # runs, pooled into the frontier, still stand for this code?
  for v in tc_e32_k1 ec_e32; do queue+=("${name}_rerun 0 variant=$v $overrides"); done
done

printf '%s\n' "${queue[@]}" > "$out/queue"
: > "$out/taken"
lane() {
  while true; do
    item=$(flock "$out/queue" bash -c 'line=$(grep -vxFf "$0/taken" "$0/queue" | head -1 || true); [ -n "$line" ] && echo "$line" >> "$0/taken"; echo "$line"' "$out")
    [ -z "$item" ] && return 0
    read -r name seed variant overrides <<< "$item"
    echo "$(date -u +%H:%M:%S) lane $1 starts $name seed $seed $variant"
    # shellcheck disable=SC2086
    "$moebench" train -m $variant $overrides seed="$seed" threads=1 hydra.sweep.dir="$out/$name/s$seed" \
      > "$out/$name.s$seed.${variant#variant=}.log" 2>&1 || echo "$(date -u +%H:%M:%S) lane $1: $name seed $seed $variant exited $?"
    echo "$(date -u +%H:%M:%S) lane $1 ends $name seed $seed $variant"
  done
}
for i in $(seq 1 "$lanes"); do lane "$i" & done
wait
