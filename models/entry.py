"""What a model offers the rest of msa-search: its registry entry (DESIGN.md, "The model interface").

A model module (models/lnln.py, models/hrlf.py) defines one `ENTRY`; models/registry.py
lists them. The module built by `build(cfg, spec)` runs `forward(batch, progress)` and
`losses(outputs, batch, progress)`, which returns the named, unweighted loss terms; the
trainer weights them with `loss_weights(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from data_pipeline.schema import DataSpec

from .config import ModelConfig
from .space import Dist


def dataset_family(name: str) -> str:
    """mosi, mosei or sims, from a dataset or preset name (mosi-aligned -> mosi)."""
    return name.split("-")[0]


@dataclass(frozen=True)
class ReferenceCheckpoints:
    """Checkpoints of a model's reference code (its authors' names for the weights) load
    through a name mapping: `train --init-from` and `evaluate` take them as they take ours."""

    source: str  # the reference code, for messages
    detect: Callable[[Mapping[str, Any]], bool]  # whether a state dict has the reference's names
    # (state dict, our module, on_skip) -> our state dict; ValueError naming a tensor that does not fit.
    convert: Callable[..., dict]


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
    # Default weights that differ by dataset family (mosi, mosei, sims): family -> term -> weight.
    dataset_loss_terms: dict[str, dict[str, float]] = field(default_factory=dict)
    # The model's training missing distribution (missing.train_mode when the config leaves it unset).
    train_missing: str = "lnln"
    reference_checkpoints: ReferenceCheckpoints | None = None

    def unknown_loss_terms(self, names) -> list[str]:
        return sorted(set(names) - set(self.loss_terms))

    def loss_weights(self, overrides: dict[str, float], dataset: str = "") -> dict[str, float]:
        """The weight of every term: the defaults (the dataset family's where they differ),
        overridden by `model.loss_weights`."""
        unknown = self.unknown_loss_terms(overrides)
        if unknown:
            raise ValueError(f"model.loss_weights: unknown term(s) {', '.join(unknown)} for model '{self.name}'; "
                             f"its terms are {', '.join(self.loss_terms)}")
        return {**self.loss_terms, **self.dataset_loss_terms.get(dataset_family(dataset), {}), **overrides}

    def build(self, cfg: ModelConfig, spec: DataSpec) -> nn.Module:
        return self.builder(cfg, spec)
