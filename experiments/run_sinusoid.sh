#!/usr/bin/env bash
# Runs every sinusoid experiment of experiments/RESULTS.md, one process at a time, and records
# each run's wall-clock time in runs/<name>/wall_s.txt. Usage: bash experiments/run_sinusoid.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for k in 5 10 20; do
  for algo in maml fomaml reptile pretrain; do
    name="sinusoid_k${k}_${algo}"
    start=$(date +%s.%N)
    .venv/bin/metajax train "sinusoid:k${k}_${algo}" --workdir "runs/${name}" --no-progress "$@"
    echo "$(date +%s.%N) - ${start}" | bc > "runs/${name}/wall_s.txt"
  done
done
