"""One read-only copy of a store's splits per node, shared by the trials and ranks on it.

`load_splits` in every Tune trial and every Ray Train rank holds one copy of the data per
process: an in-process LNLN trial on full MOSI peaked at 2.0 GB resident, and MOSEI has ten
times the samples. Instead the driver reads the store once and puts each split's arrays,
already in their final dtypes, into Ray's object store; a trial or rank `ray.get`s them and
Ray returns numpy arrays that point into the node's shared memory (read-only, no copy). Ray
copies an object to another node once, at the first get there: one copy per node.

Without Ray (in-process `msa-search train`) callers use `load_splits` as before.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from data_pipeline.loader import SplitTensors, load_split
from data_pipeline.presets import SPLITS
from data_pipeline.schema import DataSpec
from data_pipeline.store import read_spec

if TYPE_CHECKING:
    from ray import ObjectRef

_NOT_WRITABLE = "The given NumPy array is not writable"
# Reported by every trial and rank: the private host memory its splits took (about 0 when
# they are the node's shared copy; the whole dataset when a process holds its own).
DATA_PRIVATE_MB = "memory/data_private_mb"


@dataclass(frozen=True)
class _SplitBuffers:
    """A split's `SplitTensors` as numpy arrays: what one object in the store holds."""

    ids: np.ndarray  # (N,) str
    keys: np.ndarray  # (N,) uint64
    labels: np.ndarray  # (N,) float32
    features: dict[str, np.ndarray]  # modality -> (N, T, d) float32
    lengths: dict[str, np.ndarray]  # modality -> (N,) int64
    text_bert: np.ndarray | None  # (N, 3, L) int64

    @classmethod
    def of(cls, split: SplitTensors) -> "_SplitBuffers":
        # Views of the tensors (`Tensor.numpy()`): the put copies them once, into the store.
        return cls(ids=split.ids, keys=split.keys, labels=split.labels.numpy(),
                   features={m: t.numpy() for m, t in split.features.items()}, lengths=dict(split.lengths),
                   text_bert=None if split.text_bert is None else split.text_bert.numpy())


@dataclass(frozen=True)
class SharedSplits:
    """A store's splits in Ray's object store. Small and picklable (object refs, not data):
    pass it in a Tune trainable's parameters or a Ray Train loop config. The objects live as
    long as the driver (their owner) or any trial or rank still holds a handle."""

    store: str  # where the splits were read, for messages
    spec: DataSpec
    refs: dict[str, "ObjectRef"]  # split -> ObjectRef of its _SplitBuffers

    def load_measured(self) -> tuple[dict[str, SplitTensors], float]:
        """`load()`, and the private memory (MB) it took in this process (`DATA_PRIVATE_MB`)."""
        before = private_memory_mb()
        splits = self.load()
        return splits, private_memory_mb() - before

    def load(self) -> dict[str, SplitTensors]:
        """Every split as `SplitTensors` whose tensors are the object store's pages (no copy)."""
        import ray

        buffers = ray.get(list(self.refs.values()))
        return {split: _split_tensors(self.spec, split, b) for split, b in zip(self.refs, buffers)}


def private_memory_mb() -> float:
    """This process's unique set size: pages no other process maps, so the object store's
    shared pages never count (resident size would count them in every process)."""
    import psutil

    return psutil.Process().memory_full_info().uss / 2**20


def share_splits(store_dir: str | Path) -> SharedSplits:
    """Read every split of the store once (in the driver) and put it into Ray's object store."""
    import ray

    if not ray.is_initialized():
        # ray.put would start a private cluster of its own, which no trial would see.
        raise RuntimeError("share_splits needs a running Ray (search.ray_setup.ensure_ray); "
                           "without Ray, load the store with data_pipeline.loader.load_splits")
    spec = read_spec(store_dir)
    # One split at a time: the driver holds at most one split outside the store.
    refs = {split: ray.put(_SplitBuffers.of(load_split(store_dir, split, spec))) for split in SPLITS}
    # Arrow's allocator keeps the freed Parquet tables for reuse (measured on MOSI shapes:
    # about as much again as the data); the driver reads nothing more, so give them back.
    pa.default_memory_pool().release_unused()
    return SharedSplits(store=str(store_dir), spec=spec, refs=refs)


def _split_tensors(spec: DataSpec, split: str, buffers: _SplitBuffers) -> SplitTensors:
    # The arrays are read-only views of the node's shared object store, and torch.from_numpy
    # warns that it cannot make a tensor read-only. Sharing them is safe because nothing
    # writes to a split's tensors: batches are index_select gathers (new tensors), and masks
    # multiply those copies, never the split.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        return SplitTensors(
            spec=spec, split=split, ids=buffers.ids, keys=buffers.keys, labels=torch.from_numpy(buffers.labels),
            features={m: torch.from_numpy(a) for m, a in buffers.features.items()}, lengths=dict(buffers.lengths),
            text_bert=None if buffers.text_bert is None else torch.from_numpy(buffers.text_bert),
        )
