# Shared by the benchmark scripts, sourced before they change folder:
#   out=$(results_folder)   where results go: BENCH_OUT=DIR (from the caller's folder), else
#                           benchmarks/ itself, over the committed files; created, absolute.
#   check_runs NAME RUNS    exits 2 unless RUNS is a number of runs (1 or more).
#   stage_results           (after out=...) sets $stage, a new folder in $out for the run's
#                           files, removed at exit; publish_results moves them into $out. So an
#                           interrupted or failed run (a candidate's error row: exit 1) leaves
#                           the last good set in $out, not some files of each run.
#   publish_series PREFIX RUNS  publish_results, after drop_stale_series PREFIX RUNS removes an
#                           earlier, longer series' PREFIX-N.json/.md for N > RUNS: the series
#                           replaces the last one whole.
results_folder() {
    local out
    out=$(realpath -m "${BENCH_OUT:-$(dirname "${BASH_SOURCE[0]}")}")
    mkdir -p "$out" && echo "$out"  # a folder it cannot create fails the caller's $(...)
}

check_runs() {
    if ! [[ $2 =~ ^[1-9][0-9]*$ ]]; then
        echo "$1: RUNS is a number of runs (1 or more), not '$2'" >&2
        exit 2
    fi
}

stage_results() {
    stage=$(mktemp -d "$out/.partial.XXXXXX")  # in $out: its files are renamed into place
    trap 'rm -rf "$stage"' EXIT
}

publish_results() {
    mv -f "$stage"/* "$out"/
}

drop_stale_series() {
    local prefix=$1 runs=$2 file n
    for file in "$out/$prefix"-*.json "$out/$prefix"-*.md; do
        n=${file##*/"$prefix"-}
        n=${n%.*}
        if [[ $n =~ ^[0-9]+$ ]] && ((10#$n > runs)); then
            rm -f -- "$file"
        fi
    done
}

publish_series() {
    drop_stale_series "$1" "$2"
    publish_results
}
