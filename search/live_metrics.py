"""Live robustness metrics: per-pattern results of running trials, published to Prometheus.

One Tune callback in the driver (DESIGN.md, "Live metrics"): trial actors never publish, an
actor killed right after a `set()` may never export it. The callback keeps the latest value
per (trial, split, pattern, metric) and sets `ray.util.metrics` gauges, which Ray's metrics
agent exports with a `ray_` prefix on each node's metrics port. Ray drops a gauge about 20 s
after its last set, so a thread re-sets every live trial's values every `REFRESH_S`; a
finished trial's gauges are left to expire (dashboards read them with `last_over_time`).

The gauges and their labels are search/gauges.py's (label values are strings; Ray adds
SessionName and JobId). Hyperparameters and epochs are never labels, and `metric` takes only the DESIGN metric names.
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Any

from ray import tune

from models.metrics import SIMS_METRIC_NAMES

from .config import ExperimentConfig
from .gauges import GAUGES
from .objective import OBJECTIVE, is_better
from .results import reported_results

REFRESH_S = 2.5  # well inside Ray's 20 s gauge expiry, and twice per 5 s as DESIGN asks
TRIAL_STATES = ("pending", "running", "paused", "terminated", "error")
METRIC_NAMES = frozenset(SIMS_METRIC_NAMES)  # every DESIGN metric name (SIMS adds acc3)


class LiveMetricsCallback(tune.Callback):
    """Publishes each reported epoch of every trial, and the experiment's state, as gauges."""

    def __init__(self, experiment: str, cfg: ExperimentConfig, earlier_best: float | None = None,
                 earlier_states: dict[str, int] | None = None):
        """earlier_best, earlier_states: the best objective and the trials by state of the
        search's earlier rounds (search/rounds.py), which this round's Tune does not know: the
        experiment's gauges count them too."""
        self.experiment, self.model = experiment, cfg.model.name
        self.earlier_best, self.earlier_states = earlier_best, dict(earlier_states or {})
        self.mode = cfg.search.mode
        searched = set(cfg.search.objective_patterns or ())
        self.roles = {p: ("searched" if p in searched else "held_out") for p in cfg.missing.eval_grid}
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, list[tuple[Any, float, dict[str, str]]]] = {}  # trial -> its gauge sets
        self._states: Counter = Counter()
        self._best: float | None = getattr(self, "earlier_best", None)
        self._gauges: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Ray pickles the run config's callbacks into the experiment state (Tuner.restore reads
    # them back): locks, threads and gauges are made again in the restored driver.
    def __getstate__(self) -> dict:
        return {k: self.__dict__.get(k) for k in ("experiment", "model", "mode", "roles", "earlier_best",
                                                  "earlier_states")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # Tune saves get_state() with each experiment snapshot and hands it to set_state() on
    # `--resume`: the best so far then stays the experiment's, not the resumed driver's alone.
    def get_state(self) -> dict:
        with self._lock:
            return {"best": self._best}

    def set_state(self, state: dict) -> None:
        with self._lock:
            self._best = state.get("best")

    def setup(self, **info) -> None:
        self._start()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "rows" not in result:
            return
        self._start()
        base = {"experiment": self.experiment, "trial": trial.trial_id, "model": self.model}
        g = self._gauges
        sets = [(g["msa_trial_epoch"], float(result["epoch"]), base)]
        objective = result.get(OBJECTIVE)
        if objective is not None and math.isfinite(objective):
            sets.append((g["msa_trial_objective"], float(objective), base))
        for split, patterns in reported_results(result).items():
            for pattern, metrics in patterns.items():
                for metric, value in metrics.items():
                    if metric in METRIC_NAMES and value is not None and math.isfinite(value):
                        sets.append((g["msa_pattern_metric"], float(value),
                                     {**base, "split": split, "pattern": pattern, "metric": metric}))
        with self._lock:
            self._live[trial.trial_id] = sets
            if objective is not None and math.isfinite(objective) and (
                    self._best is None or is_better(objective, self._best, self.mode)):
                self._best = float(objective)
            self._states = _by_state(trials)
        self._publish()

    def on_step_end(self, iteration, trials, **info) -> None:
        with self._lock:
            self._states = _by_state(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._retire(trial, trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._retire(trial, trials)

    def on_experiment_end(self, trials, **info) -> None:
        with self._lock:
            self._states = _by_state(trials)
        self._publish()  # the final state, once more before the driver goes
        self._stop.set()

    def _retire(self, trial, trials) -> None:
        """A finished trial's values are set once more, then left to expire."""
        self._publish()
        with self._lock:
            self._live.pop(trial.trial_id, None)
            self._states = _by_state(trials)

    def _start(self) -> None:
        if self._gauges is None:
            self._gauges = _gauges()
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh, name="msa-live-metrics", daemon=True)
            self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self._publish()

    def _publish(self) -> None:
        if self._gauges is None:
            return
        g, exp = self._gauges, {"experiment": self.experiment, "model": self.model}
        with self._lock:
            sets = [s for trial_sets in self._live.values() for s in trial_sets]
            states, best = self.trial_counts(), self._best
        for gauge, value, tags in sets:
            gauge.set(value, tags=tags)
        for state in TRIAL_STATES:
            g["msa_trials"].set(float(states.get(state, 0)), tags={**exp, "state": state})
        if best is not None:
            g["msa_best_objective"].set(best, tags=exp)
        for pattern, role in self.roles.items():
            g["msa_objective_pattern"].set(1.0, tags={**exp, "pattern": pattern, "role": role})

    def trial_counts(self) -> dict[str, int]:
        """The experiment's trials by state: this round's, as Tune has them, and earlier rounds'."""
        return dict(self._states + Counter(getattr(self, "earlier_states", None) or {}))


def _gauges() -> dict[str, Any]:
    from ray.util.metrics import Gauge

    return {name: Gauge(name, description, tag_keys=labels)
            for name, (labels, description) in GAUGES.items()}


def _by_state(trials) -> Counter:
    """Trials by their Tune status, lower-case (pending, running, paused, terminated, error)."""
    return Counter(str(t.status).lower() for t in trials)
