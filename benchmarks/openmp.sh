#!/usr/bin/env bash
# Do GNU OpenMP's settings move the PyTorch inference target (issue 5: >= 1.5x timm eager
# channels_last at batch 8)? Our compiled optimize() makes about 420 op calls per batch-8
# pass against timm's 168, so thread hand-offs might weigh more on ours. Runs the two
# candidates with torch's defaults, with threads bound to cores, and with threads that spin
# instead of sleeping, alternating, RUNS times. Behind the "OpenMP's thread settings" section of
# BENCHMARKS.md.
#   benchmarks/openmp.sh [RUNS]   (default 2; about a minute per bench)
#   python benchmarks/targets_summary.py benchmarks/openmp-*.json
# Writes openmp-SETTING-1..RUNS.json over the committed ones in benchmarks/; BENCH_OUT=DIR
# writes them into DIR instead.
set -euo pipefail
source "$(dirname "$0")/common.sh"
out=$(results_folder)  # before the cd: BENCH_OUT is from the caller's folder
cd "$(dirname "$0")/.."
lock=/tmp/xception-heavy.lock
runs=${1-2}  # only a missing RUNS: an empty one (an unset variable) is refused
check_runs openmp.sh "$runs"
stage_results  # the runs replace the last ones once all have succeeded
declare -A settings=(
    [default]=""
    [bind]="OMP_PROC_BIND=close OMP_PLACES=cores"
    [spin]="OMP_WAIT_POLICY=active"
)
for i in $(seq 1 "$runs"); do
    for name in default bind spin; do
        # shellcheck disable=SC2086  # the settings are words on purpose
        flock "$lock" env ${settings[$name]} .venv/bin/xception bench --size 299 --batch 8 \
            --train-batch 0 --repeats 7 \
            --only "optimize(backend='compile')" "timm eager channels_last" \
            --json "$stage/openmp-$name-$i.json"
    done
done
for name in default bind spin; do
    drop_stale_series "openmp-$name" "$runs"
done
publish_results
