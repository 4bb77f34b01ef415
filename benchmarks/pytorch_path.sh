#!/usr/bin/env bash
# The PyTorch inference target (issue 5: >= 1.5x timm eager channels_last at batch 8) measured
# in several separate runs, because this host's page-fault cost, and with it the whole-batch
# candidates' speed, drifts from run to run. Behind the "PyTorch path" section of BENCHMARKS.md.
#   benchmarks/pytorch_path.sh [RUNS]   (default 3; about 3 minutes each)
# Writes pytorch-path-1..RUNS.json/.md over the committed ones in benchmarks/; BENCH_OUT=DIR
# writes them into DIR instead.
set -euo pipefail
source "$(dirname "$0")/common.sh"
out=$(results_folder)  # before the cd: BENCH_OUT is from the caller's folder
cd "$(dirname "$0")/.."
lock=/tmp/xception-heavy.lock
runs=${1-3}  # only a missing RUNS: an empty one (an unset variable) is refused
check_runs pytorch_path.sh "$runs"
stage_results  # the runs replace the last ones once all have succeeded
only=("timm eager channels_last" "xception folded channels_last" "optimize(backend='eager')"
      "optimize(backend='compile')" "optimize(backend='compile', slice_mib=None)")
for i in $(seq 1 "$runs"); do
    flock "$lock" .venv/bin/xception bench --size 299 --batch 8 --train-batch 0 --repeats 7 \
        --only "${only[@]}" --json "$stage/pytorch-path-$i.json" \
        --markdown "$stage/pytorch-path-$i.md"
done
publish_series pytorch-path "$runs"
