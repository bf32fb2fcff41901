"""In-memory form of a dataset: one record of arrays per split, plus its shape description."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .presets import SPLITS

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about a dataset: dims, sequence lengths, label range."""

    name: str
    text_len: int
    audio_len: int
    vision_len: int
    text_dim: int
    audio_dim: int
    vision_dim: int
    label_min: float
    label_max: float
    has_text_bert: bool
    # BERT-style text: the first and last valid positions are [CLS]/[SEP], never dropped.
    text_special_tokens: bool
    split_sizes: dict[str, int] = field(default_factory=dict)

    def dim(self, modality: str) -> int:
        return getattr(self, f"{modality}_dim")

    def seq_len(self, modality: str) -> int:
        return getattr(self, f"{modality}_len")

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict) -> "DataSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class SplitArrays:
    """One split, N samples. Padded positions (beyond a sample's length) are zero."""

    ids: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) float32
    text: np.ndarray  # (N, L, d_t) float32
    audio: np.ndarray  # (N, T_a, d_a) float32
    vision: np.ndarray  # (N, T_v, d_v) float32
    text_lengths: np.ndarray  # (N,) int32
    audio_lengths: np.ndarray  # (N,) int32
    vision_lengths: np.ndarray  # (N,) int32
    text_bert: np.ndarray | None = None  # (N, 3, L) int32: ids, attention mask, token types
    unimodal_labels: dict[str, np.ndarray] | None = None  # SIMS: {"T": (N,), "A": ..., "V": ...}
    raw_text: np.ndarray | None = None  # (N,) str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class MSADataset:
    spec: DataSpec
    splits: dict[str, SplitArrays]

    def split(self, name: str) -> SplitArrays:
        if name not in self.splits:
            raise KeyError(f"dataset '{self.spec.name}' has no split '{name}'; it has {', '.join(self.splits)}")
        return self.splits[name]


def spec_for(name: str, splits: dict[str, SplitArrays], label_range: tuple[float, float]) -> DataSpec:
    """Derive the DataSpec from the arrays themselves (all splits share dims, checked by readers)."""
    first = splits[SPLITS[0]]
    return DataSpec(
        name=name,
        text_len=first.text.shape[1],
        audio_len=first.audio.shape[1],
        vision_len=first.vision.shape[1],
        text_dim=first.text.shape[2],
        audio_dim=first.audio.shape[2],
        vision_dim=first.vision.shape[2],
        label_min=float(label_range[0]),
        label_max=float(label_range[1]),
        has_text_bert=first.text_bert is not None,
        text_special_tokens=first.text_bert is not None,
        split_sizes={s: len(a) for s, a in splits.items()},
    )
