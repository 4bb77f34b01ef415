"""The comparisons of several `xception bench` JSON files side by side: for each, the per-run
ratio (per round, median; the ratio of the medians in brackets) and the median over the runs
of the lower of the two, the reading a target is held to (as in `Comparison.met`).

    python benchmarks/targets_summary.py benchmarks/targets-*.json
"""

import json
import statistics
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys: dict[tuple, dict] = {}
    for run in runs:
        for c in run.get("comparisons", []):
            keys.setdefault((c["task"], c["batch"], c["what"]), c)
    print(f"runs: {', '.join(paths)}\n")
    header = ["task", "batch", "comparison", *[f"run {i + 1}" for i in range(len(runs))],
              "median of runs", "target"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for (task, batch, what), first in keys.items():
        cells, paired = [], []
        for run in runs:
            c = next((c for c in run.get("comparisons", [])
                      if (c["task"], c["batch"], c["what"]) == (task, batch, what)), None)  # fmt: skip
            if c is None:
                cells.append("-")
                continue
            paired.append(min(c["paired_ratio"], c["ratio"]))
            cells.append(f"{c['paired_ratio']:.3f} ({c['ratio']:.3f})")
        med = statistics.median(paired) if paired else None
        target = first.get("target")
        verdict = "-" if target is None or med is None else (
            f">= {target:.2f}: {'met' if med >= target else 'not met'}")  # fmt: skip
        print(f"| {task} | {batch} | {what} | " + " | ".join(cells)
              + f" | {'-' if med is None else f'{med:.3f}'} | {verdict} |")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
