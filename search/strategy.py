"""How a search proceeds: the Optuna searcher (and its persistent study), the trial
scheduler (ASHA, PBT or none) and the trial-epoch budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from models.space import Dist

from .config import ConfigError, ExperimentConfig
from .layout import Layout
from .objective import OBJECTIVE, objective_mode
from .space import tune_domains
from .study import storage as study_storage
from .study import uses_study


def check_strategy(cfg: ExperimentConfig) -> None:
    """What the search's scheduler cannot do with this config, said before anything starts."""
    if cfg.search.scheduler == "pbt" and cfg.train.workers >= 1:
        # Such a trial's checkpoints stay its nested Ray Train run's: Ray 2.60's TuneReportCallback
        # hands Tune their path as a metric, never a checkpoint, so PBT finds none to copy and
        # never exploits (measured: 4 trials x 4 epochs, no exploit); and a trial restarted
        # from one would go on from its own run's latest anyway (resumed by name).
        raise ConfigError(f"config key 'search.scheduler': pbt needs in-process trials (train.workers: 0, got "
                          f"{cfg.train.workers}): Tune gets no checkpoint from a trial of Ray Train workers, so PBT "
                          "could never copy one trial's weights to another; use asha or none")


def study_metric(cfg: ExperimentConfig) -> str | list[str]:
    """The reported metric(s) the study's trials are told: the objective, or one per objective."""
    return [f"{OBJECTIVE}/{name}" for name in cfg.search.objectives] if cfg.search.objectives else OBJECTIVE


def searcher(cfg: ExperimentConfig, layout: Layout, storage=None, seed: int | None = None):
    """OptunaSearch over the experiment's study (`layout.optuna_storage`, or its `storage` made
    already), at most `search.max_concurrent` trials at once; its sampler seeded with `seed`
    (default search.seed; trials added later draw with another, search/rounds.py)."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    samplers = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler,
                "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler, "nsga2": optuna.samplers.NSGAIISampler}
    sampler = samplers[cfg.search.sampler](seed=cfg.search.seed if seed is None else seed,
                                        **cfg.search.sampler_options())
    storage = storage or study_storage(layout)
    metric = study_metric(cfg)
    mode = [objective_mode(name) for name in cfg.search.objectives] if cfg.search.objectives else cfg.search.mode
    search = StudySearch(sampler=sampler, storage=storage, study_name=layout.study_name, metric=metric, mode=mode)
    return ConcurrencyLimiter(search, max_concurrent=cfg.search.max_concurrent)


class StudySearch(OptunaSearch):
    """OptunaSearch whose study keeps one trial per Tune trial through driver crashes.

    The study's database is written at once (ask, report, tell), while Tune saves which of its
    trials is which Optuna trial with the rest of its state only now and then (every ~10 s, and
    when a trial checkpoints). A driver killed in between leaves Optuna trials asked for Tune
    trials that the resumed search does not know: Tune starts them anew under new ids, whose
    `suggest` would ask new Optuna trials while the old ones stayed RUNNING for ever, the study
    counting more trials than Tune ran. Here the trials Tune starts take those over first, with
    the parameters they were sampled with. (A trial Tune saw end after its last save runs again
    from its last checkpoint; its Optuna trial ended already and keeps what it was told.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unclaimed: list[int] | None = None  # found at the first suggest of this driver

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._unclaimed = None  # what a previous driver saved is stale: look again

    def suggest(self, trial_id: str):
        known = trial_id in self._ot_trials
        if not known and self._space and not callable(self._space):
            if self._unclaimed is None:
                self._unclaimed = self._running_unclaimed()
            if self._unclaimed:
                self._ot_trials[trial_id] = self._claim(self._unclaimed.pop(0))
        config = super().suggest(trial_id)
        if not known and trial_id in self._ot_trials:  # which Tune trial it is: settle_ended_trials
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and ot_trial.storage.get_trial(ot_trial._trial_id).state.is_finished():
            # Told before a crash, then run again from its last checkpoint: it ends as it did.
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def _running_unclaimed(self) -> list[int]:
        """The study's RUNNING trials that no Tune trial of this search holds (storage ids, oldest first)."""
        held = {t._trial_id for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if t._trial_id not in held]

    def _claim(self, storage_id: int):
        import optuna

        trial = optuna.Trial(self._ot_study, storage_id)
        for name, distribution in self._space.items():
            # As Study.ask(fixed_distributions) does: a parameter already sampled is kept, one
            # the killed driver had not stored yet is sampled now.
            trial._suggest(name, distribution)
        return trial


TUNE_TRIAL_ATTR = "tune_trial_id"  # an Optuna trial's user attribute: the Tune trial it is


def settle_ended_trials(layout: Layout, cfg: ExperimentConfig, ended: dict[str, dict],
                        errored: frozenset[str] | set[str] = frozenset()) -> int:
    """Tell the study how the Tune trials in `ended` (id -> last result) and `errored` ended
    where Tune did not: when a budget (search.max_trial_epochs, search.time_budget_s) ends the
    experiment, Ray 2.60's TuneController marks the running trials terminated without calling
    the searcher's on_trial_complete, and a trial it fails outside the trial's function (an
    actor it could not reuse, say) errored, alike; their Optuna trials would stay RUNNING for
    ever (status would call them cut off, and a sampler take them as still running). Told as
    OptunaSearch tells a trial its scheduler stopped: COMPLETE with the last reported value,
    PRUNED if it reported none; an errored one FAIL. Returns how many were told."""
    from .study import load_study

    if not uses_study(cfg) or not (ended or errored):
        return 0
    study = load_study(layout)
    metric = study_metric(cfg)
    told = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tune_id = trial.user_attrs.get(TUNE_TRIAL_ATTR)
        if tune_id in errored:
            study.tell(trial.number, state=TrialState.FAIL)
            told += 1
            continue
        result = ended.get(tune_id)
        if result is None:
            continue
        values = [result.get(m) for m in metric] if isinstance(metric, list) else result.get(metric)
        if values is None or (isinstance(values, list) and None in values):
            study.tell(trial.number, state=TrialState.PRUNED)
        else:
            study.tell(trial.number, values, skip_if_finished=True)  # a NaN is told FAIL by Optuna
        told += 1
    return told


def scheduler(cfg: ExperimentConfig, space: dict[str, Dist], earlier: Sequence[tuple[str, int, float]] = ()):
    """ASHA on the objective, PBT over the schedule parameters, or None. `earlier`: (trial id,
    epoch count, objective) of every epoch of the search's earlier rounds, which ASHA's rungs
    start with."""
    from ray.tune.schedulers import PopulationBasedTraining

    if cfg.search.scheduler == "asha":
        return ContinuedASHA(time_attr="training_iteration", max_t=cfg.train.epochs,
                             grace_period=cfg.search.asha.grace_period,
                             reduction_factor=cfg.search.asha.reduction_factor, earlier=earlier)
    if cfg.search.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=cfg.search.pbt_interval,
                                       hyperparam_mutations=pbt_mutations(space))
    return None


class ContinuedASHA(ASHAScheduler):
    """ASHA whose rungs already hold the values of an earlier round's trials, so that trials
    added to a search (search/rounds.py) go on past a rung only if they beat the search's
    trials there, as they would have in one long search, not merely each other.

    The values enter where ASHA records a trial's own results (its bracket's `on_result`, one
    bracket: ASHA's default) once Tune has set the metric's direction, at the first trial."""

    def __init__(self, *args, earlier: Sequence[tuple[str, int, float]] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._earlier = list(earlier)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)  # checks that Tune set the metric and mode
        bracket = self._brackets[0]
        for trial_id, iteration, value in self._earlier:
            bracket.on_result(_EarlierTrial(trial_id), iteration, self._metric_op * value)
        self._earlier = []


@dataclass(frozen=True)
class _EarlierTrial:  # what a bracket reads of a trial: its id
    trial_id: str


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
            self.last_iteration: dict[str, int] = {}

        def __call__(self, trial_id, result):
            # When a trial's function returns, Tune passes its last result again (done=True):
            # counted once. (PBT may restore a trial to an earlier iteration: counted anew.)
            iteration = result.get("training_iteration")
            if self.last_iteration.get(trial_id) != iteration:
                self.last_iteration[trial_id] = iteration
                self.used += 1
            return False

        def stop_all(self):
            return self.used >= budget

    return TrialEpochBudget()
