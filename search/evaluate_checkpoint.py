"""`msa-search evaluate`: any checkpoint, ours or a reference code's (search/weights.py), over
the missing-pattern grid on valid and test, with the same masks as training's evaluation
(`missing.seed`). Writes a run directory without training: DIR/config.yaml and DIR/results/
(one epoch, 0, under trial_id = the checkpoint's file stem).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.table import Table

from data_pipeline.loader import load_split, stage_splits
from data_pipeline.presets import EVALUATED_SPLITS
from data_pipeline.source import prepare_store
from data_pipeline.store import read_spec
from models.registry import get_model

from .config import ExperimentConfig
from .devices import configure_torch, in_process_device
from .export import pattern_table
from .layout import Layout
from .objective import objective_value
from .results import EpochResults, ResultsStore, RunInfo
from .run import new_run_dir
from .trainer import evaluate_epoch
from .weights import checkpoint_name, fitted_weights, read_checkpoint

EPOCH = 0  # an evaluation is one epoch of its own run


@dataclass
class Evaluation:
    out: Path  # the run directory written
    trial_id: str
    results: EpochResults  # split -> pattern -> metric -> value


def evaluate_checkpoint(checkpoint: Path, cfg: ExperimentConfig, out: Path,
                        on_skip: Callable[[str], None] | None = None) -> Evaluation:
    """Load `checkpoint` into the model `cfg` builds and evaluate it over `missing.eval_grid`.
    `out` must be new or empty; nothing stays there if the weights do not fit."""
    saved = read_checkpoint(checkpoint)  # before anything is written
    layout, entry = Layout(Path(out)), get_model(cfg.model.name)
    with new_run_dir(layout.root):
        layout.config.write_text(cfg.to_yaml())
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = in_process_device(cfg)
        configure_torch(cfg, device)
        store = prepare_store(cfg.data, layout.data)
        spec = read_spec(store)
        model = entry.build(cfg.model, spec)
        model.load_state_dict(fitted_weights(entry, model, saved, checkpoint, on_skip))
    started = time.perf_counter()
    splits = stage_splits({s: load_split(store, s, spec) for s in EVALUATED_SPLITS}, device)
    results = evaluate_epoch(model.to(device), cfg, splits, device)
    run = RunInfo.of(layout.root.name, checkpoint_name(Path(checkpoint)), cfg)
    ResultsStore(layout.results).append(run, EPOCH, results, time.perf_counter() - started)
    return Evaluation(layout.root, run.trial_id, results)


def results_table(evaluation: Evaluation, cfg: ExperimentConfig) -> Table:
    """Per pattern of the grid: valid F1 and the test metrics, as `msa-search status` shows a trial."""
    valid = evaluation.results["valid"]
    scores = ", ".join(f"{name} {objective_value(valid, name, cfg.search.objective_patterns):.4f}"
                       for name in ("robust_f1", "worst_f1"))
    return pattern_table(f"{evaluation.trial_id}: valid {scores} (over search.objective_patterns)",
                         evaluation.results, cfg.missing.eval_grid)
