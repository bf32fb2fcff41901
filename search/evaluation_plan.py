"""Which epochs evaluate the test grid (`train.eval_test`).

The objective reads the valid grid, so every epoch evaluates it; the test grid is for reports
and costs as much again (more: MOSI's test split is three times its valid split). Policies:

- `every`: after each epoch;
- `improved`: after each epoch that improves the trial's best objective (in a multi-objective
  search, any of them), and after each epoch where the trial may end;
- `end`: only after each epoch where the trial may end;
- `deferred` (a search's trials): only after the last epoch (`train.epochs`). A trial that
  stops before it (ASHA, a budget) has no test rows while the search runs; after it, the
  best `search.test_top` of those get theirs from their last checkpoint
  (search/deferred_test.py). Under ASHA most trials stop at a rung, and the test grid costs
  about as much as an epoch's training, so this is the cheapest search that still shows the
  test numbers of the trials that matter. In `train` it is `end`.

A trial may end after its last epoch and, under ASHA, after each rung's epoch: ASHA decides
after a report, so the trial cannot know which rung stops it. So the epoch `status`, `export`
and the report judge a trial at (its last) has test rows, and so does the epoch
`report --protocol paper` chooses (the best on valid), except for trials a time or
trial-epoch budget cut short. `auto` is `improved` for a search's trials and `every` for
`train`, whose runs the papers' protocols read at every epoch.
"""
from __future__ import annotations

import math

import numpy as np

from .config import ExperimentConfig
from .objective import PatternMetrics, is_better, objective_mode, objective_value

def asha_milestones(max_t: int, grace_period: int, reduction_factor: float) -> list[float]:
    """The training iterations at which Ray's one-bracket ASHA, as search/strategy.py builds it
    (search.asha), may stop a trial: its rungs, ray.tune.schedulers.async_hyperband._Bracket,
    computed the same way."""
    rungs = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return sorted(grace_period * reduction_factor ** k for k in range(rungs))


# Where each policy evaluates the test grid, as messages say it.
POLICY_EPOCHS = {"every": "after every epoch",
                 "improved": "after epochs that improve the trial's best objective and where it may end",
                 "end": "only where the trial may end (its last epoch, ASHA's rungs)",
                 "deferred": "after the last epoch, and after the search for the best search.test_top "
                             "trials that stopped before it"}


def resolved_policy(cfg: ExperimentConfig, in_search: bool) -> str:
    """`train.eval_test` with auto resolved."""
    if cfg.train.eval_test == "deferred" and not in_search:
        return "end"  # a run's own last epoch: nothing to defer to
    if cfg.train.eval_test != "auto":
        return cfg.train.eval_test
    return "improved" if in_search else "every"


def ending_epochs(cfg: ExperimentConfig, in_search: bool) -> frozenset[int]:
    """The 0-based epochs after which the run may end: its last, and ASHA's rungs in a search
    (epoch e is reported as training iteration e + 1)."""
    last = cfg.train.epochs - 1
    if not (in_search and cfg.search.scheduler == "asha"):
        return frozenset({last})
    asha = cfg.search.asha
    rungs = asha_milestones(cfg.train.epochs, asha.grace_period, asha.reduction_factor)
    # ASHA judges a trial at its first report at or past a rung (a rung may be fractional).
    return frozenset({last, *(math.ceil(m) - 1 for m in rungs if m <= cfg.train.epochs)})


class TestGridPlan:
    """Decides, epoch by epoch, whether the test grid is evaluated. `best` (the trial's best
    objectives so far, None before its first epoch) travels in checkpoints, so a restored trial
    decides as one that never stopped."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, cfg: ExperimentConfig, in_search: bool, best: list[float] | None = None):
        self.policy = resolved_policy(cfg, in_search)
        # deferred: the last epoch only (a trial stopped earlier is evaluated after the search).
        self.ending = frozenset({cfg.train.epochs - 1}) if self.policy == "deferred" else ending_epochs(cfg, in_search)
        self.objectives = cfg.search.objectives or [cfg.search.objective]
        self.patterns = cfg.search.objective_patterns
        self.best = best

    def due(self, epoch: int, valid: PatternMetrics) -> bool:
        """Whether epoch `epoch`, whose valid results are `valid`, evaluates the test grid;
        records its objectives. A NaN objective never improves."""
        values = [objective_value(valid, name, self.patterns) for name in self.objectives]
        if self.best is None:
            improved = [not math.isnan(v) for v in values]
            self.best = values
        else:
            improved = [not math.isnan(v) and (math.isnan(b) or is_better(v, b, objective_mode(name)))
                        for v, b, name in zip(values, self.best, self.objectives)]
            self.best = [v if up else b for v, b, up in zip(values, self.best, improved)]
        if self.policy == "every" or epoch in self.ending:
            return True
        return self.policy == "improved" and any(improved)
