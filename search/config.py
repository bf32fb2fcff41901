"""ExperimentConfig: the one typed config, built from YAML + `--set key=value` overrides.

Validated once at the edge (the CLI); every layer below receives its typed section.
Errors name the key path and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_pipeline.config import DataConfig, MissingConfig
from data_pipeline.errors import MsaSearchError
from data_pipeline.missing import default_eval_grid, parse_pattern
from models.metrics import SIMS_METRIC_NAMES
from models.config import ModelConfig

# Patterns held out of the search objective: the report shows whether the search overfit.
HELD_OUT_PATTERNS = ("intra:0.9", "inter:L+V")


class ConfigError(MsaSearchError):
    pass


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    workers: int = Field(0, ge=0)  # 0 = train in-process; >= 1: Ray Train workers
    cpus_per_worker: float = Field(1.0, gt=0)  # fractional on a small box
    engine: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1111
    checkpoint_every: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=0)  # worker failures Ray Train recovers from (from the last checkpoint)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads of in-process training (0 = torch's default). Thread count changes float
    # summation order, so reproducing a number exactly needs the same count.
    threads: int = Field(0, ge=0)
    # CPU training: split each batch into this many row chunks, one thread each (exact for
    # models whose losses are per-row means, e.g. LNLN). 0 = auto: the thread count where
    # that is exact and deterministic (no dropout, one discriminator step), else 1 = off.
    batch_chunks: int = Field(0, ge=0)
    # Test hook: make the loss NaN at the first step (the run must end with a clear reason).
    inject_nan: bool = False


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    objective: str = "robust_f1"
    objective_patterns: list[str] = Field(
        default_factory=lambda: [p for p in default_eval_grid() if p not in HELD_OUT_PATTERNS])
    # Multi-objective search (>= 2 names, same syntax as `objective`, e.g. [f1_non0@intra:0.0,
    # robust_f1]): Optuna optimizes all, export writes the Pareto front; needs scheduler none.
    objectives: list[str] = Field(default_factory=list)
    sampler: Literal["tpe", "random", "cmaes", "nsga2"] = "tpe"
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    # PBT: epochs between exploit/explore steps (loss weights and GRL lambda_max mutate).
    pbt_interval: int = Field(1, ge=1)
    time_budget_s: float | None = None
    # Stop starting and running trials once this many trial-epochs have been reported.
    max_trial_epochs: int | None = Field(None, ge=1)
    seed: int = 0
    max_failures: int = Field(0, ge=0)
    cpus_per_trial: float = Field(1.0, gt=0)  # train.workers = 0: the trial's own CPUs
    # Test hook: the trial that starts n-th (0-based) gets train.inject_nan (its loss is NaN).
    nan_trial: int | None = None
    # Overrides of the model's registry search space, e.g. {"train.lr": {"loguniform": [1e-5, 1e-3]}}.
    space: dict[str, Any] = Field(default_factory=dict)

    @field_validator("objective")
    @classmethod
    def _objective(cls, name: str) -> str:
        if name in ("robust_f1", "worst_f1"):
            return name
        metric, _, pattern = name.partition("@")
        if metric not in SIMS_METRIC_NAMES:
            raise ValueError(f"unknown objective '{name}'; allowed: robust_f1, worst_f1, a metric "
                             f"({', '.join(SIMS_METRIC_NAMES)}) or <metric>@<pattern>, e.g. f1_non0@intra:0.0")
        if pattern:
            parse_pattern(pattern)
        return name

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, names: list[str]) -> list[str]:
        if len(names) == 1:
            raise ValueError("give two or more objectives for a multi-objective search (or use search.objective)")
        return [cls._objective(n) for n in names]

    @model_validator(mode="after")
    def _multi_objective_scheduler(self):
        if self.objectives and self.scheduler != "none":
            raise ValueError("a multi-objective search (search.objectives) needs search.scheduler: none; "
                             "ASHA and PBT rank trials by one metric")
        return self

    @field_validator("objective_patterns")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        return [parse_pattern(p).name for p in patterns]

    @property
    def mode(self) -> str:
        """Lower is better only for the error metric."""
        return objective_mode(self.objective)


def objective_mode(name: str) -> str:
    return "min" if name.partition("@")[0] == "mae" else "max"


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str = "runs/experiment"


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig)
    missing: MissingConfig = Field(default_factory=MissingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (None if loc crosses a dict)."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        owner = _section_model(loc)
        allowed = ", ".join(owner.model_fields) if owner else "see the docs"
        return f"config key '{path}': unknown key; allowed keys here: {allowed}"
    got = error.get("input")
    message = error["msg"]
    if error["type"].startswith("value_error"):
        message = message.removeprefix("Value error, ")
    return f"config key '{path}': {message} (got {got!r})"


def validate_config(raw: dict, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (3, 1e-4, [a, b], true)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set '{assignment}': expected key=value, e.g. train.epochs=5")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set '{assignment}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set '{assignment}': value is not valid YAML ({exc.problem})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults), apply overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, found {type(loaded).__name__}")
        raw = loaded or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, source)
