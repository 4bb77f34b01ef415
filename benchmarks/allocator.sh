#!/usr/bin/env bash
# What glibc's allocator costs each PyTorch path: the same candidates, batch 8 at 299x299, run
# twice in fresh processes, once as shipped and once with glibc told never to hand freed
# memory back (no mmap for big blocks, no heap trimming), so that no activation page-faults.
# Behind the "allocator" section of benchmarks/BENCHMARKS.md.
#   benchmarks/allocator.sh
# Writes allocator-default/-tunables.json/.md over the committed ones in benchmarks/;
# BENCH_OUT=DIR writes them into DIR instead.
set -euo pipefail
source "$(dirname "$0")/common.sh"
out=$(results_folder)  # before the cd: BENCH_OUT is from the caller's folder
cd "$(dirname "$0")/.."
lock=/tmp/xception-heavy.lock
only=("timm eager channels_last" "xception folded channels_last" "optimize(backend='eager')"
      "optimize(backend='compile')" "train channels_last")
stage_results  # both runs replace the last two once both have succeeded
run() {
    flock "$lock" .venv/bin/xception bench --size 299 --batch 8 --train-batch 8 --repeats 5 \
        --only "${only[@]}" --json "$stage/allocator-$1.json" --markdown "$stage/allocator-$1.md"
}
run default
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 run tunables
publish_results
