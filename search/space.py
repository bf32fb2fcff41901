"""The search space of an experiment: the model's registry space, overridden by
`search.space`, validated against ExperimentConfig before anything starts, and turned into
Ray Tune domains. A trial's hyperparameters are dotted config keys, so a trial's config is
an ordinary ExperimentConfig (and `export` writes one back)."""
from __future__ import annotations

import copy
from typing import Any

from data_pipeline.errors import MsaSearchError
from models.registry import Dist, get_model

from .config import ConfigError, ExperimentConfig, validate_config


class SearchSpaceError(MsaSearchError):
    pass


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def apply_params(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The trial's config: `base` with each dotted key of `params` set."""
    raw = base.model_dump(mode="json")
    for key, value in params.items():
        set_dotted(raw, key, value)
    return validate_config(raw, "trial config")


def _samples(dist: Dist) -> list[Any]:
    return list(dist.choices) if dist.kind == "choice" else [dist.low, dist.high]


def resolve_space(cfg: ExperimentConfig) -> dict[str, Dist]:
    """Registry space + overrides, each key checked by building a config with its extremes."""
    entry = get_model(cfg.model.name)
    space = dict(entry.search_space)
    if cfg.train.workers >= 1:
        # Extra discriminator steps exist only in-process (distributed engines sync gradients
        # through their own step); a distributed search keeps the default of 1.
        space.pop("model.adversarial.disc_steps", None)
    for key, raw in cfg.search.space.items():
        try:
            dist = Dist.parse(raw)
        except ValueError as exc:
            raise SearchSpaceError(f"search.space.{key}: {exc}") from None
        space[key] = dist
    for key, dist in space.items():
        if key.startswith("model.loss_weights."):
            term = key.split(".", 2)[2]
            if term not in entry.loss_terms:
                raise SearchSpaceError(f"search.space.{key}: '{term}' is not a loss term of model "
                                       f"'{entry.name}'; its terms are {', '.join(entry.loss_terms)}")
        for value in _samples(dist):
            try:
                apply_params(cfg, {key: value})
            except ConfigError as exc:
                raise SearchSpaceError(f"search.space.{key}: value {value!r} is not a valid config value "
                                       f"({str(exc).removeprefix('trial config: ')})") from None
    return space


def tune_domains(space: dict[str, Dist]) -> dict[str, Any]:
    from ray import tune

    def domain(d: Dist):
        if d.kind == "uniform":
            return tune.uniform(d.low, d.high)
        if d.kind == "loguniform":
            return tune.loguniform(d.low, d.high)
        if d.kind == "int":
            return tune.randint(int(d.low), int(d.high) + 1)  # randint's upper bound is exclusive
        return tune.choice(list(d.choices))

    return {key: domain(d) for key, d in space.items()}


def space_to_data(space: dict[str, Dist]) -> dict[str, Any]:
    return {key: d.to_data() for key, d in copy.deepcopy(space).items()}
