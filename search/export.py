"""`msa-search status` and `msa-search export`: read an experiment back from its results
store, Optuna study and per-trial parameters (search/layout.py names them all)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.atomic import atomic_file
from data_pipeline.errors import MsaSearchError
from models.metrics import SIMS_METRIC_NAMES

from .config import ConfigError, ExperimentConfig, load_config
from .layout import Layout
from .objective import HELD_OUT_PATTERNS, PatternMetrics, check_objective, objective_mode, objective_value, pareto_front
from .results import ResultsStore
from .seed_group import read_group
from .study import load_study, uses_study


@dataclass
class TrialScore:
    trial_id: str
    epoch: int  # the trial's last reported epoch
    valid: PatternMetrics  # its validation results at that epoch
    objective: float
    finished: bool  # reached train.epochs (only these can be reproduced by a plain retrain)
    config: ExperimentConfig


def load_experiment(exp_dir: str | Path, hparams: bool = True) -> tuple[Layout, ExperimentConfig, pd.DataFrame]:
    """The experiment's layout, config and results; `hparams=False` leaves out the hp.* columns
    (a reader that takes each trial's config from its parameters file reads several times faster)."""
    layout = Layout(Path(exp_dir))
    if not layout.config.is_file():
        group = read_group(layout.root)
        if group is not None:  # a group holds runs, one per seed, and no config of its own
            runs = [run.name for _, run in group.runs() if run.is_dir()]
            raise MsaSearchError(f"{layout.root}: a seed group, not one run; name one of its runs "
                                 f"({', '.join(runs) or 'none yet'}), or use report --protocol paper on the group")
        raise MsaSearchError(f"{layout.root}: not an experiment directory (no {layout.config.name})")
    cfg = load_config(layout.config, stored=True)
    layout = layout.with_config(cfg)  # the results (and study) in output.storage / search.storage when set
    return layout, cfg, ResultsStore(layout.results).read(hparams=hparams)


def stored_pattern_metrics(rows: pd.DataFrame) -> PatternMetrics:
    """One split's rows of the results store (one per pattern) as pattern -> metric -> value."""
    metrics = [m for m in SIMS_METRIC_NAMES if m in rows.columns]
    return {r["pattern"]: {m: float(r[m]) for m in metrics} for _, r in rows.iterrows()}


def score_trials(layout: Layout, cfg: ExperimentConfig, df: pd.DataFrame,
                 objective: str | None = None) -> list[TrialScore]:
    """Each trial's objective at its last epoch, best first (`objective` overrides search.objective)."""
    name = objective or cfg.search.objective
    try:
        check_objective(name, SIMS_METRIC_NAMES, cfg.missing.eval_grid)
    except ValueError as exc:
        raise ConfigError(f"--objective: {exc}") from None
    scores = []
    for trial_id, rows in df.groupby("trial_id"):
        last = int(rows.epoch.max())
        valid = stored_pattern_metrics(rows[(rows.epoch == last) & (rows.split == "valid")])
        params_file = layout.trial_params(str(trial_id))
        params = json.loads(params_file.read_text()) if params_file.is_file() else {}
        scores.append(TrialScore(str(trial_id), last, valid,
                                 objective_value(valid, name, cfg.search.objective_patterns),
                                 last + 1 >= cfg.train.epochs, cfg.with_params(params, stored=True)))
    sign = 1.0 if objective_mode(name) == "max" else -1.0
    return sorted(scores, key=lambda s: sign * s.objective, reverse=True)


# The per-pattern table's columns: (split, metric).
TABLE_COLUMNS = (("valid", "f1_non0"), ("test", "f1_non0"), ("test", "acc2_non0"), ("test", "mae"), ("test", "corr"))


def pattern_table(title: str, results: dict[str, PatternMetrics], grid: list[str], held_out=()):
    """One trial's results per pattern of `grid` (patterns with no results left out): valid
    F1 and the test metrics, "-" where a split was not evaluated at that epoch
    (train.eval_test); held-out patterns are starred. `status` and `evaluate` print it."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("pattern")
    for split, metric in TABLE_COLUMNS:
        table.add_column(f"{split} {metric}", justify="right")
    for pattern in grid:
        if not any(pattern in results.get(split, {}) for split in ("valid", "test")):
            continue
        cells = (f"{results[split][pattern].get(metric, float('nan')):.4f}"
                 if pattern in results.get(split, {}) else "-" for split, metric in TABLE_COLUMNS)
        table.add_row(pattern + ("*" if pattern in held_out else ""), *cells)
    return table


def trial_states(layout: Layout, study=None) -> dict[str, int]:
    """Trials by state, as the Optuna study records them (`study`: one loaded already),
    plus failures recorded by the driver."""
    counts: dict[str, int] = {}
    if study is None and layout.has_study:
        study = load_study(layout)
    if study is not None:
        for t in study.trials:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    if layout.failures.is_file():
        counts["errored (recorded)"] = len(layout.failures.read_text().splitlines())
    return counts


def tune_trial_states(layout: Layout) -> dict[str, int]:
    """A search without an Optuna study (PBT samples without one): its trials by state as Tune's
    saved state has them, read without Ray; empty when there is none (yet) or it cannot be read."""
    from .rounds import saved_analysis

    analysis = saved_analysis(layout)  # a PBT search has one round (no --add-trials)
    return dict(Counter(t.status.lower() for t in analysis.trials)) if analysis is not None else {}


def exported_trials(layout: Layout, cfg: ExperimentConfig, df: pd.DataFrame, top: int | None = None,
                    objective: str | None = None) -> list[TrialScore]:
    """The trials `export` writes, best first: the `top` best finished ones (default 1); for a
    multi-objective search (and no `objective`), its Pareto front (default: all of it)."""
    if df.empty:
        raise MsaSearchError(f"{layout.root}: no results yet")
    finished = [s for s in score_trials(layout, cfg, df, objective) if s.finished]
    if not finished:
        raise MsaSearchError(f"{layout.root}: no trial has finished all {cfg.train.epochs} epochs yet")
    if cfg.search.objectives and objective is None:
        patterns = cfg.search.objective_patterns
        vectors = {s.trial_id: [objective_value(s.valid, name, patterns) for name in cfg.search.objectives]
                   for s in finished}
        front = set(pareto_front(vectors, [objective_mode(n) for n in cfg.search.objectives]))
        finished = [s for s in finished if s.trial_id in front]
        top = top or len(finished)
    return finished[:top or 1]


def export_best(exp_dir: str | Path, out: str | Path, top: int | None = None,
                objective: str | None = None) -> list[Path]:
    """Write the best finished trials as complete ExperimentConfig YAML files, each headed by
    the metrics it reached (comments, so the file stays a valid config). One trial by
    default; for a multi-objective search (and no `objective`), its whole Pareto front."""
    layout, cfg, df = load_experiment(exp_dir, hparams=False)  # configs come from the params files
    out = Path(out)
    written = []
    for rank, score in enumerate(exported_trials(layout, cfg, df, top, objective), start=1):
        path = out if rank == 1 else out.with_name(f"{out.stem}-{rank}{out.suffix}")
        final = df[(df.trial_id == score.trial_id) & (df.epoch == score.epoch)]
        header = [f"# exported from {layout.root} trial {score.trial_id} (rank {rank}), epoch {score.epoch}",
                  f"# objective {objective or score.config.search.objective} on valid = {score.objective:.6f}",
                  "# metrics it reached (split pattern: f1_non0 acc2_non0 mae corr; * = held out of the search):"]
        if not uses_study(cfg):
            header[2:2] = ["# search.scheduler pbt: the values below are those its last epoch trained with; PBT may have",
                           "# changed them during the trial and given it another trial's weights, so a retrain with",
                           "# them alone need not reach these metrics"]
        for _, row in final.sort_values(["split", "pattern"]).iterrows():
            mark = "*" if row["pattern"] in HELD_OUT_PATTERNS else " "
            header.append(f"#  {row['split']:5s} {row['pattern']:10s}{mark} {row['f1_non0']:.6f} "
                          f"{row['acc2_non0']:.6f} {row['mae']:.6f} {row['corr']:.6f}")
        exported = score.config.model_copy(update={
            "output": score.config.output.model_copy(update={"dir": f"runs/{layout.root.name}-{score.trial_id}"}),
            "search": score.config.search.model_copy(update={"nan_trial": None}),  # a test hook, not a setting
        })
        with atomic_file(path, force=True) as tmp:
            tmp.write_text("\n".join(header) + "\n" + exported.to_yaml())
        load_config(path, stored=True)  # what we wrote must load back as a valid config
        written.append(path)
    return written
