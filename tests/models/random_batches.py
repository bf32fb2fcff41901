"""Random model-test batches: random features and lengths, valid positions dropped at a rate."""
from __future__ import annotations

import torch

from data_pipeline.loader import Batch, ModalityInput
from data_pipeline.presets import MODALITIES
from data_pipeline.schema import DataSpec


def random_batch(spec: DataSpec, size: int, *, seed: int = 0, rate: float = 0.5,
                 untouched_row: int | None = None) -> Batch:
    """Row 0 is full length in every modality; each valid position is dropped with
    probability `rate`, except in `untouched_row` (a row that missing leaves complete)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for m in MODALITIES:
        n, d = spec.seq_len(m), spec.dim(m)
        lengths = torch.randint(2, n + 1, (size,), generator=g)
        lengths[0] = n
        valid = torch.arange(n)[None, :] < lengths[:, None]
        keep = valid & (torch.rand(size, n, generator=g) >= rate)
        if untouched_row is not None:
            keep[untouched_row] = valid[untouched_row]
        complete = torch.randn(size, n, d, generator=g) * valid[..., None]
        inputs[m] = ModalityInput(complete=complete, observed=complete * keep[..., None], valid=valid, keep=keep)
    text = inputs["text"]
    fraction = 1.0 - text.keep.sum(1) / text.valid.sum(1)
    return Batch(text=text, audio=inputs["audio"], vision=inputs["vision"],
                 label=torch.randn(size, generator=g) * 2, text_missing_fraction=fraction.float())
