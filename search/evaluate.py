"""Per-pattern evaluation: one metrics row per missing pattern of the grid.

The split is read once; each chunk of rows is gathered once and every pattern's masks are
applied to it in turn, so a 16-pattern grid costs 16 forward passes per chunk and nothing
more (no reload, no re-gather, no complete-input branch: the model runs in eval mode, and
the batches carry no complete features). Predictions stay on the device until the whole
shard is done: one copy to the host per call, the only time the host waits for the device.
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_pipeline.loader import Batch, SplitTensors, apply_missing, batch_rows, gather
from data_pipeline.missing import Pattern
from data_pipeline.presets import MODALITIES
from models.metrics import msa_metrics_grouped

from .devices import autocast as autocast_to
from .objective import PatternMetrics
from .row_parallel import parallel_map


def metrics_family(dataset_name: str) -> str:
    """The metric definitions to use: SIMS has its own thresholds (MMSA)."""
    return "sims" if dataset_name.startswith("sims") else "mosi"


@dataclass
class ShardPredictions:
    preds: np.ndarray  # (P, n) predictions on this rank's rows
    rows: np.ndarray  # (n,) row indices (a padded shard may repeat rows)
    digests: np.ndarray  # (P, n) uint64 fingerprints of the keep masks the model saw


@torch.no_grad()
def predict_patterns(model: nn.Module, data: SplitTensors, patterns: list[Pattern], *, seed: int,
                     batch_size: int = 256, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                     autocast: torch.dtype | None = None, rank: int = 0, world_size: int = 1, streams: int = 1,
                     reuse_encodings: bool = True) -> ShardPredictions:
    """Predictions for every pattern on this rank's rows.

    Batches are built on `device` with features cast to `dtype` (an fp16/bf16 engine's
    weights); `autocast` runs each forward under `torch.autocast` at that dtype.

    With world_size > 1 every rank runs the same number of forward passes (shards are
    padded), as ZeRO-3's collective parameter gathering requires. `streams` > 1 (CPU, one
    process) runs that many patterns at a time, one thread each (search/row_parallel.py);
    a pattern's batch is never split, so this is exact for any model. A model may offer
    `reuse_encodings()` (a context for forward passes over the same rows, e.g. LNLN); turn it
    off where forward passes must stay the same on every rank (ZeRO-3 gathers parameters
    per module, and whether an encoding is reused depends on the rank's rows).
    """
    reuse = getattr(getattr(model, "module", model), "reuse_encodings", None) if reuse_encodings else None
    was_training = model.training
    model.eval()
    device = torch.device(device)
    shards = batch_rows(len(data), batch_size, shuffle=False, seed=0, epoch=0, rank=rank, world_size=world_size)
    rows_all = np.concatenate(shards) if shards else np.zeros(0, dtype=np.int64)
    digests = np.empty((len(patterns), len(rows_all)), dtype=np.uint64)
    chunks: list[torch.Tensor] = []  # (P, n) per chunk, on the device
    try:
        offset = 0
        for rows in shards:
            gathered = gather(data, rows, device)

            def predict(pattern: Pattern) -> tuple[np.ndarray, torch.Tensor]:
                batch = apply_missing(gathered, pattern, seed=seed, dtype=dtype, with_complete=False)
                # Grad mode and autocast are per thread: entered here, where the pattern runs.
                with torch.no_grad(), autocast_to(device, autocast):
                    out = model(batch)["prediction"].reshape(-1)
                return mask_digest(batch), out.float()

            with reuse() if reuse is not None else nullcontext():
                predicted = parallel_map(predict, patterns, streams)
            for i, (digest, _) in enumerate(predicted):
                digests[i, offset:offset + len(rows)] = digest
            if predicted:
                chunks.append(torch.stack([pred for _, pred in predicted]))
            offset += len(rows)
        preds = (torch.cat(chunks, dim=1).cpu().numpy().astype(np.float64) if chunks  # the one host sync
                 else np.empty((len(patterns), len(rows_all)), dtype=np.float64))
    finally:
        model.train(was_training)
    return ShardPredictions(preds, rows_all, digests)


def mask_digest(batch: Batch) -> np.ndarray:
    """(B,) uint64 fingerprint of each sample's keep masks (all modalities): a weighted sum
    of kept positions with fixed random 64-bit weights, wrapping mod 2^64."""
    total = np.zeros(len(batch), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, m in enumerate(MODALITIES):
            x = batch.modality(m)
            keep = x.keep_host if x.keep_host is not None else x.keep.cpu().numpy()  # the host copy: no sync
            weights = np.random.default_rng([20261124, i, keep.shape[1]]).integers(
                1, 2**63, keep.shape[1], dtype=np.uint64)
            total += (keep.astype(np.uint64) * weights[None, :]).sum(axis=1, dtype=np.uint64)
    return total


def split_fingerprint(digests: np.ndarray) -> str:
    """One short hex string for the (P, N) mask digests of a split: equal iff the masks are."""
    return hashlib.blake2b(np.ascontiguousarray(digests, dtype=np.uint64).tobytes(), digest_size=8).hexdigest()


def scatter_rows(n: int, preds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Assemble (P, n) predictions from (possibly padded, repeated) row-indexed pieces."""
    out = np.zeros((preds.shape[0], n), dtype=preds.dtype)
    seen = np.zeros(n, dtype=bool)
    out[:, rows] = preds
    seen[rows] = True
    if not seen.all():
        raise RuntimeError("some samples were not predicted (a shard is missing)")
    return out


def pattern_metrics(preds: np.ndarray, data: SplitTensors, patterns: list[Pattern]) -> PatternMetrics:
    """The metrics of (P, N) whole-split predictions, one entry per pattern."""
    rows = msa_metrics_grouped(preds, data.labels.cpu().numpy(), metrics_family(data.spec.name))
    return {p.name: m for p, m in zip(patterns, rows)}


def evaluate_patterns(model: nn.Module, data: SplitTensors, patterns: list[Pattern], *, seed: int,
                      batch_size: int = 256, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                      autocast: torch.dtype | None = None, streams: int = 1) -> PatternMetrics:
    """The metrics of every pattern, in the order of `patterns`. `seed` is the mask seed."""
    shard = predict_patterns(model, data, patterns, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
                             autocast=autocast, streams=streams)
    return pattern_metrics(scatter_rows(len(data), shard.preds, shard.rows), data, patterns)
