"""The search objective (DESIGN.md, "Missing patterns" and "Metrics").

An objective is computed from one split's results, a mapping pattern name -> metrics, over
the patterns the search may look at (`search.objective_patterns`: by default the evaluation
grid minus the held-out patterns, whose test numbers then show whether the search overfit).
Names: `robust_f1` (mean f1_non0), `worst_f1` (min f1_non0), `<metric>` (its mean) or
`<metric>@<pattern>` (its value on one pattern, which need not be an objective pattern).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from data_pipeline.missing import parse_pattern
from models.metrics import robust_f1, worst_f1

# Patterns held out of the search objective: the report shows whether the search overfit.
HELD_OUT_PATTERNS = ("intra:0.9", "inter:L+V")
# The key under which a run reports its objective (to Ray Train and Tune), and the prefix of
# each objective of a multi-objective search ("objective/<name>").
OBJECTIVE = "objective"
AGGREGATES = ("robust_f1", "worst_f1")

# One split's results: pattern name -> metric name -> value, in grid order (search/evaluate.py).
PatternMetrics = dict[str, dict[str, float]]


def held_out_patterns(grid: Sequence[str], objective_patterns: Sequence[str]) -> list[str]:
    """Grid patterns the objective never saw: the fixed held-out ones and any left out of
    search.objective_patterns. Their test numbers show whether the search overfit."""
    return [p for p in grid if p in HELD_OUT_PATTERNS or p not in objective_patterns]


def default_objective_patterns(grid: Sequence[str]) -> list[str]:
    """The evaluation grid minus the held-out patterns (the whole grid if that leaves none)."""
    return [p for p in grid if p not in HELD_OUT_PATTERNS] or list(grid)


def check_objective(name: str, metrics: Sequence[str], grid: Sequence[str]) -> None:
    """ValueError (naming what is allowed) unless `name` is an objective over `metrics` whose
    pattern, if any, is evaluated (in `grid`)."""
    if name in AGGREGATES:
        return
    metric, at, pattern = name.partition("@")
    if metric not in metrics:
        raise ValueError(f"unknown objective '{name}'; allowed: {', '.join(AGGREGATES)}, a metric "
                         f"({', '.join(metrics)}) or <metric>@<pattern>, e.g. f1_non0@intra:0.0")
    if at:
        canonical = parse_pattern(pattern).name  # a malformed pattern names itself
        if canonical not in grid:
            raise ValueError(f"objective '{name}': pattern '{pattern}' is not evaluated; "
                             f"missing.eval_grid has {', '.join(grid)}")


def objective_mode(name: str) -> str:
    """Lower is better only for the error metric."""
    return "min" if name.partition("@")[0] == "mae" else "max"


def is_better(value: float, than: float, mode: str) -> bool:
    """Whether objective `value` beats `than` under `mode` (max or min)."""
    return value > than if mode == "max" else value < than


def objective_value(by_pattern: PatternMetrics, name: str, patterns: Sequence[str]) -> float:
    """The objective `name` of one split's results over `patterns`."""
    if name == "robust_f1":
        return robust_f1(by_pattern, patterns)
    if name == "worst_f1":
        return worst_f1(by_pattern, patterns)
    metric, _, pattern = name.partition("@")
    if pattern:
        return float(by_pattern[parse_pattern(pattern).name][metric])
    return float(np.mean([by_pattern[p][metric] for p in patterns]))


def pareto_front(scores: Mapping[str, Sequence[float]], modes: Sequence[str]) -> list[str]:
    """Keys whose objective vectors no other key dominates (at least as good on all, better on one)."""
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    vec = {k: [s * v for s, v in zip(sign, values)] for k, values in scores.items()}

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [k for k in vec if not any(dominates(vec[o], vec[k]) for o in vec if o != k)]
