#!/usr/bin/env bash
# Run a queue of single-run sweeps in parallel lanes, resumably: the shared engine of the study scripts.
#
#   experiments/run_queue.sh OUT LANES < items
#
# Each input line is one run: `NAME SEED TAG OVERRIDES...`. It trains as
#   moebench train -m OVERRIDES seed=SEED threads=1 hydra.sweep.dir=OUT/NAME/sSEED
# logging to OUT/NAME.sSEED.TAG.log. LANES lanes of one thread each take lines from OUT/queue in
# order (OUT/taken records what a lane took), so the cores stay busy until the last run. Running
# the same items again resumes: moebench skips finished runs and resumes a preempted one from its
# checkpoint. Runs of one NAME and SEED share a sweep dir (moebench keeps concurrent launches apart).
set -euo pipefail
out=${1:?output dir, e.g. multirun/router_study}
lanes=${2:?number of parallel lanes}
moebench=${MOEBENCH:-moebench}
mkdir -p "$out"
grep -v '^[[:space:]]*$' > "$out/queue"
: > "$out/taken"
lane() {
  while true; do
    # under flock: a lane takes the first line no lane took yet
    item=$(flock "$out/queue" bash -c 'line=$(grep -vxFf "$0/taken" "$0/queue" | head -1 || true); [ -n "$line" ] && echo "$line" >> "$0/taken"; echo "$line"' "$out")
    [ -z "$item" ] && return 0
    read -r name seed tag overrides <<< "$item"
    echo "$(date -u +%H:%M:%S) lane $1 starts $name seed $seed $tag"
    # shellcheck disable=SC2086
    "$moebench" train -m $overrides seed="$seed" threads=1 hydra.sweep.dir="$out/$name/s$seed" \
      > "$out/$name.s$seed.$tag.log" 2>&1 || echo "$(date -u +%H:%M:%S) lane $1: $name seed $seed $tag exited $?"
    echo "$(date -u +%H:%M:%S) lane $1 ends $name seed $seed $tag"
  done
}
for i in $(seq 1 "$lanes"); do lane "$i" & done
wait
