"""The setup hook of the workers of a private local cluster that runs in-process Tune trials
(search/ray_setup.py: WARM_WORKERS).

Named by a string in the runtime environment and run by each worker process as it starts, so
that the imports a trial needs are done before Tune makes the trial's actor of that process.
"""
from __future__ import annotations


def import_training() -> None:
    import search.trials  # noqa: F401 (torch, the models, the training loop)
