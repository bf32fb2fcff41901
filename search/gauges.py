"""The live-metrics contract (DESIGN.md, "Live metrics"): gauge names and their labels.

search/live_metrics.py publishes these through `ray.util.metrics`; Ray's exporter adds the
`ray_` prefix (and SessionName, JobId labels), which is what search/dashboards.py queries.
"""
from __future__ import annotations

RAY_PREFIX = "ray_"

TRIAL_LABELS = ("experiment", "trial", "model")
EXPERIMENT_LABELS = ("experiment", "model")

# name -> (labels, description)
GAUGES: dict[str, tuple[tuple[str, ...], str]] = {
    "msa_pattern_metric": ((*TRIAL_LABELS, "split", "pattern", "metric"),
                           "A trial's latest metric on one missing pattern and split"),
    "msa_trial_objective": (TRIAL_LABELS, "A trial's latest search objective (valid split)"),
    "msa_trial_epoch": (TRIAL_LABELS, "A trial's latest finished epoch (0-based)"),
    "msa_best_objective": (EXPERIMENT_LABELS, "The best search objective so far"),
    "msa_trials": ((*EXPERIMENT_LABELS, "state"), "Trials by state"),
    "msa_objective_pattern": ((*EXPERIMENT_LABELS, "pattern", "role"),
                              "1 per evaluated pattern; role: searched or held_out"),
}


def prometheus_name(gauge: str) -> str:
    """The name Prometheus stores a gauge under."""
    if gauge not in GAUGES:
        raise KeyError(f"unknown gauge {gauge}; known: {', '.join(GAUGES)}")
    return RAY_PREFIX + gauge
