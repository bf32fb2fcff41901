"""Summaries of a Parquet dataset for `msa-search data inspect`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Group
from rich.table import Table

from .presets import SPLITS
from .schema import DataSpec
from .store import read_spec

_BARS = " ▁▂▃▄▅▆▇█"


@dataclass
class SplitSummary:
    split: str
    samples: int
    label_mean: float
    label_std: float
    zero_labels: int
    histogram: np.ndarray  # counts per integer class (round(label)), -max..max
    mean_lengths: dict[str, float]


def summarize(store_dir: str | Path) -> tuple[DataSpec, list[SplitSummary]]:
    """Reads only the small columns (labels, lengths), so it is fast on any size."""
    store_dir = Path(store_dir)
    spec = read_spec(store_dir)
    summaries = []
    for split in SPLITS:
        path = store_dir / f"{split}.parquet"
        if not path.is_file():
            continue
        table = pq.read_table(path, columns=["label", "text_length", "audio_length", "vision_length"])
        labels = table.column("label").to_numpy()
        # 7 classes as Acc-7 counts them, labels rescaled so SIMS' [-1, 1] maps onto -3..3.
        classes = np.clip(np.round(labels * (3.0 / spec.label_max)), -3, 3)
        hist = np.array([(classes == c).sum() for c in range(-3, 4)])
        summaries.append(SplitSummary(
            split=split, samples=table.num_rows, label_mean=float(labels.mean()), label_std=float(labels.std()),
            zero_labels=int((labels == 0).sum()), histogram=hist,
            mean_lengths={m: float(table.column(f"{m}_length").to_numpy().mean()) for m in ("text", "audio", "vision")},
        ))
    return spec, summaries


def sparkline(counts: np.ndarray) -> str:
    top = max(int(counts.max()), 1)
    return "".join(_BARS[int(round(c / top * (len(_BARS) - 1)))] for c in counts)


def render(spec: DataSpec, summaries: list[SplitSummary]) -> Group:
    title = (f"{spec.name}: text {spec.text_len}x{spec.text_dim}, audio {spec.audio_len}x{spec.audio_dim}, "
             f"vision {spec.vision_len}x{spec.vision_dim}, labels [{spec.label_min:g}, {spec.label_max:g}]"
             f"{', text_bert ids' if spec.has_text_bert else ''}")
    splits = Table(title=title, title_justify="left")
    for col in ("split", "samples", "mean len L/A/V", "label mean±std", "zero labels"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for s in summaries:
        lengths = "/".join(f"{s.mean_lengths[m]:.0f}" for m in ("text", "audio", "vision"))
        splits.add_row(s.split, str(s.samples), lengths, f"{s.label_mean:+.2f}±{s.label_std:.2f}", str(s.zero_labels))
    scale = "" if spec.label_max == 3 else f" (labels x{3 / spec.label_max:g})"
    histogram = Table(title=f"label histogram, rounded to -3..3{scale}", title_justify="left")
    histogram.add_column("split")
    histogram.add_column("shape")
    for c in range(-3, 4):
        histogram.add_column(f"{c:+d}" if c else "0", justify="right")
    for s in summaries:
        histogram.add_row(s.split, sparkline(s.histogram), *(str(int(c)) for c in s.histogram))
    return Group(splits, histogram)
