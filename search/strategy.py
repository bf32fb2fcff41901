"""How a search proceeds: the Optuna searcher (and its persistent study), the trial
scheduler (ASHA, PBT or none) and the trial-epoch budget."""
from __future__ import annotations

from models.space import Dist

from .config import ExperimentConfig
from .layout import Layout
from .objective import OBJECTIVE, objective_mode
from .space import tune_domains
from .study import storage as study_storage


def searcher(cfg: ExperimentConfig, layout: Layout):
    """OptunaSearch over the study in `layout.optuna_db`, at most `search.max_concurrent` trials at once."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler, "nsga2": optuna.samplers.NSGAIISampler}
    sampler = samplers[cfg.search.sampler](seed=cfg.search.seed)
    storage = study_storage(layout)
    if cfg.search.objectives:
        metric = [f"{OBJECTIVE}/{name}" for name in cfg.search.objectives]
        mode = [objective_mode(name) for name in cfg.search.objectives]
    else:
        metric, mode = OBJECTIVE, cfg.search.mode
    search = OptunaSearch(sampler=sampler, storage=storage, study_name=layout.study_name, metric=metric, mode=mode)
    return ConcurrencyLimiter(search, max_concurrent=cfg.search.max_concurrent)


def scheduler(cfg: ExperimentConfig, space: dict[str, Dist]):
    """ASHA on the objective, PBT over the schedule parameters, or None."""
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if cfg.search.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs, grace_period=1,
                             reduction_factor=2)
    if cfg.search.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=cfg.search.pbt_interval,
                                       hyperparam_mutations=pbt_mutations(space))
    return None


def pbt_mutations(space: dict[str, Dist]) -> dict:
    """What PBT may change while a trial runs: loss weights and the GRL strength. A trial that
    exploits another restarts from its checkpoint with the new values (the model reads
    weights and lambda_max from its config, not from the checkpoint). ExperimentConfig checks
    that the space has some."""
    return {k: v for k, v in tune_domains(space).items()
            if k.startswith("model.loss_weights.") or k == "model.adversarial.lambda_max"}


def trial_epoch_budget(budget: int | None):
    """A Stopper that ends the whole experiment once `budget` trial-epochs were reported
    (equal budgets make searches comparable, whatever their schedulers stop early)."""
    if budget is None:
        return None
    from ray.tune import Stopper

    class TrialEpochBudget(Stopper):
        def __init__(self):
            self.used = 0

        def __call__(self, trial_id, result):
            self.used += 1
            return False

        def stop_all(self):
            return self.used >= budget

    return TrialEpochBudget()
