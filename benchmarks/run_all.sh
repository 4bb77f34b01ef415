#!/usr/bin/env bash
# Full speed benchmarks behind benchmarks/BENCHMARKS.md. Minutes of CPU: run on an otherwise idle
# machine; the shared lock keeps other heavy jobs of this project from overlapping.
#   benchmarks/run_all.sh [RUN_FOLDER]   RUN_FOLDER: a `xception train --recipe fashion-mnist` run
# Writes machine.txt, bench-299.txt/.json/.md (and int8-agreement.json) over the committed ones in
# benchmarks/; BENCH_OUT=DIR writes them into DIR instead.
set -euo pipefail
source "$(dirname "$0")/common.sh"
out=$(results_folder)  # before the cd: BENCH_OUT is from the caller's folder
run=${1:+$(realpath -e "$1")}  # a missing RUN_FOLDER fails here, not after the bench
cd "$(dirname "$0")/.."
lock=/tmp/xception-heavy.lock
# machine.txt and the bench's files replace the last good ones once the bench has succeeded.
stage_results
{
    lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|L2|L3"
    grep -m2 -E "^cpu family|^model\s" /proc/cpuinfo
    # The instruction sets that pick the kernels (MKL, oneDNN, MLAS): AVX-512, VNNI, bf16.
    echo "ISA: $(grep -m1 -o -w -E 'avx2|fma|avx512f|avx512_vnni|avx512_bf16|avx_vnni|amx_tile' \
        /proc/cpuinfo | sort -u | tr '\n' ' ')"
} > "$stage/machine.txt"
# Inference at batch 1 and 8, training at batch 8, 299x299, every candidate, interleaved.
flock "$lock" .venv/bin/xception bench --size 299 --batch 1 8 --train-batch 8 --repeats 7 \
    --json "$stage/bench-299.json" --markdown "$stage/bench-299.md" | tee "$stage/bench-299.txt"
publish_results
# Int8 accuracy: top-1 agreement with fp32 on the Fashion-MNIST test set.
if [[ -n $run ]]; then
    flock "$lock" .venv/bin/python benchmarks/int8_agreement.py "$run" \
        --json "$out/int8-agreement.json"
fi
