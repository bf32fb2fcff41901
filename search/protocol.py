"""The papers' results table (`msa-search report DIR --protocol paper|reference-lnln`).

LNLN's and HRLF's tables give each metric on the test split averaged over the intra missing
rates 0.0, 0.1, ..., 0.9 and over seeds (1111, 1112, 1113; spec/missing.md). Per run (seed):

1. choose the epoch whose weights are reported;
   - `paper`: the epoch best on the VALID split by the run's search.objective over
     search.objective_patterns (search/objective.py), earliest on ties: one epoch for every metric;
   - `reference-lnln`: as the reference code (train.py, core/utils.py `get_best_results`) does:
     on the TEST split at intra:0.5 it keeps one checkpoint per metric, saved whenever an epoch
     strictly beats the best so far, so the earliest epoch with the best value (MOSI/MOSEI
     values rounded to 4 decimals first, as its metrics are): acc2_has0 (its F1 read there
     too), acc2_non0 (and f1_non0), acc3, acc5, acc7, mae (and corr: its robust_evaluation.py
     reads Corr from the MAE checkpoint). Where
     the first epoch is best the reference saves no checkpoint at all; here it is used;
2. average each metric over the test intra rates 0.0-0.9 at that epoch (a NaN stays NaN);

then mean and sample standard deviation (ddof=1) over the runs of each table row. A row is a
seed group (`train --seeds`), a run, or, for an experiment, each trial `export` would write
(one seed each). Pure pandas on results-store rows; rendering is search/protocol_render.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.errors import MsaSearchError
from models.metrics import SIMS_METRIC_NAMES

from .config import ConfigError, ExperimentConfig, load_config
from .export import exported_trials, stored_pattern_metrics
from .layout import Layout
from .objective import objective_mode, objective_value
from .report_data import text_missing_note
from .results import ResultsStore
from .seed_group import read_group

PROTOCOLS = ("paper", "reference-lnln")
PAPER_RATES = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9
REFERENCE_PATTERN = "intra:0.5"
# The reference's checkpoints: the metric it selects on -> the metrics it reads at that epoch.
REFERENCE_CHECKPOINTS = {"acc2_has0": ("acc2_has0", "f1_has0"), "acc2_non0": ("acc2_non0", "f1_non0"),
                         "acc3": ("acc3",), "acc5": ("acc5",), "acc7": ("acc7",), "mae": ("mae", "corr")}
REFERENCE_LABEL = ("reference-lnln: checkpoints selected on the TEST split at r = 0.5, one per metric, as the "
                   "reference LNLN code does; not a clean protocol (test data chose the epochs)")
STD_DDOF = 1


@dataclass(frozen=True)
class RunRows:
    """One run's results-store rows and what the table needs to know about it."""

    entry: str  # the table row it is averaged into
    run: str  # its name: a seed run's directory, a run's trial_id, a trial id
    cfg: ExperimentConfig
    rows: pd.DataFrame


@dataclass(frozen=True)
class RunScore:
    entry: str
    run: str
    seed: int
    epochs: dict[str, int]  # metric -> the epoch its value is read at
    values: dict[str, float]  # metric -> mean over the test intra rates at that epoch
    rates: tuple[float, ...]  # the rates averaged


@dataclass
class ProtocolTable:
    protocol: str
    source: Path
    kind: str  # seed group, training run, experiment
    criterion: str  # how each run's epoch was chosen
    metrics: list[str]
    runs: list[RunScore]
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.protocol == "reference-lnln":
            return f"{self.source.name}: {REFERENCE_LABEL}"
        return f"{self.source.name}: the papers' protocol (epoch chosen on the validation split)"

    def summary(self) -> pd.DataFrame:
        """One row per entry (in run order): runs, seeds, and per metric its mean and `<metric>_std`."""
        rows = []
        for entry in dict.fromkeys(r.entry for r in self.runs):
            runs = [r for r in self.runs if r.entry == entry]
            row = {"entry": entry, "runs": len(runs), "seeds": ", ".join(str(r.seed) for r in runs)}
            for metric in self.metrics:
                values = pd.Series([r.values[metric] for r in runs], dtype=float)
                row[metric] = values.mean(skipna=False)
                row[f"{metric}_std"] = values.std(ddof=STD_DDOF, skipna=False) if len(runs) > STD_DDOF else np.nan
            rows.append(row)
        return pd.DataFrame(rows)


# --- per run: the epoch, then the mean over rates ---

def paper_epoch(rows: pd.DataFrame, objective: str, patterns: list[str]) -> int | None:
    """The epoch best on the valid split by `objective` over `patterns` (earliest on ties);
    None when no epoch has a finite value (a run that diverged at once)."""
    valid = rows[rows.split == "valid"]
    scores = {int(epoch): objective_value(stored_pattern_metrics(group), objective, patterns)
              for epoch, group in valid.groupby("epoch")}
    finite = {epoch: value for epoch, value in scores.items() if np.isfinite(value)}
    if not finite:
        return None
    sign = 1.0 if objective_mode(objective) == "max" else -1.0
    return min(finite, key=lambda epoch: (-sign * finite[epoch], epoch))


def reference_epochs(rows: pd.DataFrame, metrics: list[str]) -> dict[str, int]:
    """metric -> the epoch of the reference code's checkpoint for it (see the module doc)."""
    at = rows[(rows.split == "test") & (rows.pattern == REFERENCE_PATTERN)].sort_values("epoch")
    if at.empty:
        raise ConfigError(f"--protocol reference-lnln selects on the test split at {REFERENCE_PATTERN}, and these "
                          f"results have none; add {REFERENCE_PATTERN} to missing.eval_grid")
    untested = sorted(set(rows.epoch) - set(at.epoch))
    if untested:
        shown = ", ".join(map(str, untested[:5])) + (", ..." if len(untested) > 5 else "")
        raise ConfigError(f"--protocol reference-lnln selects on the test split at every epoch, and epochs {shown} "
                          f"have no test results (train.eval_test evaluated test only at some epochs; "
                          f"train with train.eval_test: every)")
    rounded = "acc3" not in metrics  # the reference rounds its MOSI/MOSEI metrics, not its SIMS ones
    epochs: dict[str, int] = {}
    for selector, read in REFERENCE_CHECKPOINTS.items():
        if selector not in metrics:
            continue
        values = at[selector].round(4) if rounded else at[selector]
        better = (lambda a, b: a < b) if objective_mode(selector) == "min" else (lambda a, b: a > b)
        best_epoch, best = int(at.epoch.iloc[0]), values.iloc[0]
        for epoch, value in zip(at.epoch.iloc[1:], values.iloc[1:]):
            if better(value, best):  # NaN never beats, nor is beaten: as the reference's comparisons
                best_epoch, best = int(epoch), value
        epochs.update({metric: best_epoch for metric in read if metric in metrics})
    return epochs


def rate_means(rows: pd.DataFrame, epochs: dict[str, int]) -> tuple[dict[str, float], tuple[float, ...]]:
    """metric -> its mean over the test intra rates 0.0-0.9 at epochs[metric], and those rates."""
    test = rows[(rows.split == "test") & (rows.pattern_kind == "intra") & rows.missing_rate.isin(PAPER_RATES)]
    if test.empty:
        raise ConfigError("no test results at intra rates 0.0-0.9; the papers' table averages over them "
                          "(missing.eval_grid needs intra patterns)")
    values, rates = {}, set()
    for metric, epoch in epochs.items():
        at = test[test.epoch == epoch]
        values[metric] = float(at[metric].astype(float).mean(skipna=False)) if len(at) else float("nan")
        rates.update(float(r) for r in at.missing_rate)
    return values, tuple(sorted(rates))


def score_run(run: RunRows, protocol: str, metrics: list[str]) -> RunScore:
    try:
        if protocol == "paper":
            epoch = paper_epoch(run.rows, run.cfg.search.objective, run.cfg.search.objective_patterns)
            if epoch is None:  # NaN in every column of the table; a note says why
                return RunScore(run.entry, run.run, run.cfg.train.seed, {}, dict.fromkeys(metrics, np.nan), ())
            if not ((run.rows.epoch == epoch) & (run.rows.split == "test")).any():
                raise ConfigError(f"epoch {epoch}, the best on valid, has no test results (train.eval_test "
                                  f"{run.cfg.train.eval_test}: use every or improved for this protocol)")
            epochs = {metric: epoch for metric in metrics}
        else:
            epochs = reference_epochs(run.rows, metrics)
        values, rates = rate_means(run.rows, epochs)
    except ConfigError as exc:
        raise ConfigError(f"{run.entry}, run {run.run}: {exc}") from None
    return RunScore(run.entry, run.run, run.cfg.train.seed, epochs, values, rates)


def protocol_table(runs: list[RunRows], protocol: str, source: Path, kind: str) -> ProtocolTable:
    """The table of `runs` under `protocol` (paper or reference-lnln)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol}: unknown; choose search, {', '.join(PROTOCOLS)}")
    frames = [r.rows for r in runs]
    metrics = [m for m in SIMS_METRIC_NAMES if any(m in f.columns and f[m].notna().any() for f in frames)]
    scores = [score_run(run, protocol, metrics) for run in runs]
    table = ProtocolTable(protocol, source, kind, _criterion(runs, protocol), metrics, scores)
    table.notes += _notes(runs, scores, kind, protocol)
    return table


def _criterion(runs: list[RunRows], protocol: str) -> str:
    if protocol == "reference-lnln":
        return (f"per metric, the first epoch best on the test split at {REFERENCE_PATTERN} (acc2_has0 also gives "
                "f1_has0, acc2_non0 gives f1_non0, mae gives corr)")
    search = {(r.cfg.search.objective, tuple(r.cfg.search.objective_patterns)) for r in runs}
    return "; ".join(f"the epoch best on the valid split by {name} over {', '.join(patterns)}"
                     for name, patterns in sorted(search))


def _notes(runs: list[RunRows], scores: list[RunScore], kind: str, protocol: str) -> list[str]:
    notes = [f"Each metric: the mean over the test split's intra missing rates at the chosen epoch, then mean ± "
             f"sample std (ddof={STD_DDOF}) over the runs of a row. Accuracies and F1 in %; epochs 0-based, as in "
             "results/."]
    for rates in sorted({s.rates for s in scores if s.rates} - {PAPER_RATES}):
        notes.append(f"Averaged over intra rates {', '.join(f'{r:.1f}' for r in rates)} only (missing.eval_grid); "
                     "the papers average all ten, 0.0-0.9.")
    notes += sorted({text_missing_note(r.cfg) for r in runs})
    for score in scores:
        if not score.epochs:
            notes.append(f"{score.entry} {score.run}: no epoch has a finite objective on the valid split "
                         "(diverged); its values are NaN, and so are its row's means.")
        first = [m for m, e in score.epochs.items() if m in REFERENCE_CHECKPOINTS and e == 0]
        if protocol == "reference-lnln" and first:
            notes.append(f"{score.entry} {score.run}: {', '.join(first)} best at the first epoch, where the "
                         "reference code saves no checkpoint (used here).")
    for run in runs:
        last = int(run.rows.epoch.max())
        if last + 1 < run.cfg.train.epochs:
            notes.append(f"{run.entry} {run.run}: stopped after epoch {last} of train.epochs = {run.cfg.train.epochs}.")
    if kind == "experiment":
        notes.append("One seed per trial (the search's train.seed). For mean ± std over seeds retrain them: "
                     "msa-search export EXP --out best.yaml, then msa-search train --config best.yaml "
                     "--seeds 1111,1112,1113, then msa-search report DIR --protocol paper.")
    elif (pd.Series([s.entry for s in scores]).value_counts() <= STD_DDOF).any():
        notes.append("A row of one run has no standard deviation (msa-search train --seeds trains several).")
    return notes


# --- reading a directory ---

def load_runs(path: str | Path, top: int | None = None) -> tuple[str, list[RunRows], list[str]]:
    """What `path` is (seed group, training run, experiment), its runs with results, and notes
    on runs it could not use. ConfigError (exit 2) when it holds no results at all."""
    root = Path(path)
    layout = Layout(root)
    group = read_group(root)
    if top is not None and (group is not None or not layout.is_experiment):
        raise ConfigError("--top picks an experiment's best trials; "
                          f"{root} is a {'seed group' if group is not None else 'training run'}")
    if group is not None:
        runs, notes = [], []
        for seed, run_dir in group.runs():
            found = _run_rows(run_dir, entry=root.name)
            if not found:
                notes.append(f"seed {seed}: no results in {run_dir} (failed or not started); left out.")
            runs += found
        kind = "seed group"
    elif not layout.config.is_file():
        raise ConfigError(f"{root}: not a run, seed group or experiment directory (no {layout.config.name} "
                          f"or {layout.seed_group.name})")
    elif layout.is_experiment:
        cfg = load_config(layout.config, stored=True)
        layout = layout.with_config(cfg)
        df = ResultsStore(layout.results).read()
        if df.empty:
            raise ConfigError(f"{root}: no results yet (nothing in {layout.results})")
        try:
            ranked = exported_trials(layout, cfg, df, top)
        except ConfigError:
            raise
        except MsaSearchError as exc:  # no finished trial yet: nothing to tabulate, as without results
            raise ConfigError(str(exc)) from None
        runs = [RunRows(f"{score.trial_id} (rank {rank})", score.trial_id, score.config,
                        df[df.trial_id.astype(str) == score.trial_id]) for rank, score in enumerate(ranked, start=1)]
        kind, notes = "experiment", []
    else:
        runs, kind, notes = _run_rows(root, entry=root.name), "training run", []
    if not runs:
        raise ConfigError(f"{root}: no results yet (a {kind} without results)")
    return kind, runs, notes


def _run_rows(run_dir: Path, entry: str) -> list[RunRows]:
    """A training (or evaluation) run's rows, one RunRows per trial_id it holds (normally one)."""
    layout = Layout(run_dir)
    if not layout.config.is_file():
        return []
    cfg = load_config(layout.config, stored=True)
    df = ResultsStore(layout.with_config(cfg).results).read()
    return [RunRows(entry, run_dir.name if df.trial_id.nunique() == 1 else str(trial_id), cfg, rows)
            for trial_id, rows in df.groupby("trial_id", sort=True)]


def build_table(path: str | Path, protocol: str, top: int | None = None) -> ProtocolTable:
    """`msa-search report PATH --protocol PROTOCOL`: the table of a run, seed group or experiment."""
    kind, runs, notes = load_runs(path, top)
    table = protocol_table(runs, protocol, Path(path), kind)
    table.notes += notes
    return table
