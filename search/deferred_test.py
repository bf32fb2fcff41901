"""The deferred test grid (`train.eval_test: deferred`): evaluated after the search, for the
best trials that stopped before their last epoch.

Under ASHA most trials stop at a rung, and the test grid costs about as much as an epoch's
training (MOSI's test split is three times its valid split), while only the best trials'
test numbers are ever read. So a deferred search's trials evaluate it only after their last
epoch, and when the search ends this module evaluates it for the best `search.test_top`
trials (ranked as `status` ranks them: the objective at their last epoch) that lack it at
that epoch: from each trial's latest checkpoint (taken at every epoch by default), in a Ray
task with a trial's resources, the rows added to that epoch in the results store. A resumed
search does the same at its end and skips what has test rows, so nothing is evaluated twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .config import TRIAL_CONTEXT, ExperimentConfig
from .evaluation_plan import resolved_policy
from .export import score_trials
from .layout import Layout
from .objective import PatternMetrics
from .results import ResultsStore, RunInfo
from .shared_data import SharedSplits


@dataclass
class DeferredTests:
    evaluated: list[str] = field(default_factory=list)  # trial ids whose test grid was added
    skipped: list[str] = field(default_factory=list)  # "<trial id>: <why>", one per trial not evaluated


def lacking_test(layout: Layout, cfg: ExperimentConfig, df: pd.DataFrame, top: int) -> list[tuple[str, int]]:
    """(trial id, last epoch) of the best `top` trials whose last epoch has no test rows."""
    if df.empty or top == 0:
        return []
    tested = set(zip(df.trial_id[df.split == "test"].astype(str), df.epoch[df.split == "test"].astype(int)))
    return [(s.trial_id, s.epoch) for s in score_trials(layout, cfg, df)[:top] if (s.trial_id, s.epoch) not in tested]


def owed_tests(layout: Layout, cfg: ExperimentConfig) -> list[tuple[str, int]]:
    """(trial id, epoch) of the test grids evaluate_deferred_tests would evaluate now: none
    unless train.eval_test is deferred."""
    if resolved_policy(cfg, in_search=True) != "deferred":
        return []
    return lacking_test(layout, cfg, ResultsStore(layout.results).read(hparams=False), cfg.search.test_top)


def evaluate_deferred_tests(layout: Layout, cfg: ExperimentConfig, grid, data: SharedSplits,
                            resources: dict[str, float]) -> DeferredTests:
    """After a search (`grid`: Tune's results): the test grid of the best trials that lack it,
    written to the store. A trial that cannot be evaluated (no checkpoint, one of another epoch,
    a failing task) is skipped with its reason: the search's own results stand either way."""
    import ray

    outcome = DeferredTests()
    wanted = owed_tests(layout, cfg)
    if not wanted:
        return outcome
    store = ResultsStore(layout.results)
    results = {str((r.metrics or {}).get("trial_id")): r for r in grid}
    task = ray.remote(_test_grid).options(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu") or 0)
    base = cfg.model_dump(mode="json")
    pending = {}
    for trial_id, epoch in wanted:
        result = results.get(trial_id)
        if result is None or result.checkpoint is None:
            outcome.skipped.append(f"{trial_id}: no checkpoint")
            continue
        pending[trial_id] = (epoch, result.config, task.remote(base, result.config, result.checkpoint, data))
    for trial_id, (epoch, params, ref) in pending.items():
        try:
            saved_epoch, test = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 (any failure of one trial's evaluation: said, not fatal)
            outcome.skipped.append(f"{trial_id}: {str(exc).strip().splitlines()[-1]}")
            continue
        if saved_epoch != epoch:
            outcome.skipped.append(f"{trial_id}: its latest checkpoint is of epoch {saved_epoch}, not of its last "
                                   f"reported epoch {epoch} (train.checkpoint_every {cfg.train.checkpoint_every})")
            continue
        store.add_splits(RunInfo.of(layout.root.name, trial_id, cfg.with_params(params)), epoch, {"test": test})
        store.compact_trial(trial_id)
        outcome.evaluated.append(trial_id)
    return outcome


def _test_grid(base: dict, params: dict, checkpoint, data: SharedSplits) -> tuple[int, dict[str, PatternMetrics]]:
    """In a Ray task: the checkpointed model's test grid, and the epoch it was saved after."""
    import torch

    from data_pipeline.loader import stage_splits

    from .trainer import evaluate_epoch
    from .trials import trial_state, trial_threads

    cfg = ExperimentConfig.model_validate(base, context=TRIAL_CONTEXT).with_params(params)
    torch.set_num_threads(trial_threads(cfg))
    splits = data.load()
    state, device = trial_state(cfg, splits, checkpoint)
    test = stage_splits({"test": splits["test"]}, device)
    return state.epoch - 1, evaluate_epoch(state.model, cfg, test, device)["test"]
