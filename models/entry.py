"""What a model offers the rest of msa-search: its registry entry (DESIGN.md, "The model interface").

A model module (models/lnln.py, models/hrlf.py) defines one `ENTRY`; models/registry.py
lists them. The module built by `build(cfg, spec)` runs `forward(batch, progress)` and
`losses(outputs, batch, progress)`, which returns the named, unweighted loss terms; the
trainer weights them with `loss_weights(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from data_pipeline.schema import DataSpec

from .config import ModelConfig
from .space import Dist


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[[ModelConfig, DataSpec], nn.Module]
    loss_terms: dict[str, float]  # term -> default weight
    search_space: dict[str, Dist]  # dotted config key -> distribution
    adversarial_terms: tuple[str, ...] = ()  # weights held at 0 during adversarial warm-up
    # Every loss term is a mean of per-row terms and rows never interact (no batch-level
    # contrast or statistics): a split batch's size-weighted losses sum to the batch's, so
    # CPU training may run row chunks in parallel (search/row_parallel.py).
    rows_independent: bool = False
    # Checks of the model's options that need no data, run when the config is validated
    # (raises ValueError naming the key).
    check_config: Callable[[ModelConfig], None] | None = None

    def unknown_loss_terms(self, names) -> list[str]:
        return sorted(set(names) - set(self.loss_terms))

    def loss_weights(self, overrides: dict[str, float]) -> dict[str, float]:
        """The weight of every term: the defaults, overridden by `model.loss_weights`."""
        unknown = self.unknown_loss_terms(overrides)
        if unknown:
            raise ValueError(f"model.loss_weights: unknown term(s) {', '.join(unknown)} for model '{self.name}'; "
                             f"its terms are {', '.join(self.loss_terms)}")
        return {**self.loss_terms, **overrides}

    def build(self, cfg: ModelConfig, spec: DataSpec) -> nn.Module:
        return self.builder(cfg, spec)
