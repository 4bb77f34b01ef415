"""The comparisons of several `xception bench` JSON files side by side: for each, the per-run
ratio (per round, median; the ratio of the medians in brackets) and the median over the runs
of the lower of the two, the reading a target is held to (`Comparison.lower_ratio`).

    python benchmarks/targets_summary.py benchmarks/targets-*.json
"""

import dataclasses
import json
import statistics
import sys
from pathlib import Path

from xception.bench import Comparison, markdown_table

FIELDS = {f.name for f in dataclasses.fields(Comparison)}


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
    print(f"runs: {', '.join(sys.argv[1:])}\n")
    print(summary(runs), end="")
