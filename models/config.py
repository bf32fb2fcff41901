"""The `model` section of ExperimentConfig."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AdversarialConfig(BaseModel):
    """Gradient-reversal schedule shared by LNLN's effectiveness discriminator and HRLF's HAL."""

    model_config = ConfigDict(extra="forbid")

    # lambda(progress): constant lambda_max, a linear ramp, or DANN's 2/(1+exp(-gamma p)) - 1.
    schedule: Literal["constant", "linear", "dann"] = "constant"
    lambda_max: float = Field(1.0, ge=0)
    gamma: float = Field(10.0, gt=0)
    # Epochs at the start with the adversarial terms' weights at 0.
    warmup_epochs: int = Field(0, ge=0)
    # Discriminator updates per generator update (extra ones train the discriminator alone).
    disc_steps: int = Field(1, ge=1)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["lnln", "hrlf"] = "lnln"
    # Weights of the model's named loss terms; terms not given take the registry's defaults.
    loss_weights: dict[str, float] = Field(default_factory=dict)
    hidden_dim: int = Field(128, gt=0)
    num_heads: int = Field(8, gt=0)
    dim_head: int = Field(64, gt=0)
    mlp_dim: int = Field(128, gt=0)
    tokens: int = Field(8, gt=0)  # learnable tokens per modality
    depth: int = Field(2, gt=0)  # Transformer depth of encoders
    fusion_depth: int | None = Field(None, gt=0)  # None: 2 for MOSI, 4 for MOSEI/SIMS (LNLN)
    dropout: float = Field(0.0, ge=0, lt=1)
    task_loss: Literal["mse", "l1"] = "mse"
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    text_encoder: Literal["features", "bert"] = "features"
    # Local directory of BERT weights (text_encoder: bert); never downloaded at run time.
    bert_path: str = ""
