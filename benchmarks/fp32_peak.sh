#!/usr/bin/env bash
# This CPU's fp32 ceilings (benchmarks/fp32_peak.c): the FMA units' rate on registers alone,
# and a register-blocked matrix-multiply kernel on L1-resident data. Behind the "ceilings"
# section of BENCHMARKS.md. Needs a C compiler (gcc or cc); writes benchmarks/fp32-peak.txt over
# the committed one, or DIR/fp32-peak.txt with BENCH_OUT=DIR.
#   benchmarks/fp32_peak.sh [THREADS]   (default: the machine's core count)
set -euo pipefail
source "$(dirname "$0")/common.sh"
out=$(results_folder)  # before the cd: BENCH_OUT is from the caller's folder
cd "$(dirname "$0")"
cc=$(command -v gcc || command -v cc || true)
if [ -z "$cc" ]; then
    echo "fp32_peak.sh: no C compiler found; install gcc (Debian: apt-get install gcc)" >&2
    exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin=$tmp/fp32_peak
"$cc" -O2 -march=native -pthread fp32_peak.c -o "$bin"
threads=${1:-$(nproc)}
# The report goes to a temporary file first: a failed run leaves the last good one in place.
{
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $("$cc" --version | head -n1)"
    grep -m1 'model name' /proc/cpuinfo || true
    flock /tmp/xception-heavy.lock "$bin" "$threads"
} | tee "$tmp/fp32-peak.txt"
cp "$tmp/fp32-peak.txt" "$out/fp32-peak.txt"
