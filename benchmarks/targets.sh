#!/usr/bin/env bash
# The speed targets (issue 5) judged over several separate runs: every candidate at batch 8
# (inference and a training step), 299x299, 7 interleaved rounds, one process per run, because
# this host's page-fault cost, and with it the peers' speed, drifts from run to run. Each run's
# comparisons are in its JSON; targets_summary.py puts them side by side with their medians.
#   benchmarks/targets.sh [RUNS]   (default 5; about 5 minutes each)
set -euo pipefail
cd "$(dirname "$0")/.."
lock=/tmp/xception-heavy.lock
runs=${1:-5}
for i in $(seq 1 "$runs"); do
    flock "$lock" .venv/bin/xception bench --size 299 --batch 8 --train-batch 8 --repeats 7 \
        --json "benchmarks/targets-$i.json" --markdown "benchmarks/targets-$i.md"
done
.venv/bin/python benchmarks/targets_summary.py benchmarks/targets-[0-9]*.json \
    | tee benchmarks/targets.md
