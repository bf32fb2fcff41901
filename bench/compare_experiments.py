"""Compare two experiments' results trial by trial: are the metrics identical?

Trials are matched by their sampled parameters (trial ids are random), then every
(epoch, split, pattern) metric is compared. Also compares the metric header of the two
`export` files when given. Used to show that a refactoring changed no number:

    python bench/compare_experiments.py EXP_BEFORE EXP_AFTER [--best BEFORE.yaml AFTER.yaml]

Prints name=value lines; exits 1 when anything differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.metrics import SIMS_METRIC_NAMES  # noqa: E402
from search.results import ResultsStore  # noqa: E402

KEY = ["epoch", "split", "pattern"]


def by_params(exp: Path) -> dict[str, pd.DataFrame]:
    df = ResultsStore(exp / "results").read()
    metrics = [m for m in SIMS_METRIC_NAMES if m in df.columns]
    out = {}
    for trial_id, rows in df.groupby("trial_id"):
        params = json.loads((exp / "trial_params" / f"{trial_id}.json").read_text())
        out[json.dumps(params, sort_keys=True)] = rows.sort_values(KEY).set_index(KEY)[metrics]
    return out


def metric_lines(best: Path) -> list[str]:
    """The export header's metric lines (without the trial id and path)."""
    return [line for line in best.read_text().splitlines() if line.startswith(("#  ", "# objective"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--best", nargs=2, type=Path, metavar=("BEFORE_YAML", "AFTER_YAML"))
    args = parser.parse_args()
    a, b = by_params(args.before), by_params(args.after)
    common = sorted(set(a) & set(b))
    max_diff, rows_compared, shape_mismatch = 0.0, 0, 0
    for key in common:
        if not a[key].index.equals(b[key].index):
            shape_mismatch += 1  # e.g. ASHA stopped the trial at another epoch
            joined = a[key].merge(b[key], left_index=True, right_index=True, suffixes=("", "_after"))
            left, right = joined[a[key].columns], joined[[c + "_after" for c in a[key].columns]]
        else:
            left, right = a[key], b[key]
        diff = np.abs(left.to_numpy(float) - right.to_numpy(float))
        max_diff = max(max_diff, float(np.nanmax(diff)) if diff.size else 0.0)
        if not np.array_equal(np.isnan(left.to_numpy(float)), np.isnan(right.to_numpy(float))):
            max_diff = float("inf")
        rows_compared += len(left)
    print(f"trials_before={len(a)} trials_after={len(b)} trials_matched={len(common)}")
    print(f"rows_compared={rows_compared} trials_with_other_epochs={shape_mismatch} max_abs_diff={max_diff:g}")
    same = len(common) == len(a) == len(b) and max_diff == 0.0 and shape_mismatch == 0
    if args.best:
        header_same = metric_lines(args.best[0]) == metric_lines(args.best[1])
        print(f"export_metric_lines={len(metric_lines(args.best[0]))} export_identical={header_same}")
        same = same and header_same
    print(f"identical={same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
