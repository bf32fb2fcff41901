"""Config sections owned by the data layer (part of search.config.ExperimentConfig)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .missing import Pattern, TrainingMissing, default_eval_grid, parse_pattern


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Literal["mosi", "mosi-aligned", "mosei", "sims"] = "mosi"
    # A Parquet dataset dir or an MMSA pickle; empty = synthesize `preset` at `scale`.
    path: str = ""
    scale: float = Field(1.0, gt=0)
    synth_seed: int = 0


class MissingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Seed of every mask (evaluation and training): independent of train.seed, so all
    # trials of a search are evaluated on the very same incomplete inputs.
    seed: int = 1111
    eval_grid: list[str] = Field(default_factory=default_eval_grid)
    # None: the model's own (its registry entry's train_missing: lnln for LNLN, mixture for
    # HRLF), filled in when the experiment config is validated.
    train_mode: Literal["lnln", "fixed", "mixture"] | None = None
    train_rate: float = Field(0.5, ge=0, le=1)
    inter_fraction: float = Field(0.3, ge=0, le=1)

    @field_validator("eval_grid")
    @classmethod
    def _patterns(cls, grid: list[str]) -> list[str]:
        names = [parse_pattern(p).name for p in grid]
        if not names:
            raise ValueError("the evaluation grid needs at least one pattern")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate patterns in {grid}")
        return names

    def patterns(self) -> list[Pattern]:
        return [parse_pattern(p) for p in self.eval_grid]

    def training(self) -> TrainingMissing:
        return TrainingMissing(self.train_mode or "lnln", self.train_rate, self.inter_fraction)
