"""Dropout that draws from a generator the caller gives, per thread.

torch's dropout (`nn.Dropout`, SDPA's `dropout_p`) takes no generator: threads would draw from
the one global generator in whatever order they run. The training step gives each row chunk
its own generator (search/row_parallel.py), so a run with dropout repeats bit for bit at a
fixed chunk count. Without a generator set, everything here is torch's own dropout.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_drawing = threading.local()


@contextmanager
def dropout_generator(generator: torch.Generator | None) -> Iterator[None]:
    """`Dropout` and `attend` in this thread draw their masks from `generator` (None: torch's
    global one). torch's dropout takes no generator, so threads would draw from the global one
    in whatever order they run; the training step gives each row chunk its own
    (search/row_parallel.py)."""
    previous = getattr(_drawing, "generator", None)
    _drawing.generator = generator
    try:
        yield
    finally:
        _drawing.generator = previous


def _dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout` (kept values scaled by 1 / (1 - p), identity in eval) from the thread's generator."""
    generator = getattr(_drawing, "generator", None)
    if generator is None or not training or p == 0:
        return F.dropout(x, p, training)
    # ATen's CPU dropout, step for step: the same generator state gives the same mask and values.
    return x * torch.empty_like(x).bernoulli_(1 - p, generator=generator).div_(1 - p)


class Dropout(nn.Module):
    """`nn.Dropout` drawing from the thread's `dropout_generator`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(x, self.p, self.training)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention`; with dropout under a `dropout_generator`, SDPA's CPU
    math kernel (what it runs with dropout) written out, as it draws from the global generator."""
    if dropout_p == 0 or getattr(_drawing, "generator", None) is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return written_attention(q, k, v, mask, dropout_p, scale)


def written_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                      dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """SDPA's CPU math kernel written out (matmuls, softmax, `_dropout`): what `attend` runs
    under a generator, and what search/population.py runs under vmap."""
    root = math.sqrt(q.shape[-1] ** -0.5 if scale is None else scale)  # on q and k, as that kernel
    weights = (q * root) @ (k * root).transpose(-2, -1)  # (B, h, N, M)
    if mask is not None:  # finite: a query with no key gets no NaN (every query here has one)
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
    return _dropout(weights.softmax(dim=-1), dropout_p) @ v
