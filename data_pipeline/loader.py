"""From the Parquet store to batches of torch tensors with missing masks applied.

A split is loaded once as whole-split tensors (a reshape per column, no per-row loops);
batches are index gathers plus masks from `missing.keep_masks`, which depend only on the
sample ids, so any batch size, order or sharding sees the same masks.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from .missing import UNK_TOKEN_ID, MissingSpec, drop_fraction, droppable_mask, keep_masks, sample_keys
from .presets import MODALITIES, SPLITS
from .schema import DataSpec, SplitArrays
from .store import read_spec, read_split


@dataclass
class SplitTensors:
    """A whole split as tensors (complete data, no missing applied)."""

    spec: DataSpec
    split: str
    ids: np.ndarray  # (N,) str
    keys: np.ndarray  # (N,) uint64, stable per sample id
    labels: torch.Tensor  # (N,)
    features: dict[str, torch.Tensor]  # modality -> (N, T, d)
    lengths: dict[str, np.ndarray]  # modality -> (N,) int
    text_bert: torch.Tensor | None  # (N, 3, L) long

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_arrays(cls, spec: DataSpec, split: str, arrays: SplitArrays) -> "SplitTensors":
        return cls(
            spec=spec, split=split, ids=arrays.ids, keys=sample_keys(arrays.ids),
            labels=torch.from_numpy(np.ascontiguousarray(arrays.labels, dtype=np.float32)),
            features={m: torch.from_numpy(np.ascontiguousarray(getattr(arrays, m), dtype=np.float32))
                      for m in MODALITIES},
            lengths={m: np.asarray(getattr(arrays, f"{m}_lengths"), dtype=np.int64) for m in MODALITIES},
            text_bert=None if arrays.text_bert is None else torch.from_numpy(arrays.text_bert.astype(np.int64)),
        )


def load_split(store_dir: str | Path, split: str, spec: DataSpec | None = None) -> SplitTensors:
    spec = spec or read_spec(store_dir)
    return SplitTensors.from_arrays(spec, split, read_split(store_dir, split, spec))


def load_splits(store_dir: str | Path) -> dict[str, SplitTensors]:
    """Every split of a store (train, valid, test): what each training path reads."""
    spec = read_spec(store_dir)
    return {split: load_split(store_dir, split, spec) for split in SPLITS}


@dataclass
class ModalityInput:
    complete: torch.Tensor  # (B, T, d) features without missing
    observed: torch.Tensor  # (B, T, d) dropped positions zeroed
    valid: torch.Tensor  # (B, T) bool, inside the sample's length (attention mask)
    keep: torch.Tensor  # (B, T) bool, valid and not dropped


@dataclass
class Batch:
    text: ModalityInput
    audio: ModalityInput
    vision: ModalityInput
    label: torch.Tensor  # (B,)
    text_missing_fraction: torch.Tensor  # (B,) observed drop fraction of droppable text positions
    text_bert_complete: torch.Tensor | None = None  # (B, 3, L) ids / mask / types
    text_bert_observed: torch.Tensor | None = None  # dropped token ids -> [UNK]

    def modality(self, name: str) -> ModalityInput:
        return getattr(self, name)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "Batch":
        """Move every tensor to `device`; with `dtype`, floating tensors are also cast (bf16 engines)."""
        def move(value: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and value.is_floating_point() else None
            return value.to(device, dtype=cast, non_blocking=non_blocking)
        return self._map(move)

    def split(self, chunks: int) -> list["Batch"]:
        """`chunks` batches of consecutive rows (sizes differ by at most one; views, no copy)."""
        chunks = max(1, min(chunks, len(self)))
        bounds = [len(self) * i // chunks for i in range(chunks + 1)]
        return [self._map(lambda t, lo=lo, hi=hi: t[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]

    def _map(self, fn) -> "Batch":
        """A batch with `fn` applied to every tensor (all have the rows first)."""
        def apply(value):
            if isinstance(value, torch.Tensor):
                return fn(value)
            if isinstance(value, ModalityInput):
                return ModalityInput(*(apply(getattr(value, f.name)) for f in fields(ModalityInput)))
            return value
        return replace(self, **{f.name: apply(getattr(self, f.name)) for f in fields(self)})


@dataclass
class Rows:
    """Complete data of some rows of a split, gathered once (several patterns can reuse it)."""

    data: SplitTensors
    rows: np.ndarray  # (B,) int64
    features: dict[str, torch.Tensor]  # modality -> (B, T, d)
    lengths: dict[str, np.ndarray]
    label: torch.Tensor
    text_bert: torch.Tensor | None


def gather(data: SplitTensors, rows: np.ndarray) -> Rows:
    rows = np.ascontiguousarray(rows, dtype=np.int64)  # torch rejects negative strides (rows[::-1])
    index = torch.from_numpy(rows)
    return Rows(data=data, rows=rows,
                features={m: data.features[m].index_select(0, index) for m in MODALITIES},
                lengths={m: data.lengths[m][rows] for m in MODALITIES},
                label=data.labels.index_select(0, index),
                text_bert=None if data.text_bert is None else data.text_bert.index_select(0, index))


def apply_missing(rows: Rows, missing: MissingSpec, *, seed: int, epoch: int | None = None) -> Batch:
    """Make gathered rows incomplete with `missing` (a Pattern, a TrainingMissing, or None)."""
    spec = rows.data.spec
    keep, valid = keep_masks(
        rows.data.keys[rows.rows], rows.lengths, {m: spec.seq_len(m) for m in MODALITIES}, missing,
        seed=seed, split=rows.data.split, epoch=epoch, text_special_tokens=spec.text_special_tokens,
    )
    inputs = {}
    for m in MODALITIES:
        complete = rows.features[m]
        keep_t = torch.from_numpy(keep[m])
        inputs[m] = ModalityInput(complete=complete, observed=complete * keep_t.unsqueeze(-1),
                                  valid=torch.from_numpy(valid[m]), keep=keep_t)
    droppable = droppable_mask(valid["text"], rows.lengths["text"], spec.text_special_tokens)
    fraction = torch.from_numpy(drop_fraction(keep["text"], droppable).astype(np.float32))
    bert_observed = None
    if rows.text_bert is not None:
        dropped = torch.from_numpy(valid["text"] & ~keep["text"])
        bert_observed = rows.text_bert.clone()
        bert_observed[:, 0] = torch.where(dropped, UNK_TOKEN_ID, rows.text_bert[:, 0])
    return Batch(text=inputs["text"], audio=inputs["audio"], vision=inputs["vision"], label=rows.label,
                 text_missing_fraction=fraction, text_bert_complete=rows.text_bert, text_bert_observed=bert_observed)


def make_batch(data: SplitTensors, rows: np.ndarray, missing: MissingSpec, *, seed: int,
               epoch: int | None = None) -> Batch:
    """Gather `rows` of a split and apply `missing`."""
    return apply_missing(gather(data, rows), missing, seed=seed, epoch=epoch)


def batch_rows(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
               rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Row indices per batch for one epoch: a seeded permutation, sharded by rank.

    Every rank gets the same number of batches (the tail is padded by wrapping around), so
    collective training steps never hang on an uneven shard.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    shard = order[rank::world_size]
    per_rank = -(-n // world_size)
    if len(shard) < per_rank:
        shard = np.concatenate([shard, order[: per_rank - len(shard)]])
    return [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
