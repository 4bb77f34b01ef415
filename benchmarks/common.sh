# Shared by the benchmark scripts, sourced before they change folder:
#   out=$(results_folder)   where results go: BENCH_OUT=DIR (from the caller's folder), else
#                           benchmarks/ itself, over the committed files; created, absolute.
#   check_runs NAME RUNS    exits 2 unless RUNS is a number of runs (1 or more).
#   stage_results           (after out=...) sets $stage, a new folder in $out for the run's
#                           files, removed at exit; publish_results moves them into $out. So an
#                           interrupted or failed run (a candidate's error row: exit 1) leaves
#                           the last good set in $out, not some files of each run.
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
