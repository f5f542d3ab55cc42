#!/usr/bin/env bash
# Runs experiments one after another (never two at once: the machine is shared) and records
# each run's wall-clock seconds in runs/<name>/wall_s.txt.
# Usage: bash experiments/run_queue.sh "omniglot:5w1s_protonets omniglot_5w1s_protonets" ...
# (each argument: CONFIG WORKDIR_NAME [--set KEY=VALUE ...]).
set -euo pipefail
cd "$(dirname "$0")/.."
# metajax reads data folders from these variables; default: the project's copy.
export METAJAX_OMNIGLOT_DIR="${METAJAX_OMNIGLOT_DIR:-${PWD}/../shared/data/omniglot}"
export METAJAX_FEWREL_DIR="${METAJAX_FEWREL_DIR:-${PWD}/../shared/data/fewrel}"
export METAJAX_MOVIETWEETINGS_DIR="${METAJAX_MOVIETWEETINGS_DIR:-${PWD}/../shared/data/movietweetings}"
for job in "$@"; do
  read -r spec name rest <<< "${job}"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  .venv/bin/metajax train "${spec}" --workdir "runs/${name}" --no-progress ${rest} \
    || echo "FAILED ${spec}"
  echo "$(date +%s.%N) - ${start}" | bc > "runs/${name}/wall_s.txt"
done
