"""The tables `msa-search report` draws, read from an experiment (or `train` run) directory:
its results store, config, trial parameters and Optuna study (search/layout.py names them).

Every view judges a trial where it stopped (its last reported epoch): ASHA stops trials
early, and that is the state the search compared them in. search/report.py only draws.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from data_pipeline.errors import MsaSearchError
from models.metrics import SIMS_METRIC_NAMES
from models.space import Dist

from .config import ExperimentConfig
from .export import TrialScore, load_experiment, score_trials, stored_pattern_metrics, trial_states, tune_trial_states
from .layout import Layout
from .objective import held_out_patterns as objective_held_out
from .objective import objective_mode, objective_value, pareto_front
from .results import flatten
from .study import load_study, study_names, uses_study

if TYPE_CHECKING:
    import optuna

# Importance compares trials: fewer than two completed ones leave nothing to compare.
MIN_TRIALS_FOR_IMPORTANCE = 2


class NoResultsYet(MsaSearchError):
    """The directory is a run or experiment whose results store is still empty."""


class Unavailable(Exception):
    """A view's inputs are missing; the message (one line) says why, in the report."""


@dataclass
class ReportInputs:
    layout: Layout
    cfg: ExperimentConfig
    results: pd.DataFrame  # the results store, one row per (trial_id, epoch, split, pattern)
    scores: list[TrialScore]  # best first, by search.objective on valid
    metric: str  # what the curves, heat map and per-pattern importance show
    study: "optuna.Study | None"
    no_study: str  # why `study` is None ("" when there is one)
    states: dict[str, int]  # trials by state: the study's (PBT: Tune's saved state; a run: empty)

    @property
    def best(self) -> TrialScore:
        return self.scores[0]


def load_inputs(exp_dir: str | Path, metric: str = "f1_non0") -> ReportInputs:
    """Everything the report shows; MsaSearchError (one line) when `exp_dir` cannot be reported."""
    layout, cfg, df = load_experiment(exp_dir, hparams=False)  # configs: the params files
    if df.empty:
        raise NoResultsYet(f"{layout.root}: no results yet (nothing in {layout.results})")
    metrics = [m for m in SIMS_METRIC_NAMES if m in df.columns]
    if metric not in metrics:
        raise MsaSearchError(f"--metric {metric}: not in the results; choose one of {', '.join(metrics)}")
    if uses_study(cfg):
        study, no_study = _load_study(layout)
        states = trial_states(layout, study) if study is not None else {}
    else:
        study, no_study = None, "a PBT search (search.scheduler: pbt) samples without an Optuna study"
        states = tune_trial_states(layout) if layout.is_experiment else {}
    return ReportInputs(layout, cfg, df, score_trials(layout, cfg, df), metric, study, no_study, states)


def _load_study(layout: Layout) -> tuple["optuna.Study | None", str]:
    """The search's study, or None and why not. The study is named after the directory, so
    a renamed experiment falls back to the only study its database holds."""
    if not layout.has_study:
        return None, f"no Optuna study (no {layout.optuna_db.name}): a `msa-search train` run has none"
    with quiet_optuna():
        names = study_names(layout)
        name = layout.study_name if layout.study_name in names else (names[0] if len(names) == 1 else None)
        if name is None:
            return None, f"{layout.study_location} holds no study named {layout.study_name}"
        return load_study(layout, name), ""


@contextmanager
def quiet_optuna():
    """Optuna logs every in-memory study it creates and warns about small samples; a report
    states its own caveats, so both stay out of the command's output."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optuna.logging.set_verbosity(level)


def text_missing_note(cfg: ExperimentConfig) -> str:
    """How text went missing: on precomputed features a dropped token's contextual vector is
    zeroed while its neighbours' vectors still encode it, weaker than the papers' [UNK] tokens
    before a fine-tuned BERT. Results are not comparable across the two modes."""
    if cfg.model.text_encoder == "features":
        return ("Text missing simulated on features (dropped tokens' precomputed BERT vectors zeroed; the "
                "papers replace them with [UNK] before BERT).")
    return "Text missing as in the papers: dropped tokens replaced with [UNK] before BERT."


def held_out_patterns(cfg: ExperimentConfig) -> list[str]:
    """The grid patterns the search's objective never saw (search/objective.py)."""
    return objective_held_out(cfg.missing.eval_grid, cfg.search.objective_patterns)


def last_epoch_rows(inputs: ReportInputs, split: str) -> pd.DataFrame:
    """Each trial's rows on `split` at its last reported epoch."""
    last = {s.trial_id: s.epoch for s in inputs.scores}
    df = inputs.results
    return df[(df.split == split) & (df.epoch == df.trial_id.astype(str).map(last))]


def pattern_table(inputs: ReportInputs, split: str) -> pd.DataFrame:
    """trial (best first) x pattern (grid order): the metric at each trial's last epoch."""
    rows = last_epoch_rows(inputs, split)
    table = rows.pivot_table(index="trial_id", columns="pattern", values=inputs.metric, aggfunc="first")
    order = [s.trial_id for s in inputs.scores]
    grid = [p for p in inputs.cfg.missing.eval_grid if p in table.columns]
    return table.reindex(index=order, columns=grid)


def intra_curves(inputs: ReportInputs, split: str) -> pd.DataFrame:
    """trial (best first) x intra missing rate (ascending): the robustness curves."""
    rows = last_epoch_rows(inputs, split)
    rows = rows[rows.pattern_kind == "intra"]
    if rows.empty:
        raise Unavailable("missing.eval_grid has no intra patterns")
    table = rows.pivot_table(index="trial_id", columns="missing_rate", values=inputs.metric, aggfunc="first")
    return table.reindex(index=[s.trial_id for s in inputs.scores]).sort_index(axis=1)


def objective_over_time(inputs: ReportInputs) -> pd.DataFrame:
    """One row per reported trial-epoch in time order: the valid objective and the best of
    it so far. wall_time_s counts from the start of the search (of the run for `train`)."""
    cfg = inputs.cfg
    valid = inputs.results[inputs.results.split == "valid"]
    name, patterns = cfg.search.objective, cfg.search.objective_patterns
    points = [{"trial_id": str(trial_id), "epoch": int(epoch), "time_s": float(rows.wall_time_s.iloc[0]),
               "objective": objective_value(stored_pattern_metrics(rows), name, patterns)}
              for (trial_id, epoch), rows in valid.groupby(["trial_id", "epoch"])]
    table = pd.DataFrame(points).sort_values("time_s", kind="stable").reset_index(drop=True)
    running = table.objective.cummax() if cfg.search.mode == "max" else table.objective.cummin()
    return table.assign(best=running.ffill())  # a NaN objective (a diverged trial) keeps the best


def varying_hparams(inputs: ReportInputs) -> pd.DataFrame:
    """trial (best first) x the hyperparameters (dotted keys) that differ between trials:
    the searched ones, from each trial's config as it trained its last epoch (its parameters
    file, as export's; the results are read without their hp.* columns, several times faster)."""
    table = pd.DataFrame([flatten(s.config.model_dump(mode="json")) for s in inputs.scores],
                         index=pd.Index([s.trial_id for s in inputs.scores], name="trial_id"))
    varying = [c for c in table.columns if table[c].astype(str).nunique() > 1]  # str: None compares too
    return table[varying]


def log_scaled(layout: Layout) -> set[str]:
    """Dotted keys the search sampled log-uniformly (an axis in log10 shows them evenly)."""
    if not layout.space.is_file():
        return set()
    space = {key: Dist.parse(raw) for key, raw in json.loads(layout.space.read_text()).items()}
    return {key for key, dist in space.items() if dist.kind == "loguniform"}


def pareto_points(inputs: ReportInputs) -> tuple[pd.DataFrame, list[str]]:
    """trial x search.objectives (valid, last epoch) with an `on_front` column, and the names."""
    names = inputs.cfg.search.objectives
    if not names:
        raise Unavailable(f"does not apply to a single-objective search ({inputs.cfg.search.objective}); "
                          "a Pareto front needs search.objectives")
    patterns = inputs.cfg.search.objective_patterns
    vectors = {s.trial_id: [objective_value(s.valid, n, patterns) for n in names] for s in inputs.scores}
    front = set(pareto_front(vectors, [objective_mode(n) for n in names]))
    table = pd.DataFrame.from_dict(vectors, orient="index", columns=names)
    return table.assign(on_front=[t in front for t in table.index]), names


def _completed_trials(study: "optuna.Study") -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def study_importance(inputs: ReportInputs) -> tuple[dict[str, float], int]:
    """Optuna's importance of each searched hyperparameter for the study's objective(s), and
    how many completed trials it rests on. The default evaluator (PED-ANOVA) is
    deterministic; fANOVA would need scikit-learn, which this project does not install."""
    study = _study_or_why(inputs)
    completed = _completed_trials(study)
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        raise Unavailable(f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
                          f"the study has {len(completed)}")
    import optuna

    with quiet_optuna():
        return dict(optuna.importance.get_param_importances(study)), len(completed)


def _study_or_why(inputs: ReportInputs) -> "optuna.Study":
    if inputs.study is None:
        raise Unavailable(inputs.no_study)
    return inputs.study


def pattern_importance(inputs: ReportInputs) -> tuple[pd.DataFrame, int]:
    """hyperparameter x pattern: Optuna's importance of each searched hyperparameter for the
    metric on that pattern (valid, each trial's last epoch), and how many trials it rests on.

    Each pattern gets an in-memory study of the same trials (their sampled parameters, the
    search study's distributions) whose value is that pattern's metric. Trials without
    recorded parameters, or with values outside the distributions (PBT perturbs them), are
    left out; a pattern on which all trials score the same has no importance (NaN)."""
    import optuna

    distributions = {k: d for t in _study_or_why(inputs).trials for k, d in t.distributions.items()}
    trials = _trials_with_params(inputs.layout, [s.trial_id for s in inputs.scores], distributions)
    if len(trials) < MIN_TRIALS_FOR_IMPORTANCE:
        raise Unavailable(f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} trials with recorded parameters "
                          f"inside the study's distributions; found {len(trials)}")
    values = pattern_table(inputs, "valid").loc[list(trials)]
    direction = "minimize" if objective_mode(inputs.metric) == "min" else "maximize"
    columns = {}
    with quiet_optuna():
        for pattern in values.columns:
            scores = values[pattern].dropna()
            if len(scores) < MIN_TRIALS_FOR_IMPORTANCE or scores.nunique() < 2:
                columns[pattern] = pd.Series(dtype=float)
                continue
            study = optuna.create_study(direction=direction)
            for trial_id, value in scores.items():
                study.add_trial(optuna.trial.create_trial(params=trials[trial_id], value=float(value),
                                                          distributions=_dists(trials[trial_id], distributions)))
            columns[pattern] = pd.Series(optuna.importance.get_param_importances(study))
    table = pd.DataFrame(columns).reindex(index=sorted(distributions))
    return table, len(trials)


def _dists(params: dict[str, Any], distributions: dict) -> dict:
    return {k: distributions[k] for k in params}


def _trials_with_params(layout: Layout, trial_ids: list[str], distributions: dict) -> dict[str, dict[str, Any]]:
    """trial_id -> its sampled parameters, for the trials Optuna can take as they are."""
    import optuna

    usable = {}
    for trial_id in trial_ids:
        path = layout.trial_params(trial_id)
        if not path.is_file():
            continue
        params = {k: v for k, v in json.loads(path.read_text()).items() if k in distributions}
        if set(params) != set(distributions):
            continue
        try:
            optuna.trial.create_trial(params=params, distributions=_dists(params, distributions), value=0.0)
        except ValueError:  # a value outside its distribution
            continue
        usable[trial_id] = params
    return usable
