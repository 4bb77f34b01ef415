#!/usr/bin/env bash
# The PyTorch inference target (issue 5: >= 1.5x timm eager channels_last at batch 8) measured
# in several separate runs, because this host's page-fault cost, and with it the whole-batch
# candidates' speed, drifts from run to run. Behind the "PyTorch path" section of BENCHMARKS.md.
#   benchmarks/pytorch_path.sh [RUNS]   (default 3; about 3 minutes each)
set -euo pipefail
cd "$(dirname "$0")/.."
lock=/tmp/xception-heavy.lock
only=("timm eager channels_last" "xception folded channels_last" "optimize(backend='eager')"
      "optimize(backend='compile')" "optimize(backend='compile', slice_mib=None)")
for i in $(seq 1 "${1:-3}"); do
    flock "$lock" .venv/bin/xception bench --size 299 --batch 8 --train-batch 0 --repeats 7 \
        --only "${only[@]}" --json "benchmarks/pytorch-path-$i.json" \
        --markdown "benchmarks/pytorch-path-$i.md"
done
