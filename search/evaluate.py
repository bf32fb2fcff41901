"""Per-pattern evaluation: one metrics row per missing pattern of the grid.

The split is read once; each chunk of rows is gathered once and every pattern's masks are
applied to it in turn, so a 16-pattern grid costs 16 forward passes per chunk and nothing
more (no reload, no re-gather, no complete-input branch: the model runs in eval mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_pipeline.loader import SplitTensors, apply_missing, batch_rows, gather
from data_pipeline.missing import Pattern
from models.metrics import msa_metrics_grouped


@dataclass
class PatternResult:
    pattern: Pattern
    metrics: dict[str, float]


def metrics_family(dataset_name: str) -> str:
    """The metric definitions to use: SIMS has its own thresholds (MMSA)."""
    return "sims" if dataset_name.startswith("sims") else "mosi"


@torch.no_grad()
def predict_patterns(model: nn.Module, data: SplitTensors, patterns: list[Pattern], *, seed: int,
                     batch_size: int = 256, device: torch.device | str = "cpu") -> np.ndarray:
    """Predictions (P, N) for every pattern and sample of the split."""
    was_training = model.training
    model.eval()
    preds = np.empty((len(patterns), len(data)), dtype=np.float64)
    try:
        for rows in batch_rows(len(data), batch_size, shuffle=False, seed=0, epoch=0):
            gathered = gather(data, rows)
            for i, pattern in enumerate(patterns):
                batch = apply_missing(gathered, pattern, seed=seed).to(device)
                preds[i, rows] = model(batch)["prediction"].reshape(-1).float().cpu().numpy()
    finally:
        model.train(was_training)
    return preds


def evaluate_patterns(model: nn.Module, data: SplitTensors, patterns: list[Pattern], *, seed: int,
                      batch_size: int = 256, device: torch.device | str = "cpu") -> list[PatternResult]:
    """One metrics row per pattern, in the order of `patterns`. `seed` is the mask seed."""
    preds = predict_patterns(model, data, patterns, seed=seed, batch_size=batch_size, device=device)
    rows = msa_metrics_grouped(preds, data.labels.numpy(), metrics_family(data.spec.name))
    return [PatternResult(p, m) for p, m in zip(patterns, rows)]
