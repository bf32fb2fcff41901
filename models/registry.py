"""The model registry: name -> builder, loss terms with default weights, search space.

Everything the trainer and the search know about a model comes from its entry here.
Adding a model = one file + one `register(...)` call; nothing in search/ changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import nn

from data_pipeline.schema import DataSpec

from .config import ModelConfig


@dataclass(frozen=True)
class Dist:
    """One dimension of a search space, as data (the search turns it into a Tune/Optuna domain)."""

    kind: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self):
        if self.kind == "choice":
            if not self.choices:
                raise ValueError("a choice needs at least one value")
        elif self.low is None or self.high is None or not self.low <= self.high:
            raise ValueError(f"{self.kind} needs low <= high, got [{self.low}, {self.high}]")
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")

    @classmethod
    def parse(cls, raw: Any) -> "Dist":
        """From config data: {"uniform": [lo, hi]}, {"loguniform": [lo, hi]}, {"int": [lo, hi]},
        {"choice": [a, b, ...]}, or a plain value (the dimension is fixed)."""
        if isinstance(raw, Dist):
            return raw
        if isinstance(raw, dict) and len(raw) == 1:
            (kind, args), = raw.items()
            if kind == "choice" and isinstance(args, list):
                return cls("choice", choices=tuple(args))
            if kind in ("uniform", "loguniform", "int") and isinstance(args, list) and len(args) == 2:
                return cls(kind, float(args[0]) if kind != "int" else int(args[0]),
                           float(args[1]) if kind != "int" else int(args[1]))
            raise ValueError(f"bad search dimension {raw!r}: {kind} expects [low, high]" if kind != "choice"
                             else f"bad search dimension {raw!r}: choice expects a list")
        if isinstance(raw, dict):
            raise ValueError(f"bad search dimension {raw!r}: expected one of uniform, loguniform, int, choice")
        return cls("choice", choices=(raw,))

    def to_data(self) -> dict:
        return {"choice": list(self.choices)} if self.kind == "choice" else {self.kind: [self.low, self.high]}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[[ModelConfig, DataSpec], nn.Module]
    loss_terms: dict[str, float]  # term -> default weight
    search_space: dict[str, Dist]  # dotted config key -> distribution
    adversarial_terms: tuple[str, ...] = ()  # weights held at 0 during adversarial warm-up
    selection_metric: str = "robust_f1"
    description: str = ""
    # Every loss term is a mean of per-row terms and rows never interact (no batch-level
    # contrast or statistics): a split batch's size-weighted losses sum to the batch's, so
    # CPU training may run row chunks in parallel (search/row_parallel.py).
    rows_independent: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def loss_weights(self, overrides: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(overrides) - set(self.loss_terms))
        if unknown:
            raise ValueError(f"model.loss_weights: unknown term(s) {', '.join(unknown)} for model '{self.name}'; "
                             f"its terms are {', '.join(self.loss_terms)}")
        return {**self.loss_terms, **overrides}

    def build(self, cfg: ModelConfig, spec: DataSpec) -> nn.Module:
        return self.builder(cfg, spec)


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model '{entry.name}' is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def get_model(name: str) -> ModelEntry:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


# Shared dimensions: both models use the same GRL schedule knobs and optimizer knobs.
ADVERSARIAL_SPACE = {
    "model.adversarial.schedule": Dist("choice", choices=("constant", "linear", "dann")),
    "model.adversarial.lambda_max": Dist("loguniform", 0.05, 2.0),
    "model.adversarial.warmup_epochs": Dist("int", 0, 3),
    "model.adversarial.disc_steps": Dist("int", 1, 3),
}
OPTIMIZER_SPACE = {
    "train.lr": Dist("loguniform", 1e-5, 2e-3),
    "train.weight_decay": Dist("loguniform", 1e-6, 1e-2),
    "model.dropout": Dist("uniform", 0.0, 0.3),
}


def _load_builtin() -> None:
    # Imported lazily so that importing the registry does not import every model.
    if "lnln" not in _REGISTRY:
        from . import lnln  # noqa: F401  (registers itself)
    if "hrlf" not in _REGISTRY:
        try:
            from . import hrlf  # noqa: F401
        except ImportError:  # HRLF arrives in its own issue
            pass
