"""Search-space types: one dimension of a model's search space, as data.

The registry holds each model's space as `dotted config key -> Dist`; search/space.py turns
it into Tune/Optuna domains. Kept apart from the registry (as optuna keeps its
distributions apart from its samplers) so that config validation and the search can read
spaces without knowing how models are registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Dist:
    """One dimension: a uniform, log-uniform or integer range (bounds inclusive) or a choice."""

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
                number = int if kind == "int" else float
                return cls(kind, number(args[0]), number(args[1]))
            raise ValueError(f"bad search dimension {raw!r}: {kind} expects [low, high]" if kind != "choice"
                             else f"bad search dimension {raw!r}: choice expects a list")
        if isinstance(raw, dict):
            raise ValueError(f"bad search dimension {raw!r}: expected one of uniform, loguniform, int, choice")
        return cls("choice", choices=(raw,))

    def samples(self) -> list[Any]:
        """The values that bound this dimension: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def to_data(self) -> dict:
        return {"choice": list(self.choices)} if self.kind == "choice" else {self.kind: [self.low, self.high]}


# Dimensions both models search: the gradient-reversal schedule and the optimizer.
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
