"""Summaries of a Parquet dataset or an MMSA pickle for `msa-search data inspect`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Group
from rich.table import Table

from .mmsa import read_mmsa
from .presets import MODALITIES, SPLITS
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


def summarize(source: str | Path, dataset: str | None = None) -> tuple[DataSpec, list[SplitSummary]]:
    """A Parquet dataset directory: reads only the small columns (labels, lengths), so it is
    fast on any size. An MMSA pickle: validated and read whole, as `data convert` reads it
    (`dataset` as its --dataset), nothing written."""
    source = Path(source)
    if source.is_file():
        data = read_mmsa(source, dataset)
        return data.spec, [_summary(name, split.labels, {m: getattr(split, f"{m}_lengths") for m in MODALITIES},
                                    data.spec) for name, split in data.splits.items()]
    spec = read_spec(source)
    summaries = []
    for split in SPLITS:
        path = source / f"{split}.parquet"
        if not path.is_file():
            continue
        table = pq.read_table(path, columns=["label", *(f"{m}_length" for m in MODALITIES)])
        summaries.append(_summary(split, table.column("label").to_numpy(),
                                  {m: table.column(f"{m}_length").to_numpy() for m in MODALITIES}, spec))
    return spec, summaries


def _summary(split: str, labels: np.ndarray, lengths: dict[str, np.ndarray], spec: DataSpec) -> SplitSummary:
    # 7 classes as Acc-7 counts them, labels rescaled so SIMS' [-1, 1] maps onto -3..3.
    classes = np.clip(np.round(labels * (3.0 / spec.label_max)), -3, 3)
    hist = np.array([(classes == c).sum() for c in range(-3, 4)])
    return SplitSummary(split=split, samples=len(labels), label_mean=float(labels.mean()),
                        label_std=float(labels.std()), zero_labels=int((labels == 0).sum()), histogram=hist,
                        mean_lengths={m: float(l.mean()) for m, l in lengths.items()})


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
