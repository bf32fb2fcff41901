"""`msa-search status` and `msa-search export`: read an experiment back from its results
store, Optuna study and per-trial parameters."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.atomic import atomic_file
from data_pipeline.errors import MsaSearchError
from data_pipeline.missing import parse_pattern
from models.metrics import metric_names

from .config import HELD_OUT_PATTERNS, ExperimentConfig, load_config, objective_mode
from .evaluate import PatternResult
from .results import ResultsStore
from .space import apply_params
from .trainer import objective_value
from .tune import FAILURES, optuna_storage_url, study_name


@dataclass
class TrialScore:
    trial_id: str
    epoch: int  # the trial's last reported epoch
    objective: float
    finished: bool  # reached train.epochs (only these can be reproduced by a plain retrain)
    config: ExperimentConfig


def load_experiment(exp_dir: str | Path) -> tuple[Path, ExperimentConfig, pd.DataFrame]:
    exp_dir = Path(exp_dir)
    if not (exp_dir / "config.yaml").is_file():
        raise MsaSearchError(f"{exp_dir}: not an experiment directory (no config.yaml)")
    return exp_dir, load_config(exp_dir / "config.yaml"), ResultsStore(exp_dir / "results").read()


def _results(frame: pd.DataFrame, split: str, metrics: tuple[str, ...]) -> list[PatternResult]:
    rows = frame[frame.split == split]
    return [PatternResult(parse_pattern(r["pattern"]), {m: float(r[m]) for m in metrics if m in r})
            for _, r in rows.iterrows()]


def score_trials(exp_dir: Path, cfg: ExperimentConfig, df: pd.DataFrame, objective: str | None = None) -> list[TrialScore]:
    """Each trial's objective at its last epoch, best first (`objective` overrides search.objective)."""
    scoring = cfg if objective is None else cfg.model_copy(
        update={"search": cfg.search.model_copy(update={"objective": objective})})
    ExperimentConfig.model_validate(scoring.model_dump())  # a bad --objective fails here, clearly
    metrics = metric_names("sims" if cfg.data.preset == "sims" else "mosi")
    scores = []
    for trial_id, rows in df.groupby("trial_id"):
        last = int(rows.epoch.max())
        final = rows[rows.epoch == last]
        params_file = exp_dir / "trial_params" / f"{trial_id}.json"
        params = json.loads(params_file.read_text()) if params_file.is_file() else {}
        value = objective_value({"valid": _results(final, "valid", metrics)}, scoring)
        scores.append(TrialScore(str(trial_id), last, value, last + 1 >= cfg.train.epochs,
                                 apply_params(cfg, params)))
    reverse = scoring.search.mode == "max"
    return sorted(scores, key=lambda s: (s.objective if reverse else -s.objective), reverse=True)


def score_trials_value(df: pd.DataFrame, score: TrialScore, cfg: ExperimentConfig, name: str) -> float:
    final = df[(df.trial_id == score.trial_id) & (df.epoch == score.epoch)]
    metrics = metric_names("sims" if cfg.data.preset == "sims" else "mosi")
    return objective_value({"valid": _results(final, "valid", metrics)}, cfg, name)


def trial_states(exp_dir: Path) -> dict[str, int]:
    """Trials by state, as the Optuna study records them, plus failures recorded by the driver."""
    import optuna

    counts: dict[str, int] = {}
    if (exp_dir / "optuna.db").is_file():
        study = optuna.load_study(study_name=study_name(exp_dir), storage=optuna_storage_url(exp_dir))
        for t in study.trials:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    failures = exp_dir / FAILURES
    if failures.is_file():
        counts["errored (recorded)"] = len(failures.read_text().splitlines())
    return counts


def pareto_front(scores: dict[str, list[float]], modes: list[str]) -> list[str]:
    """Trial ids whose objective vectors no other trial dominates (>= on all, > on one)."""
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    vec = {t: [s * v for s, v in zip(sign, values)] for t, values in scores.items()}

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [t for t in vec if not any(dominates(vec[o], vec[t]) for o in vec if o != t)]


def export_best(exp_dir: str | Path, out: str | Path, top: int | None = None,
                objective: str | None = None) -> list[Path]:
    """Write the best finished trials as complete ExperimentConfig YAML files, each headed by
    the metrics it reached (comments, so the file stays a valid config). One trial by
    default; for a multi-objective search (and no `objective`), its whole Pareto front."""
    exp_dir, cfg, df = load_experiment(exp_dir)
    if df.empty:
        raise MsaSearchError(f"{exp_dir}: no results yet")
    finished = [s for s in score_trials(exp_dir, cfg, df, objective) if s.finished]
    if not finished:
        raise MsaSearchError(f"{exp_dir}: no trial has finished all {cfg.train.epochs} epochs yet")
    if cfg.search.objectives and objective is None:
        vectors = {s.trial_id: [score_trials_value(df, s, cfg, name) for name in cfg.search.objectives]
                   for s in finished}
        front = set(pareto_front(vectors, [objective_mode(n) for n in cfg.search.objectives]))
        finished = [s for s in finished if s.trial_id in front]
        top = top or len(finished)
    top = top or 1
    out = Path(out)
    written = []
    for rank, score in enumerate(finished[:top], start=1):
        path = out if rank == 1 else out.with_name(f"{out.stem}-{rank}{out.suffix}")
        final = df[(df.trial_id == score.trial_id) & (df.epoch == score.epoch)]
        header = [f"# exported from {exp_dir} trial {score.trial_id} (rank {rank}), epoch {score.epoch}",
                  f"# objective {score.config.search.objective if objective is None else objective}"
                  f" on valid = {score.objective:.6f}",
                  "# metrics it reached (split pattern: f1_non0 acc2_non0 mae corr; * = held out of the search):"]
        for _, row in final.sort_values(["split", "pattern"]).iterrows():
            mark = "*" if row["pattern"] in HELD_OUT_PATTERNS else " "
            header.append(f"#  {row['split']:5s} {row['pattern']:10s}{mark} {row['f1_non0']:.6f} "
                          f"{row['acc2_non0']:.6f} {row['mae']:.6f} {row['corr']:.6f}")
        exported = score.config.model_copy(update={
            "output": score.config.output.model_copy(update={"dir": f"runs/{exp_dir.name}-{score.trial_id}"}),
            "search": score.config.search.model_copy(update={"nan_trial": None}),  # a test hook, not a setting
        })
        with atomic_file(path, force=True) as tmp:
            tmp.write_text("\n".join(header) + "\n" + exported.to_yaml())
        load_config(path)  # what we wrote must load back as a valid config
        written.append(path)
    return written
