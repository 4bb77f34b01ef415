#!/usr/bin/env bash
# The speed targets (issue 5) judged over several separate runs: every candidate at batch 8
# (inference and a training step), 299x299, 7 interleaved rounds, one process per run, because
# this host's page-fault cost, and with it the peers' speed, drifts from run to run. Each run's
# comparisons are in its JSON; targets_summary.py puts them side by side with their medians.
#   benchmarks/targets.sh [RUNS]   (default 5; about 5 minutes each)
# Writes targets-1..RUNS.json/.md and targets.md over the committed ones in benchmarks/;
# BENCH_OUT=DIR writes them into DIR instead.
set -euo pipefail
source "$(dirname "$0")/common.sh"
out=$(results_folder)  # before the cd: BENCH_OUT is from the caller's folder
cd "$(dirname "$0")/.."
lock=/tmp/xception-heavy.lock
runs=${1-5}  # only a missing RUNS: an empty one (an unset variable) is refused
check_runs targets.sh "$runs"
stage_results  # the series replaces the last one whole, once every run has succeeded
files=()
for i in $(seq 1 "$runs"); do
    flock "$lock" .venv/bin/xception bench --size 299 --batch 8 --train-batch 8 --repeats 7 \
        --json "$stage/targets-$i.json" --markdown "$stage/targets-$i.md"
    files+=("$out/targets-$i.json")
done
publish_series targets "$runs"
# These runs only: a shorter series must not summarise an earlier series' targets-N.json with it.
.venv/bin/python benchmarks/targets_summary.py "${files[@]}" > "$stage/targets.md"
cat "$stage/targets.md"
publish_results
