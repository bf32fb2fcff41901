"""Shared by the training-step benchmarks (step_throughput, step_profile, reference_throughput):
the synthetic training setup at real shapes, and the timed loop of steps."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from data_pipeline.loader import SplitTensors, batch_rows
from data_pipeline.missing import TrainingMissing
from data_pipeline.schema import MSADataset
from data_pipeline.synth import synthesize
from search.config import ExperimentConfig, apply_override
from search.trainer import TrainState, build_state


@dataclass
class TrainingSetup:
    cfg: ExperimentConfig
    data: MSADataset
    train: SplitTensors
    state: TrainState
    missing: TrainingMissing
    rows: list[np.ndarray]  # full batches of one shuffled epoch


def training_setup(model: str, shape: str, batch_size: int, dropout: float, batch_chunks: int,
                   overrides: list[str]) -> TrainingSetup:
    """The model's default (reference) sizes on synthetic data of `shape` (text as precomputed
    features), with the CLI's `KEY=VALUE` overrides; only full batches are kept."""
    raw = {"model": {"name": model, "dropout": dropout},
           "train": {"batch_size": batch_size, "epochs": 1, "batch_chunks": batch_chunks}}
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = ExperimentConfig.model_validate(raw)
    data = synthesize(shape, seed=0, scale=0.3)
    train = SplitTensors.from_arrays(data.spec, "train", data.split("train"))
    state = build_state(cfg, train, torch.device("cpu"))
    rows = [r for r in batch_rows(len(train), batch_size, shuffle=True, seed=0, epoch=0) if len(r) == batch_size]
    return TrainingSetup(cfg, data, train, state, cfg.missing.training(), rows)


def samples_per_s(step: Callable[[int], None], batch_size: int, train_steps: int = 0,
                  seconds: float = 20.0) -> tuple[float, int]:
    """Training samples/s over `train_steps` steps (0: enough for about `seconds`), after one
    warm-up step (allocator, lazy init) and one timed to size the run; and the step count."""
    step(0)
    first = time.perf_counter()
    step(1)
    per_step = time.perf_counter() - first
    n_steps = train_steps or max(3, int(seconds / max(per_step, 1e-3)))
    start = time.perf_counter()
    for i in range(n_steps):
        step(i + 2)
    return n_steps * batch_size / (time.perf_counter() - start), n_steps
