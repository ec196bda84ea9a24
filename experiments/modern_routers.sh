#!/usr/bin/env bash
# Recipe 15 (issue 28): today's language-model routers in vision at CPU scale, on CIFAR-10 and Tiny-ImageNet-200.
#
#   experiments/modern_routers.sh run CIFAR10_ROOT TINYIMAGENET_ROOT [LANES]   # every run, resumable
#   experiments/modern_routers.sh report                                       # frontiers, tables, diagnostics
#
# Runs whose records are committed (results/modern_routers_*/pareto.json) are not trained again, so the
# study resumes on a machine without its run dirs; the report keeps those records beside the new runs.
#
# A root given as - skips that dataset. Arms (3 seeds each, at the setup of recipes 1 and 11,
# FLOPs per image matched to top-1 Tokens Choice over 32 experts):
#   deepseek        variant=tc_deepseek_e32: sigmoid gate, aux-loss-free bias, 32 experts split 4 ways, 1 shared
#   and its ablations, each piece removed alone:
#   -sigmoid        the softmax gate (DeepSeek-V2's: not renormalised)
#   -bias           no selection bias; V-MoE's importance and load losses with gate noise balance instead
#                   (tc_e32_k1's settings: the baseline's way to balance, not none)
#   -shared         no shared expert (4 routed choices of 128)
#   -fine           neither split nor shared expert (top-1 of 32; a shared expert needs the split at k=1)
#   dropless        variant=tc_e32_k1_dropless: V-MoE's Tokens Choice without capacity
#   remoe           variant=remoe_e32: ReLU gates, L1 penalty towards sparsity 1 - 1/32
# and a test of why the full router trails its "-bias" ablation (added after the first CIFAR-10 seeds):
#   deepseek-u0.01  the bias at 10x DeepSeek-V3's rate: the sign update moves a bias by at most u per step,
#                   and at u = 0.001 the CIFAR-10 runs' busiest expert took several times the mean load for
#                   most of their 1,053 steps
# and on CIFAR-10 only (each added after the reading it tests; none closed the gap there):
#   deepseek-dropless the full router without capacity, as DeepSeek-V3 trains (the bias's loads leave more
#                   choices over capacity than V-MoE's losses do)
# and the full router plus one half of what the "-bias" arm balances with:
#   deepseek+noise  V-MoE's gate noise (noise_std 1) beside the bias
#   deepseek+importance V-MoE's importance loss (weight 0.005) beside the bias (its load loss cannot be: it
#                   ignores the bias)
# and the "-bias" arm without one of its two losses (both keep its gate noise): which of them carries its gain.
# They differ from it only in keys its label leaves out, so they train in a sweep dir of their own
# (multirun/modern_routers_losses), where their labels name the loss weights:
#   deepseek-bias-importance V-MoE's load loss alone in place of the bias
#   deepseek-bias-load       V-MoE's importance loss alone in place of the bias
# pooled with the committed runs of the same setup: dense, Tokens Choice (V-MoE), Experts Choice
# (recipes 1 and 11) and Soft MoE at logit scale 8 (recipes 7 and 11).
# Expected runtime on 2 CPU cores at one thread per run (this recipe's, 2026-12-02, by the machine's load):
# 6-34 minutes per CIFAR-10 run, 17-39 per Tiny-ImageNet run; 57 runs in about 11 hours with 2 lanes.
set -euo pipefail
here=$(dirname "$0")
out=multirun/modern_routers
losses=multirun/modern_routers_losses
res=$here/results
arms=(
  "deepseek variant=tc_deepseek_e32"
  "deepseek-sigmoid variant=tc_deepseek_e32 router.gate=softmax"
  "deepseek-bias variant=tc_deepseek_e32 router.bias_rate=null router.importance_weight=0.005 router.load_weight=0.005 router.noise_std=1.0"
  "deepseek-shared variant=tc_deepseek_e32 router.shared_experts=0"
  "deepseek-fine variant=tc_deepseek_e32 router.granularity=1 router.shared_experts=0"
  "dropless variant=tc_e32_k1_dropless"
  "remoe variant=remoe_e32"
)
followups=(  # queued after every seed of the arms
  "deepseek-u0.01 variant=tc_deepseek_e32 router.bias_rate=0.01"
)
cifar10_followups=(  # CIFAR-10 only: whether the drops, or which half of V-MoE's balancing, the "-bias" arm gains by
  "deepseek-dropless variant=tc_deepseek_e32 router.dropless=true"
  "deepseek+noise variant=tc_deepseek_e32 router.noise_std=1.0"
  "deepseek+importance variant=tc_deepseek_e32 router.importance_weight=0.005"
)
losses_followups=(  # CIFAR-10 only, in a sweep dir of their own (losses=): which of V-MoE's losses the "-bias" arm gains by
  "deepseek-bias-importance variant=tc_deepseek_e32 router.bias_rate=null router.load_weight=0.005 router.noise_std=1.0"
  "deepseek-bias-load variant=tc_deepseek_e32 router.bias_rate=null router.importance_weight=0.005 router.noise_std=1.0"
)
case ${1:-} in
run)
  cifar=${2:?CIFAR-10 root (an ImageFolder tree or torchvision files), or - to skip it}
  tiny=${3:?Tiny-ImageNet-200 root (made by tinyimagenet.sh), or - to skip it}
  for data in "cifar10 experiment=cifar10 data.root=$cifar" "tinyimagenet experiment=tinyimagenet data.root=$tiny"; do
    read -r name overrides <<< "$data"
    [ "${overrides##*=}" = - ] && continue
    for s in 0 1 2; do
      for arm in "${arms[@]}"; do echo "$name $s $arm $overrides"; done
    done
    more=("${followups[@]}")
    [ "$name" = cifar10 ] && more+=("${cifar10_followups[@]}")
    for arm in "${more[@]}"; do
      for s in 0 1 2; do echo "$name $s $arm $overrides"; done
    done
  done | "${PYTHON:-python}" "$here/unrecorded.py" cifar10="$res/modern_routers_cifar10/pareto.json" \
           tinyimagenet="$res/modern_routers_tinyimagenet/pareto.json" | "$here/run_queue.sh" "$out" "${4:-2}"
  [ "$cifar" = - ] && exit 0
  for s in 0 1 2; do
    for arm in "${losses_followups[@]}"; do echo "cifar10 $s $arm experiment=cifar10 data.root=$cifar"; done
  done | "${PYTHON:-python}" "$here/unrecorded.py" cifar10="$res/modern_routers_cifar10/pareto.json" \
         | "$here/run_queue.sh" "$losses" "${4:-2}"
  ;;
report)
  moebench=${MOEBENCH:-moebench}
  python=${PYTHON:-python}
  soft="soft E64 p1 scale8"
  tc="tokens_choice E32 k1 C1.0"
  ec="experts_choice E32 C1.0"
  for d in cifar10 tinyimagenet; do
    sweeps=()  # this machine's runs of $d: the main queue's, and the losses follow-up's (labelled in a sweep of its own)
    for o in "$out" "$losses"; do
      compgen -G "$o/$d/s*/[0-9]*_*/result.json" > /dev/null || continue
      "$moebench" pareto "$o/$d"/s* --out "$o/$d" --wandb-mode disabled > "$o/$d.pareto.txt"
      sweeps+=("$o/$d/pareto.json")
    done
    [ ${#sweeps[@]} -gt 0 ] || { echo "no runs of $d in $out or $losses: skipped"; continue; }
    if [ "$d" = cifar10 ]; then
      # data.name=imagefolder of the committed runs reads the same tree the same way (recipe 14)
      same=(--same-data cifar10=imagefolder)
      pooled=("$res/cifar10_routers/pareto.json:dense,$tc,$ec"
              "$res/cifar10_scale_grid/pareto.json:$soft")
      title="CIFAR-10 (experiment=cifar10, 3 epochs)"
    else
      same=()
      pooled=("$res/tinyimagenet_routers/pareto.json:dense,$soft" "$res/tinyimagenet_routers2/pareto.json:$tc,$ec")
      title="Tiny-ImageNet-200 (experiment=tinyimagenet, 3 epochs)"
    fi
    # run dirs are not committed, their records are: the committed runs whose dirs are not on this machine
    # stay in as recorded; a run on disk replaces its record (and pooling refuses it if its result differs)
    carried=()
    [ -f "$res/modern_routers_$d/pareto.json" ] && carried=("$res/modern_routers_$d/pareto.json")
    "$python" "$here/pool_frontier.py" --out "$res/modern_routers_$d" --title "$title: today's LM routers, Soft MoE and dense" \
      "${same[@]}" "${carried[@]}" "${pooled[@]}" "${sweeps[@]}"  # (options before the files: argparse)
    "$python" "$here/compare_arms.py" "$res/modern_routers_$d/pareto.json" --reference "$tc" --reference "$soft"
    finished=()  # completed runs (one still training has no result.json yet; a preempted one says "preempted")
    for f in "$out/$d"/s*/[0-9]*_*/result.json "$losses/$d"/s*/[0-9]*_*/result.json; do
      [ -f "$f" ] && grep -q '"status": "completed"' "$f" && finished+=("$(dirname "$f")")
    done
    "$python" "$here/routing_diagnostics.py" "${finished[@]}" --json "$res/modern_routers_$d/routing_diagnostics.json" \
      --keep "$res/modern_routers_$d/routing_diagnostics.json" --labels "$res/modern_routers_$d/pareto.json" > /dev/null
  done
  ;;
*) echo "usage: $0 run CIFAR10_ROOT TINYIMAGENET_ROOT [LANES] | $0 report" >&2; exit 2 ;;
esac
