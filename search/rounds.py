"""A search in rounds: trials added to an experiment after it started (`tune --resume EXP
--add-trials N`).

Ray Tune cannot raise a finished experiment's `num_samples`, so each addition is a round of
its own: a Tune experiment of N trials beside the first (EXP/ray/tune-2/, tune-3/, ...), on the
same Optuna study, whose sampler sees every earlier trial, with the same config, trainable and
results store. Round 0 is the search as it started (`search.num_samples` trials, EXP/ray/tune/).

The added rounds are written to EXP/rounds.json before Ray starts, so a driver stopped at any
point goes on with a plain `--resume`: the newest round Tune saved is restored and finished,
and the rounds after it start. Budgets (`search.time_budget_s`, `search.max_trial_epochs`)
hold for each round.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from data_pipeline.atomic import atomic_file, writing
from data_pipeline.errors import MsaSearchError

from .config import ExperimentConfig
from .layout import Layout


@dataclass(frozen=True)
class Round:
    index: int  # 0: the search as it started
    trials: int

    @property
    def name(self) -> str:  # Ray Tune's experiment name (EXP/ray/NAME/)
        return Layout.tune_name(self.index)

    def sampler_seed(self, cfg: ExperimentConfig) -> int:
        """search.seed for round 0; each added round draws anew (the same seed would start a
        random sampler, or a model-based one's random start-up trials, on the same values)."""
        return cfg.search.seed + self.index


def search_rounds(layout: Layout, cfg: ExperimentConfig) -> list[Round]:
    """Round 0 (search.num_samples trials), then each round `--add-trials` recorded."""
    return [Round(0, cfg.search.num_samples)] + [Round(i, n) for i, n in enumerate(_added(layout), start=1)]


def check_can_add(layout: Layout, cfg: ExperimentConfig, trials: int) -> None:
    """Refuse `--add-trials` where trials cannot be added (before Ray starts)."""
    if trials < 1:
        raise MsaSearchError(f"--add-trials: expected a number of trials >= 1, found {trials}")
    if cfg.search.scheduler == "pbt":
        raise MsaSearchError(f"--add-trials: {layout.root} is a PBT search (search.scheduler: pbt), whose "
                             "population is fixed when it starts and has no study to sample more trials from; "
                             "start a new search with a larger search.num_samples instead")


def add_round(layout: Layout, cfg: ExperimentConfig, trials: int) -> Round:
    """Record a round of `trials` more trials (before Ray starts: a driver stopped after this
    runs them on `--resume`)."""
    check_can_add(layout, cfg, trials)
    added = [*_added(layout), trials]
    with writing(layout.rounds), atomic_file(layout.rounds, force=True) as tmp:
        tmp.write_text(json.dumps({"added_trials": added}, indent=2) + "\n")
    return Round(len(added), trials)


ENDED = ("TERMINATED", "ERROR")  # Tune's final trial states; errored ones are not retried on resume


def ended_results(layout: Layout, cfg: ExperimentConfig) -> list | None:
    """Tune's results of every round when all of them have ended (each made all its trials, and
    each of those terminated or errored: what `Tuner.restore` would find nothing to run in),
    read from Tune's saved state without Ray. None where a round is not over (a driver stopped
    it, one was recorded and never started, a budget ended it early) or its state cannot be read
    here: the resume then goes the usual way, with Ray."""
    from ray import tune

    results = []
    for round_ in search_rounds(layout, cfg):
        analysis = saved_analysis(layout, round_.index)
        if analysis is None or len(analysis.trials) < round_.trials or \
                any(t.status not in ENDED for t in analysis.trials):
            return None
        results += list(tune.ResultGrid(analysis))
    return results


def saved_analysis(layout: Layout, round_index: int = 0):
    """Tune's saved state of one round (a `tune.ExperimentAnalysis`), read without Ray; None
    where there is none yet or it cannot be read here (Tune itself says why on restore)."""
    from ray import tune

    from .storage import exists

    state = layout.tune_state(round_index)
    if not exists(state):
        return None
    try:
        return tune.ExperimentAnalysis(str(state))
    except Exception:  # noqa: BLE001 (unreadable here: Tune itself says why on restore)
        return None


def _added(layout: Layout) -> list[int]:
    if not layout.rounds.is_file():
        return []
    try:
        added = json.loads(layout.rounds.read_text())["added_trials"]
        if not all(isinstance(n, int) and n >= 1 for n in added):
            raise ValueError("expected a list of trial counts >= 1")
    except (ValueError, KeyError, TypeError) as exc:
        raise MsaSearchError(f"{layout.rounds}: cannot be read ({exc}); it lists the trials added to the search, "
                             "as {\"added_trials\": [N, ...]}") from None
    return added
