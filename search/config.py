"""ExperimentConfig: the one typed config, built from YAML + `--set key=value` overrides.

Validated once at the edge (the CLI); every layer below receives its typed section.
Errors name the key path and what is allowed.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from data_pipeline.config import DataConfig, MissingConfig
from data_pipeline.errors import MsaSearchError
from data_pipeline.missing import parse_pattern
from models.config import ModelConfig
from models.metrics import SIMS_METRIC_NAMES, metric_names
from models.registry import get_model
from models.space import Dist

from .objective import check_objective, default_objective_patterns, objective_mode
from .storage import check_output_storage, check_study_url

# Validation context of a config the driver checked already (a trial's, a worker's): its
# search space is not resolved again.
TRIAL_CONTEXT = {"trial": True}
# A config read back to look at its results (status, export, report) on a machine that may
# not train it: the model's environment checks (e.g. a local BERT directory) are skipped.
STORED_CONTEXT = {"stored": True}


class ConfigError(MsaSearchError):
    """A config the CLI refuses before anything starts (exit code 2)."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    # Rows per evaluation forward pass (no gradients, so larger than training's). None: at
    # least 128 on a CPU, 1024 on a GPU, where fewer, larger launches cut LNLN's evaluation
    # 2.3-3.7x (H200, bench/gpu_check.sh --eval-batch-sizes; README "GPU check").
    eval_batch_size: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    workers: int = Field(0, ge=0)  # 0 = train in-process; >= 1: Ray Train workers
    cpus_per_worker: float = Field(1.0, gt=0)  # fractional on a small box
    engine: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = Field(0, ge=0, le=3)
    # bf16: autocast on every path (in-process, DDP, DeepSpeed's torch_autocast): fp32 weights,
    # gradients, labels and losses. fp16: DeepSpeed's fp16 engine (half weights, dynamic loss
    # scaling), GPU and train.workers >= 1 only.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1111
    # `msa-search train`: one run per seed (train.seed set to each) in output.dir as a seed
    # group (search/seed_group.py), as the papers train seeds 1111-1113. Empty: one run with
    # train.seed. A search trains each trial with train.seed only.
    seeds: list[StrictInt] = Field(default_factory=list)
    checkpoint_every: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=0)  # worker failures Ray Train recovers from (from the last checkpoint)
    # auto: GPUs where the cluster (or, without Ray, this process) has them. The driver decides
    # once (search/devices.py); trials and workers use the GPU Ray assigns them.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # When an epoch evaluates the test grid (the valid grid, which the objective reads, runs
    # every epoch): every; improved (epochs that improve the trial's best objective, and every
    # epoch where the trial may end); end (only where it may end: its last epoch, ASHA's
    # rungs); deferred (a search's trials: only after the last epoch, train.epochs; trials that
    # stop before it get theirs after the search from their last checkpoint, the best
    # search.test_top of them). auto: improved in a search's trials, every for `train`.
    # search/evaluation_plan.py.
    eval_test: Literal["auto", "every", "improved", "end", "deferred"] = "auto"
    # CUDA only: TF32 matmuls (several times the fp32 rate on Ampere+, ~1e-3 relative error).
    tf32: bool = False
    # Bit-for-bit repeatable GPU runs (deterministic kernels, attention on SDPA's math
    # kernel): several times slower attention. CPU runs repeat without it.
    deterministic: bool = False
    # CPU threads of in-process training (0 = torch's default). Thread count changes float
    # summation order, so reproducing a number exactly needs the same count.
    threads: int = Field(0, ge=0)
    # CPU training: split each batch into this many row chunks, one thread each (exact for
    # models whose losses are per-row means, e.g. LNLN; each chunk's dropout draws from its
    # own generator). 0 = auto: the thread count where that is exact and deterministic (one
    # discriminator step, no BERT text encoder), else 1 = off.
    batch_chunks: int = Field(0, ge=0)
    # Test hook: make the loss NaN at the first step (the run must end with a clear reason).
    inject_nan: bool = False

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        negative = [s for s in seeds if s < 0]
        if negative:
            raise ValueError(f"seeds are non-negative integers; {negative[0]} is not")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seeds must be distinct; {', '.join(map(str, repeated))} given more than once")
        return seeds

    def eval_rows(self, device: "torch.device | str") -> int:
        """Rows per evaluation forward pass on `device` (see eval_batch_size)."""
        floor = 1024 if str(device).startswith("cuda") else 128
        return self.eval_batch_size or max(self.batch_size, floor)


class TPEConfig(BaseModel):
    """Options of Optuna's TPE sampler (search.sampler: tpe); Optuna's own defaults."""

    model_config = ConfigDict(extra="forbid")

    # Random trials before TPE models the results.
    n_startup_trials: int = Field(10, ge=0)
    # One joint density over all parameters instead of one per parameter (loss weights interact).
    multivariate: bool = False
    # Trials still running count as if they had scored badly, so concurrent trials spread out.
    constant_liar: bool = False


class GPConfig(BaseModel):
    """Options of Optuna's Gaussian-process sampler (search.sampler: gp); Optuna's own defaults."""

    model_config = ConfigDict(extra="forbid")

    # Random trials before the GP models the results. 4 instead of 10 reached the target later
    # in each of 4 seeds on quick.yaml's space (bench/search_efficiency.py; README, Benchmarks).
    n_startup_trials: int = Field(10, ge=0)


class ASHAConfig(BaseModel):
    """Ray's ASHA (search.scheduler: asha), one bracket: a trial may be stopped after epochs
    grace_period * reduction_factor**k, where it is not in the best 1 / reduction_factor of the
    trials that reached that epoch."""

    model_config = ConfigDict(extra="forbid")

    # The first epoch where a trial may be stopped. Early ranks can say little about final ones:
    # on quick.yaml's synthetic data, robust F1 at epochs 1-3 ranks trials with Spearman 0.37-0.47
    # against epoch 6, epoch 4 with 0.82 (bench/search_efficiency.py, landscape.*). Stopping
    # before ranks settle stops good trials about as often as bad ones.
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    # search/objective.py: robust_f1, worst_f1, <metric> or <metric>@<pattern>, on the valid split.
    objective: str = "robust_f1"
    # None: missing.eval_grid minus the held-out patterns (filled in when the config is validated).
    objective_patterns: list[str] | None = None
    # Multi-objective search (>= 2 names, same syntax as `objective`, e.g. [f1_non0@intra:0.0,
    # robust_f1]): Optuna optimizes all, export writes the Pareto front; needs scheduler none.
    objectives: list[str] = Field(default_factory=list)
    # gp: Optuna's Gaussian-process sampler; it fits a GP to the finished trials at every ask
    # (~0.1-0.25 s per trial up to 200 trials on one CPU core) and counts running trials as
    # pending. The default: at 120 trial-epochs of quick.yaml's space, GP + ASHA reached the
    # target in a median 60 trial-epochs (191 s) against TPE + ASHA's 87 (296 s), 3 seeds
    # interleaved (bench/search_efficiency.py; README, Benchmarks).
    sampler: Literal["gp", "tpe", "random", "cmaes", "nsga2"] = "gp"
    tpe: TPEConfig = Field(default_factory=TPEConfig)
    gp: GPConfig = Field(default_factory=GPConfig)
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    asha: ASHAConfig = Field(default_factory=ASHAConfig)
    # PBT: epochs between exploit/explore steps (loss weights and GRL lambda_max mutate).
    pbt_interval: int = Field(1, ge=1)
    time_budget_s: float | None = None
    # Stop starting and running trials once this many trial-epochs have been reported.
    max_trial_epochs: int | None = Field(None, ge=1)
    seed: int = 0
    max_failures: int = Field(0, ge=0)
    cpus_per_trial: float = Field(1.0, gt=0)  # train.workers = 0: the trial's own CPUs
    # train.workers = 0: the GPU share Ray reserves per trial (0.25: four trials share a GPU).
    # None = auto: 1 where the cluster has GPUs and train.device is not cpu, else 0.
    gpus_per_trial: float | None = Field(None, ge=0)
    # train.eval_test: deferred: how many trials, best first as `status` ranks them, get the
    # test grid after the search where they stopped before their last epoch (search/deferred_test.py).
    test_top: int = Field(5, ge=0)
    # Test hook: the trial that starts n-th (0-based) gets train.inject_nan (its loss is NaN).
    nan_trial: int | None = None
    # Overrides of the model's registry search space, e.g. {"train.lr": {"loguniform": [1e-5, 1e-3]}}.
    space: dict[str, Any] = Field(default_factory=dict)
    # The Optuna study's database, an SQLAlchemy URL without a password (search/storage.py);
    # empty: SQLite in the experiment directory.
    storage: str = ""

    def _options_by_sampler(self) -> dict[str, BaseModel]:
        return {"tpe": self.tpe, "gp": self.gp}

    def sampler_options(self) -> dict[str, Any]:
        """The keyword arguments of `sampler`'s Optuna class that search.<sampler> sets."""
        options = self._options_by_sampler().get(self.sampler)
        return options.model_dump() if options is not None else {}

    @model_validator(mode="after")
    def _sampler_options_need_their_sampler(self) -> "SearchConfig":
        # Options of a sampler that is not used would be ignored without a word.
        for name, options in self._options_by_sampler().items():
            title = name.upper()
            defaults = type(options)().model_dump()
            changed = [f"search.{name}.{k}" for k, v in options.model_dump().items() if v != defaults[k]]
            if self.sampler != name and changed:
                which, them = ("sets an option", "it") if len(changed) == 1 else ("set options", "them")
                raise ValueError(f"{', '.join(changed)} {which} of the {title} sampler, but search.sampler is "
                                 f"{self.sampler!r}; set search.sampler: {name}, or drop {them}")
        return self

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, names: list[str]) -> list[str]:
        if len(names) == 1:
            raise ValueError("give two or more objectives for a multi-objective search (or use search.objective)")
        return names

    @field_validator("gpus_per_trial")
    @classmethod
    def _gpu_share(cls, share: float | None) -> float | None:
        if share is not None and share > 1 and share != int(share):
            raise ValueError("Ray shares a GPU only in fractions below 1; above 1 give a whole number of GPUs")
        return share

    @field_validator("storage")
    @classmethod
    def _study_url(cls, url: str) -> str:
        return check_study_url(url)

    @field_validator("objective_patterns")
    @classmethod
    def _patterns(cls, patterns: list[str] | None) -> list[str] | None:
        return None if patterns is None else [parse_pattern(p).name for p in patterns]

    @property
    def mode(self) -> str:
        return objective_mode(self.objective)


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str = "runs/experiment"
    # Shared storage for an experiment's results, Ray Tune state, checkpoints and nested Ray Train
    # runs: <storage>/<experiment name> (a path, an NFS mount, s3://...; search/storage.py).
    # Empty: the experiment directory, which is right on one machine.
    storage: str = ""
    # Per-pattern gauges to Ray's metrics endpoint while a search runs (search/live_metrics.py);
    # off only to measure what publishing costs (bench/live_metrics_overhead.py).
    live_metrics: bool = True

    @field_validator("storage")
    @classmethod
    def _storage(cls, location: str) -> str:
        return check_output_storage(location)


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig)
    missing: MissingConfig = Field(default_factory=MissingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    # The checks that span sections or need the model's registry entry. Each raises one line:
    # "config key '<key>': <what is wrong> (got <value>); <what is allowed>".
    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "ExperimentConfig":
        try:
            entry = get_model(self.model.name)
        except ValueError as exc:
            raise ValueError(f"config key 'model.name': {exc}") from None
        unknown = entry.unknown_loss_terms(self.model.loss_weights)
        if unknown:
            raise ValueError(f"config key 'model.loss_weights.{unknown[0]}': not a loss term of model "
                             f"'{entry.name}' (got {unknown[0]}={self.model.loss_weights[unknown[0]]}); "
                             f"its terms are {', '.join(entry.loss_terms)}")
        bad = [k for k, w in self.model.loss_weights.items() if not 0 <= w < float("inf")]
        if bad:  # a negative weight trains its term the wrong way (adversarial terms reverse gradients already)
            raise ValueError(f"config key 'model.loss_weights.{bad[0]}': not a weight (got "
                             f"{bad[0]}={self.model.loss_weights[bad[0]]}); loss weights are finite and >= 0 "
                             "(0 turns a term off)")
        if self.missing.train_mode is None:
            self.missing.train_mode = entry.train_missing
        if entry.check_config is not None and not (info.context or {}).get("stored"):
            try:
                entry.check_config(self.model)
            except ValueError as exc:  # "model.<key>: <problem>"
                key, _, problem = str(exc).partition(": ")
                raise ValueError(f"config key '{key}': {problem}") from None
        self._check_objectives()
        self._check_distributed()
        search = self.search
        if search.scheduler == "asha" and search.asha.grace_period > self.train.epochs:
            raise ValueError(f"config key 'search.asha.grace_period': at most train.epochs "
                             f"({self.train.epochs}), the last epoch a trial runs (got {search.asha.grace_period}; "
                             "ASHA would never stop a trial: use search.scheduler: none for that)")
        if not {"trial", "stored"} & set(info.context or {}):  # both were checked when they started
            space = self.search_space()
            if self.search.scheduler == "pbt" and not any(k.startswith("model.loss_weights.")
                                                          or k == "model.adversarial.lambda_max" for k in space):
                raise ValueError("config key 'search.scheduler': pbt mutates loss weights and "
                                 "model.adversarial.lambda_max, and the search space has neither")
        return self

    def _check_objectives(self) -> None:
        grid, search = self.missing.eval_grid, self.search
        if search.objective_patterns is None:
            search.objective_patterns = default_objective_patterns(grid)
        outside = [p for p in search.objective_patterns if p not in grid]
        if outside:
            raise ValueError(f"config key 'search.objective_patterns': {', '.join(outside)} not in "
                             f"missing.eval_grid ({', '.join(grid)})")
        if not search.objective_patterns:
            raise ValueError("config key 'search.objective_patterns': needs at least one pattern")
        # The metrics of the dataset: SIMS adds acc3 (a given data.path may hold either family).
        metrics = SIMS_METRIC_NAMES if self.data.path else metric_names(self.data.preset)
        if search.objectives and search.scheduler != "none":
            raise ValueError(f"config key 'search.scheduler': a multi-objective search (search.objectives) needs "
                             f"none (got {search.scheduler}); ASHA and PBT rank trials by one metric")
        for key, names in (("search.objective", [search.objective]), ("search.objectives", search.objectives)):
            for name in names:
                try:
                    check_objective(name, metrics, grid)
                except ValueError as exc:
                    raise ValueError(f"config key '{key}': {exc}") from None

    def _check_distributed(self) -> None:
        """What Ray Train workers (train.workers >= 1), or in-process training, cannot do,
        said before anything starts (what depends on the machine: search/devices.py)."""
        train = self.train
        if train.workers == 0:
            if train.precision == "fp16":
                raise ValueError("config key 'train.precision': fp16 needs train.workers >= 1 with train.engine: "
                                 "deepspeed (its loss scaling); in-process training takes bf16 (autocast) or fp32")
            return
        if train.eval_test == "deferred":
            raise ValueError(f"config key 'train.eval_test': deferred needs in-process trials (train.workers: 0), "
                             f"whose checkpoints the search evaluates after it ends (got train.workers: "
                             f"{train.workers}); use end or improved")
        if self.search.gpus_per_trial:
            raise ValueError(f"config key 'search.gpus_per_trial': for in-process trials (train.workers: 0) only "
                             f"(got {self.search.gpus_per_trial:g} with train.workers: {train.workers}); "
                             "Ray Train workers take one GPU each")
        if train.precision == "fp16" and train.engine == "ddp":
            raise ValueError("config key 'train.precision': fp16 needs train.engine: deepspeed (loss scaling); "
                             "the ddp engine takes bf16 (autocast) or fp32")
        if train.zero_stage and train.engine == "ddp":
            raise ValueError(f"config key 'train.zero_stage': ZeRO needs train.engine: deepspeed "
                             f"(got {train.zero_stage} with ddp)")
        if self.model.adversarial.disc_steps > 1:
            raise ValueError("config key 'model.adversarial.disc_steps': > 1 is supported in-process only "
                             "(train.workers: 0): extra discriminator steps bypass the distributed engine's "
                             f"gradient sync (got {self.model.adversarial.disc_steps})")

    def search_space(self) -> dict[str, Dist]:
        """The model's registry space with the `search.space` overrides. Every dimension is
        checked by building the trial configs at its bounds (each end of a range, every choice)."""
        entry = get_model(self.model.name)
        space = dict(entry.search_space)
        if self.train.workers >= 1:
            # Extra discriminator steps exist only in-process (distributed engines sync gradients
            # through their own step); a distributed search keeps the default of 1.
            space.pop("model.adversarial.disc_steps", None)
        for key, raw in self.search.space.items():
            try:
                space[key] = Dist.parse(raw)
            except ValueError as exc:
                got = "" if "got" in str(exc) or repr(raw) in str(exc) else f" (got {raw!r})"  # e.g. an empty choice
                raise ValueError(f"config key 'search.space.{key}': {exc}{got}") from None
        for key, dist in space.items():
            if key.startswith("model.loss_weights.") and key.split(".", 2)[2] not in entry.loss_terms:
                raise ValueError(f"config key 'search.space.{key}': '{key.split('.', 2)[2]}' is not a loss term "
                                 f"of model '{entry.name}'; its terms are {', '.join(entry.loss_terms)}")
            for value in dist.samples():
                try:
                    self.with_params({key: value})
                except ConfigError as exc:
                    raise ValueError(f"config key 'search.space.{key}': value {value!r} is not a valid config "
                                     f"value ({str(exc).removeprefix('trial config: ')})") from None
        return space

    def with_params(self, params: Mapping[str, Any], stored: bool = False) -> "ExperimentConfig":
        """This config with each dotted key of `params` set: a trial's config (`stored`: one that
        ran, read back to look at its results; see STORED_CONTEXT)."""
        raw = self.model_dump(mode="json")
        for key, value in params.items():
            set_dotted(raw, key, value)
        return validate_config(raw, "trial config", context={**TRIAL_CONTEXT, **(STORED_CONTEXT if stored else {})})

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
    if not loc:  # ExperimentConfig's own checks: their message names the key
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        owner = _section_model(loc)
        allowed = ", ".join(owner.model_fields) if owner else "see the docs"
        return f"config key '{path}': unknown key; allowed keys here: {allowed}"
    got = error.get("input")
    message = error["msg"]
    if error["type"].startswith("value_error"):
        message = message.removeprefix("Value error, ")
    if "(got " in message:  # the check showed the value itself (perhaps masked: a password)
        return f"config key '{path}': {message}"
    return f"config key '{path}': {message} (got {got!r})"


def validate_config(raw: dict, source: str = "config", context: dict | None = None) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw, context=context)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """raw[a][b][c] = value for key "a.b.c", creating sections on the way."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (3, 1e-4, [a, b], true)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set '{assignment}': expected key=value, e.g. train.epochs=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set '{assignment}': value is not valid YAML ({exc.problem})") from None
    try:
        set_dotted(raw, key.strip(), parsed)
    except ConfigError as exc:
        raise ConfigError(f"--set '{assignment}': {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                stored: bool = False) -> ExperimentConfig:
    """Read a YAML config (or the defaults), apply overrides, validate. `stored`: a config an
    earlier run wrote, read to look at its results (STORED_CONTEXT)."""
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
    return validate_config(raw, source, context=STORED_CONTEXT if stored else None)
