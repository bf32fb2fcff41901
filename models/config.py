"""The `model` section of ExperimentConfig."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["lnln", "hrlf"] = "lnln"
    # Weights of the model's named loss terms; terms not given take the registry's defaults.
    loss_weights: dict[str, float] = Field(default_factory=dict)
    hidden_dim: int = Field(128, gt=0)
    num_heads: int = Field(8, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    text_encoder: Literal["features", "bert"] = "features"
    # Local directory of BERT weights (text_encoder: bert); never downloaded at run time.
    bert_path: str = ""
