"""From the Parquet store to batches of torch tensors with missing masks applied.

A split is loaded once as whole-split tensors (a reshape per column, no per-row loops);
batches are index gathers plus masks from `missing.keep_masks`, which depend only on the
sample ids, so any batch size, order or sharding sees the same masks.

Batches are built without draining the GPU queue: masks are computed on the host (numpy),
sent in one pinned non-blocking copy, and applied where the data lives; host copies of the
lengths and keep masks ride along so models never read them back from the device.
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

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def nbytes(self) -> int:
        tensors = [self.labels, *self.features.values(), *([] if self.text_bert is None else [self.text_bert])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SplitTensors":
        """The tensors on `device`; host metadata (ids, keys, lengths) stays in numpy."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def _apply(self, fn) -> "SplitTensors":
        return replace(self, labels=fn(self.labels), features={m: fn(t) for m, t in self.features.items()},
                       text_bert=None if self.text_bert is None else fn(self.text_bert))

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


def stage_splits(splits: dict[str, SplitTensors], device: torch.device | str,
                 max_fraction: float = 0.5) -> dict[str, SplitTensors]:
    """Splits placed for fast batches on `device`: on a GPU, the whole splits when they take at
    most `max_fraction` of its free memory (row gathers then run there); else they stay where
    they are, and each batch is gathered into pinned memory and copied without blocking
    (`gather`). Pinning whole splits instead would give every process a private page-locked
    copy of data that trials and ranks otherwise share (search/shared_data.py)."""
    device = torch.device(device)
    if device.type != "cuda":
        return dict(splits)
    free, _ = torch.cuda.mem_get_info(device)
    if sum(s.nbytes for s in splits.values()) <= max_fraction * free:
        return {name: s.to(device) for name, s in splits.items()}
    return dict(splits)


def host_to_device(array: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host array on `device` without making the host wait: pinned, then a non-blocking copy
    (the caching host allocator keeps the pinned block alive until the copy has run)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    device = torch.device(device)
    if tensor.device == device or (device.type == "cpu" and tensor.device.type == "cpu"):
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _masks_to_device(masks: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Boolean host masks on `device`, in a single copy off the host (views of one buffer)."""
    if device.type == "cpu":
        return [torch.from_numpy(np.ascontiguousarray(m)) for m in masks]
    flat = host_to_device(np.concatenate([m.reshape(-1) for m in masks]), device)
    return [part.view(m.shape) for part, m in zip(flat.split([m.size for m in masks]), masks)]


@dataclass
class ModalityInput:
    complete: torch.Tensor | None  # (B, T, d) features without missing; None in evaluation batches
    observed: torch.Tensor  # (B, T, d) dropped positions zeroed
    valid: torch.Tensor  # (B, T) bool, inside the sample's length (attention mask)
    keep: torch.Tensor  # (B, T) bool, valid and not dropped
    # Host (numpy) copies, never moved: what models decide on without reading the device.
    lengths: np.ndarray | None = None  # (B,) valid lengths (valid is the prefix mask of these)
    keep_host: np.ndarray | None = None  # (B, T) bool, equal to `keep`


@dataclass
class Batch:
    text: ModalityInput
    audio: ModalityInput
    vision: ModalityInput
    label: torch.Tensor  # (B,)
    text_missing_fraction: torch.Tensor  # (B,) observed drop fraction of droppable text positions
    text_bert_complete: torch.Tensor | None = None  # (B, 3, L) ids / mask / types; None in evaluation
    text_bert_observed: torch.Tensor | None = None  # dropped token ids -> [UNK]

    def modality(self, name: str) -> ModalityInput:
        return getattr(self, name)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "Batch":
        """Every tensor on `device`; with `dtype`, the features (complete, observed) are cast too
        (fp16/bf16 engines). Labels and missing fractions keep fp32; host arrays stay."""
        def move(value: torch.Tensor) -> torch.Tensor:
            return value.to(device, non_blocking=non_blocking)

        def move_feature(value: torch.Tensor) -> torch.Tensor:
            return value.to(device, dtype=dtype, non_blocking=non_blocking)
        return self._map(move, features=move_feature)

    def split(self, chunks: int) -> list["Batch"]:
        """`chunks` batches of consecutive rows (sizes differ by at most one; views, no copy)."""
        chunks = max(1, min(chunks, len(self)))
        bounds = [len(self) * i // chunks for i in range(chunks + 1)]
        return [self._map(lambda t, lo=lo, hi=hi: t[lo:hi], host=lambda a, lo=lo, hi=hi: a[lo:hi])
                for lo, hi in zip(bounds, bounds[1:])]

    def _map(self, fn, features=None, host=None) -> "Batch":
        """A batch with `fn` applied to every tensor (all have the rows first), `features` (default
        `fn`) to the complete/observed features and `host` (default: none) to host arrays."""
        def apply(value, feature=False):
            if isinstance(value, torch.Tensor):
                return (features or fn)(value) if feature else fn(value)
            if isinstance(value, np.ndarray):
                return host(value) if host is not None else value
            if isinstance(value, ModalityInput):
                return ModalityInput(*(apply(getattr(value, f.name), f.name in ("complete", "observed"))
                                       for f in fields(ModalityInput)))
            return value
        return replace(self, **{f.name: apply(getattr(self, f.name)) for f in fields(self)})


@dataclass
class Rows:
    """Complete data of some rows of a split, gathered once (several patterns can reuse it)."""

    data: SplitTensors
    rows: np.ndarray  # (B,) int64
    features: dict[str, torch.Tensor]  # modality -> (B, T, d), on the batch's device
    lengths: dict[str, np.ndarray]
    label: torch.Tensor
    text_bert: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.label.device


def gather(data: SplitTensors, rows: np.ndarray, device: torch.device | str | None = None) -> Rows:
    """Rows of a split on `device` (default: where the data is). The gather runs where the
    data lives (the row index goes over without blocking); host data bound for a GPU is
    gathered into pinned memory and copied without blocking."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)  # torch rejects negative strides (rows[::-1])
    target = data.device if device is None else torch.device(device)
    pinned = data.device.type == "cpu" and target.type == "cuda"
    index = host_to_device(rows, data.device)

    def take(source: torch.Tensor) -> torch.Tensor:
        if not pinned:  # only a copy to a GPU may skip waiting (one to the host must finish first)
            return source.index_select(0, index).to(target, non_blocking=target.type == "cuda")
        out = torch.empty((len(rows), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
        return torch.index_select(source, 0, index, out=out).to(target, non_blocking=True)

    return Rows(data=data, rows=rows,
                features={m: take(data.features[m]) for m in MODALITIES},
                lengths={m: data.lengths[m][rows] for m in MODALITIES},
                label=take(data.labels),
                text_bert=None if data.text_bert is None else take(data.text_bert))


def apply_missing(rows: Rows, missing: MissingSpec, *, seed: int, epoch: int | None = None,
                  dtype: torch.dtype | None = None, with_complete: bool = True) -> Batch:
    """Make gathered rows incomplete with `missing` (a Pattern, a TrainingMissing, or None).

    Masks are drawn on the host and sent in one non-blocking copy; `observed` is made on the
    rows' device. `dtype` casts the features only (labels and fractions stay fp32).
    `with_complete=False` (evaluation, which never reads them) leaves `complete` None.
    """
    spec, device = rows.data.spec, rows.device
    keep, valid = keep_masks(
        rows.data.keys[rows.rows], rows.lengths, {m: spec.seq_len(m) for m in MODALITIES}, missing,
        seed=seed, split=rows.data.split, epoch=epoch, text_special_tokens=spec.text_special_tokens,
    )
    droppable = droppable_mask(valid["text"], rows.lengths["text"], spec.text_special_tokens)
    bert_dropped = [valid["text"] & ~keep["text"]] if rows.text_bert is not None else []
    sent = _masks_to_device([*(keep[m] for m in MODALITIES), *(valid[m] for m in MODALITIES), *bert_dropped],
                            device)
    keep_t, valid_t = dict(zip(MODALITIES, sent[:3])), dict(zip(MODALITIES, sent[3:6]))
    inputs = {}
    for m in MODALITIES:
        complete = rows.features[m] if dtype is None else rows.features[m].to(dtype)
        inputs[m] = ModalityInput(complete=complete if with_complete else None,
                                  observed=complete * keep_t[m].unsqueeze(-1), valid=valid_t[m], keep=keep_t[m],
                                  lengths=rows.lengths[m], keep_host=keep[m])
    fraction = host_to_device(drop_fraction(keep["text"], droppable).astype(np.float32), device)
    bert_observed = None
    if rows.text_bert is not None:
        bert_observed = rows.text_bert.clone()
        bert_observed[:, 0] = torch.where(sent[6], UNK_TOKEN_ID, rows.text_bert[:, 0])
    return Batch(text=inputs["text"], audio=inputs["audio"], vision=inputs["vision"], label=rows.label,
                 text_missing_fraction=fraction, text_bert_observed=bert_observed,
                 text_bert_complete=rows.text_bert if with_complete else None)


def make_batch(data: SplitTensors, rows: np.ndarray, missing: MissingSpec, *, seed: int,
               epoch: int | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, with_complete: bool = True) -> Batch:
    """Gather `rows` of a split onto `device` (default: the data's) and apply `missing`; no
    host sync (see `gather` and `apply_missing`)."""
    return apply_missing(gather(data, rows, device), missing, seed=seed, epoch=epoch, dtype=dtype,
                         with_complete=with_complete)


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
