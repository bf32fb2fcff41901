"""Shapes of the real MSA datasets (spec/data.md); synthetic data must match them."""
from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "valid", "test")
EVALUATED_SPLITS = ("valid", "test")  # every epoch is evaluated on these
MODALITIES = ("text", "audio", "vision")
# Short names used in missing patterns ("inter:A+V"), in the order L, A, V.
MODALITY_LETTERS = {"text": "L", "audio": "A", "vision": "V"}


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    split_sizes: dict[str, int]
    text_len: int
    audio_len: int
    vision_len: int
    text_dim: int
    audio_dim: int
    vision_dim: int
    label_max: float  # labels lie in [-label_max, label_max]
    aligned: bool = False


PRESETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in (
        DatasetPreset("mosi", {"train": 1284, "valid": 229, "test": 686}, 50, 375, 500, 768, 5, 20, 3.0),
        DatasetPreset("mosi-aligned", {"train": 1284, "valid": 229, "test": 686}, 50, 50, 50, 768, 5, 20, 3.0,
                      aligned=True),
        DatasetPreset("mosei", {"train": 16326, "valid": 1871, "test": 4659}, 50, 500, 500, 768, 74, 35, 3.0),
        DatasetPreset("sims", {"train": 1368, "valid": 456, "test": 457}, 39, 400, 55, 768, 33, 709, 1.0),
    )
}


def get_preset(name: str) -> DatasetPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset preset '{name}'; allowed: {', '.join(PRESETS)}") from None
