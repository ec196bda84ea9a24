#!/usr/bin/env bash
# Recipe 14 (issue 27): Liu et al. (2024)'s new routers at CPU scale, on CIFAR-10 and Tiny-ImageNet-200.
#
#   experiments/router_study.sh CIFAR10_ROOT TINYIMAGENET_ROOT [LANES]
#
# Runs every sweep below in LANES (default 2) parallel lanes of one thread each, taking sweeps
# from a shared queue, so the 2 cores stay busy until the last run. Every sweep writes run by
# run into its own dir under multirun/router_study/; re-running this script resumes whatever
# was cut off (finished runs are kept, a preempted one resumes from its checkpoint).
# Expected runtime on 2 CPU cores: about 100 minutes (CIFAR-10 4-5 minutes per run, Tiny-ImageNet
# 9-12 minutes per run, two lanes). Then:  experiments/router_study_report.sh
set -euo pipefail
cifar=${1:?CIFAR-10 root (an ImageFolder tree or torchvision files)}
tiny=${2:?Tiny-ImageNet-200 root (made by tinyimagenet.sh)}
lanes=${3:-2}
moebench=${MOEBENCH:-moebench}
out=multirun/router_study
mkdir -p "$out"
new=variant=tc_e32_k1_sinkhorn,ec_e32_sinkhorn,ec_e32_sparse_ot
queue=()
for s in 0 1 2; do queue+=("cifar10 $s $new experiment=cifar10 data.root=$cifar"); done
for s in 0 1 2; do queue+=("tinyimagenet $s $new experiment=tinyimagenet data.root=$tiny"); done
# The softmax routers of recipes 1 and 11 re-run at this commit (seed 0): do their committed runs
# still stand for this code? (Their 3 seeds are pooled into the frontier.)
queue+=("cifar10_rerun 0 variant=tc_e32_k1,ec_e32 experiment=cifar10 data.root=$cifar")
queue+=("tinyimagenet_rerun 0 variant=tc_e32_k1,ec_e32 experiment=tinyimagenet data.root=$tiny")

printf '%s\n' "${queue[@]}" > "$out/queue"
: > "$out/taken"
lane() {
  while true; do
    item=$(flock "$out/queue" bash -c 'line=$(grep -vxFf "$0/taken" "$0/queue" | head -1 || true); [ -n "$line" ] && echo "$line" >> "$0/taken"; echo "$line"' "$out")
    [ -z "$item" ] && return 0
    read -r name seed overrides <<< "$item"
    echo "$(date -u +%H:%M:%S) lane $1 starts $name seed $seed"
    # shellcheck disable=SC2086
    "$moebench" train -m $overrides seed="$seed" threads=1 hydra.sweep.dir="$out/$name/s$seed" \
      > "$out/$name.s$seed.log" 2>&1 || echo "$(date -u +%H:%M:%S) lane $1: $name seed $seed exited $?"
    echo "$(date -u +%H:%M:%S) lane $1 ends $name seed $seed"
  done
}
for i in $(seq 1 "$lanes"); do lane "$i" & done
wait
