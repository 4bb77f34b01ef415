"""The comparisons of several `xception bench` JSON files side by side: for each, the per-run
ratio (per round, median; the ratio of the medians in brackets) and the median over the runs
of the lower of the two, the reading a target is held to (`Comparison.lower_ratio`).

    python benchmarks/targets_summary.py benchmarks/targets-[0-9]*.json

The runs must be one series: the same machine (CPU, threads, device) and the same model and
size. Runs of different machines or settings are refused rather than put under one median.
"""

import dataclasses
import json
import statistics
import sys
from pathlib import Path

from xception.bench import Comparison, markdown_table

FIELDS = {f.name for f in dataclasses.fields(Comparison)}
# What a run's ratios depend on besides the code: runs that differ in one are no series.
SETUP = {"machine": ("cpu", "cpu_count", "torch_threads", "device", "gpu"),
         "settings": ("size", "quick", "model")}  # fmt: skip


def setup(run: dict) -> dict:
    """The machine and settings of a bench report that its comparisons depend on."""
    return {key: (run.get(part) or {}).get(key) for part, keys in SETUP.items() for key in keys}


def check_one_series(paths: list[str], runs: list[dict]) -> None:
    """SystemExit with one line when the runs were not measured alike (the docstring's own
    `targets-*.json` once took the Zen 3 runs and the Zen 4 runs under one median)."""
    first = setup(runs[0])
    for path, run in zip(paths[1:], runs[1:], strict=True):
        differ = [f"{k} {first[k]!r} against {v!r}" for k, v in setup(run).items() if v != first[k]]
        if differ:
            sys.exit(f"targets_summary.py: {paths[0]} and {path} were not measured alike "
                     f"({'; '.join(differ)}): summarise one machine's runs with the same "
                     "settings at a time")  # fmt: skip


def summary(runs: list[dict]) -> str:
    """The Markdown table for `runs` (bench JSON reports, in order)."""
    by_run = [{(c.task, c.batch, c.what): c
               for c in (Comparison(**{k: v for k, v in d.items() if k in FIELDS})
                         for d in run.get("comparisons", []))}
              for run in runs]  # fmt: skip
    keys = list(dict.fromkeys(key for run in by_run for key in run))
    header = ["task", "batch", "comparison", *[f"run {i + 1}" for i in range(len(runs))],
              "median of runs", "target"]  # fmt: skip
    rows = []
    for key in keys:
        found = [run.get(key) for run in by_run]
        cells = ["-" if c is None else f"{c.paired_ratio:.3f} ({c.ratio:.3f})" for c in found]
        lower = [c.lower_ratio for c in found if c is not None]
        med = statistics.median(lower)
        target = next(c for c in found if c is not None).target
        verdict = "-" if target is None else (
            f">= {target:.2f}: {'met' if med >= target else 'not met'}")  # fmt: skip
        rows.append([key[0], str(key[1]), key[2], *cells, f"{med:.3f}", verdict])
    return markdown_table(header, rows)


def load(path: str) -> dict:
    """The bench report in `path`; SystemExit with one line when it is not one."""
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        sys.exit(f"targets_summary.py: cannot read {path}: {err}")
    comparisons = run.get("comparisons") if isinstance(run, dict) else None
    if not isinstance(comparisons, list) or not all(
        isinstance(c, dict) and FIELDS - {"target"} <= c.keys() for c in comparisons
    ):
        sys.exit(f"targets_summary.py: {path} is not an `xception bench` JSON report with its "
                 "comparisons (reports written before bench recorded them have none)")  # fmt: skip
    return run


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    runs = [load(p) for p in sys.argv[1:]]
    check_one_series(sys.argv[1:], runs)
    print(f"runs: {', '.join(sys.argv[1:])}\n")
    print(summary(runs), end="")
