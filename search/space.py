"""The search space as Ray Tune sees it. The space itself (the model's registry space with
the `search.space` overrides, every dimension checked) is `ExperimentConfig.search_space()`;
a trial's hyperparameters are its dotted config keys, so a trial's config is an ordinary
ExperimentConfig (`ExperimentConfig.with_params`) and `export` writes one back."""
from __future__ import annotations

from typing import Any

from models.space import Dist


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
    return {key: d.to_data() for key, d in space.items()}
