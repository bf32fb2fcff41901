"""`msa-search tune`: the Ray Tune driver (DESIGN.md).

Prepares the experiment directory (search/layout.py) and the data, then runs the trials of
search/trials.py under the searcher, scheduler and budget of search/strategy.py, while
search/callbacks.py stores every reported epoch; under `train.eval_test: deferred`,
search/deferred_test.py then evaluates the test grid of the best trials that stopped early.
`--resume` continues an interrupted experiment with `Tuner.restore` and the same Optuna study;
`--add-trials` adds a round of trials to it, a Tune experiment of its own (search/rounds.py).
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import MsaSearchError
from data_pipeline.source import prepare_store

from .config import ExperimentConfig, load_config
from . import interrupt
from .console_view import showing
from .deferred_test import DeferredTests, evaluate_deferred_tests, owed_tests
from .devices import place, visible_gpus
from .driver_presence import driver_marked, driver_state
from .layout import Layout
from .objective import OBJECTIVE
from .ray_output import ray_output_to
from .ray_setup import cluster_of, ensure_ray
from .results import ResultsStore, compact_finished_trial
from .rounds import Round, add_round, check_can_add, ended_results, search_rounds
from .run import new_run_dir
from .shared_data import SharedSplits, share_splits
from .space import space_to_data, tune_domains
from .strategy import check_strategy, scheduler, searcher, settle_ended_trials, trial_epoch_budget
from .storage import check_location, exists, probe_study
from .study import asked_trials, study_names, uses_study
from .study import storage as study_storage
from .trials import distributed_trial, in_process_trial


@dataclass
class SearchOutcome:
    exp_dir: Path
    trials: Counter = field(default_factory=Counter)  # completed / stopped early / errored
    first_failure: str | None = None  # the reason of the first errored trial
    deferred_tests: DeferredTests = field(default_factory=DeferredTests)  # train.eval_test: deferred
    interrupted: bool = False  # Ctrl-C: Tune saved its state and returned early (search/interrupt.py)
    nothing_to_run: bool = False  # resumed after every trial had ended: read back, Ray not started

    @property
    def any_completed(self) -> bool:
        return self.trials["completed"] + self.trials["stopped early"] > 0


def run_experiment(cfg: ExperimentConfig | None, *, resume_dir: Path | None = None,
                   ray_address: str | None = None, verbose: bool = False,
                   add_trials: int | None = None) -> SearchOutcome:
    """Run (or resume) an experiment. Every error a config can cause is raised before Ray starts
    (on a cluster to join, the device decision's just after joining) and before anything is written.

    The console shows the live view (search/console_view.py) on stderr; Ray's and Optuna's own
    output goes to EXP/logs/ray.log, and with `verbose` to the console as well.

    `add_trials` (with `resume_dir`): that many more trials on the experiment's study, once what
    it left unfinished has run (search/rounds.py)."""
    if add_trials is not None and resume_dir is None:
        raise MsaSearchError("--add-trials adds trials to an experiment: give it with --resume EXP")
    if resume_dir is not None:
        layout, cfg = _experiment_to_resume(Path(resume_dir).resolve())
        if add_trials is not None:
            check_can_add(layout, cfg, add_trials)
        elif (ended := _ended_search(layout, cfg)) is not None:
            return ended
    else:
        layout = _new_experiment(cfg)
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(layout.root)})})
    space = cfg.search_space()
    check_strategy(cfg)
    # Decided before anything is written: a refusal leaves no half-made experiment directory.
    placement = place(cfg, cluster_of(ray_address), visible_gpus(), tune=True)
    if add_trials is not None:
        add_round(layout, cfg, add_trials)
    if resume_dir is None:
        with new_run_dir(layout.root):  # data refused: no half-made experiment directory is left
            # config.yaml keeps train.device as written (a resume may run on another cluster).
            layout.config.write_text(cfg.to_yaml())
            layout.space.write_text(json.dumps(space_to_data(space), indent=2) + "\n")
            store = prepare_store(cfg.data, layout.data)
    else:
        store = prepare_store(cfg.data, layout.data)
    with driver_marked(layout), ray_output_to(layout.ray_log, verbose=verbose) as ray_warnings, \
            showing(sys.stderr, ray_warnings), ThreadPoolExecutor(1, thread_name_prefix="study-storage") as pool:
        # A new study database takes ~1-3 s (Optuna's schema, in SQLAlchemy): made while Ray starts.
        import optuna  # noqa: F401 (here, not first in the thread beside Ray's imports)
        storage = pool.submit(study_storage, layout) if uses_study(cfg) else None
        # A private cluster starts here (a joined one was joined by cluster_of(), before the log
        # existed); its workers import the training code as they start for in-process trials.
        ensure_ray(ray_address, warm_workers=cfg.train.workers == 0)
        for line in placement.warnings:
            warn(line)
        cfg = placement.apply(cfg)
        # One read-only copy of the splits per node, in Ray's object store (search/shared_data.py).
        data = share_splits(store)
        interrupt.reset()
        results = _run_rounds(cfg, layout, space, _trainable(cfg, data), storage, resume=resume_dir is not None)
        outcome = _outcome(layout, cfg, results)
        outcome.interrupted = interrupt.interrupted()
        if not outcome.interrupted:  # a search cut short goes on with `--resume`, its test grids then
            outcome.deferred_tests = evaluate_deferred_tests(layout, cfg, results, data, trial_resources(cfg))
    return outcome


def _ended_search(layout: Layout, cfg: ExperimentConfig) -> SearchOutcome | None:
    """The outcome of a search with nothing left to run (every round's trials ended, no
    deferred test grid owed), without starting Ray (10-20 s) to find that out."""
    results = ended_results(layout, cfg)
    if results is None:
        return None
    if owed_tests(layout, cfg):  # evaluated (or each skipped with its reason) the usual way
        return None
    outcome = _outcome(layout, cfg, results)
    outcome.nothing_to_run = True
    return outcome


def _run_rounds(cfg: ExperimentConfig, layout: Layout, space: dict, trainable, storage: Future | None, *,
                resume: bool) -> list:
    """Every round of the search (search/rounds.py) in order: those finished are read, the newest
    that Tune saved is restored and run to its end, and the rounds after it start. Returns
    Tune's results of all of them; stops after a round that was interrupted."""
    from ray import tune

    rounds = search_rounds(layout, cfg)
    saved = [r.index for r in rounds if resume and tune.Tuner.can_restore(str(layout.tune_state(r.index)))]
    # No round saved (a driver killed before it made the first Tuner): round 0 starts over, on
    # the same study. (Killed after, before Tune first saved its state, Tune itself starts over.)
    newest = max(saved, default=None)
    results: list = []
    for round_ in rounds:
        if newest is not None and round_.index < newest:  # finished before the newest began
            results += list(_restored(layout, round_, trainable, space).get_results())
            continue
        if round_.index == newest:
            tuner = _restored(layout, round_, trainable, space)
        else:
            tuner = _tuner(cfg, layout, space, trainable, storage, round_, earlier=results)
        results += list(tuner.fit())
        if interrupt.interrupted():
            break
        _settle_round(layout, cfg, round_)
    return results


def _settle_round(layout: Layout, cfg: ExperimentConfig, round_: Round) -> None:
    """What Tune leaves undone where a budget (search.max_trial_epochs, search.time_budget_s)
    ended a round: Ray 2.60's TuneController then marks its running trials terminated without
    the hooks of a trial's end (and a trial it fails outside its function, errored), so their
    Optuna trials are told here (search/strategy.py: settle_ended_trials) and their rows
    compacted. Read from the state Tune saved as the round ended (an interrupted round's
    cut-off trials are saved running, and go on on `--resume`)."""
    from ray import tune
    from ray.tune.utils import flatten_dict

    try:
        trials = tune.ExperimentAnalysis(str(layout.tune_state(round_.index))).trials
        ended = {t.trial_id: flatten_dict(t.last_result or {}) for t in trials if t.status == "TERMINATED"}
        settle_ended_trials(layout, cfg, ended, errored={t.trial_id for t in trials if t.status == "ERROR"})
    except Exception as exc:  # noqa: BLE001 (the search's results stand; only the study's bookkeeping is behind)
        warn(f"{layout.root}: trials that Tune ended without telling the study may stay RUNNING in it ({exc})")
        return
    for trial_id in ResultsStore(layout.results).trials_with_parts(ended):
        compact_finished_trial(layout.results, trial_id)


def _restored(layout: Layout, round_: Round, trainable, space: dict):
    from ray import tune

    # Ray keeps the run config, our callbacks included, in the experiment's state.
    return tune.Tuner.restore(str(layout.tune_state(round_.index)), trainable=trainable, resume_unfinished=True,
                              resume_errored=False, restart_errored=False, param_space=tune_domains(space))


def _rung_history(results) -> list[tuple[str, int, float]]:
    """(trial id, epoch count, objective) of every epoch earlier rounds' trials reported: the
    rungs an added round's ASHA starts with."""
    history = []
    for result in results:
        df = result.metrics_dataframe
        if df is None or OBJECTIVE not in df or "trial_id" not in df:
            continue
        for trial_id, iteration, value in zip(df["trial_id"], df["training_iteration"], df[OBJECTIVE]):
            if math.isfinite(value):
                history.append((str(trial_id), int(iteration), float(value)))
    return history


def warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # before the view starts: plain stderr


def _tuner(cfg: ExperimentConfig, layout: Layout, space: dict, trainable, storage: Future | None, round_: Round, *,
           earlier: list):
    """A new Tune experiment for one round of the search; `earlier`: Tune's results of the rounds
    before it (their trials' rows stay, and ASHA's rungs start with their epochs)."""
    from ray import tune

    from .callbacks import TuneResultsCallback
    from .console_view import ConsoleView
    from .live_metrics import LiveMetricsCallback

    history = _rung_history(earlier)
    shown = cfg.model_copy(update={"search": cfg.search.model_copy(update={"num_samples": round_.trials})})
    earlier_trials = frozenset(str(r.metrics["trial_id"]) for r in earlier if r.metrics and "trial_id" in r.metrics)
    callbacks = [TuneResultsCallback(layout.root, cfg, earlier_trials),
                 ConsoleView(layout.root.name, shown, str(layout.ray_log), added=round_.index > 0)]
    if cfg.output.live_metrics:
        values = [value for _, _, value in history]
        best = (max if cfg.search.mode == "max" else min)(values) if values and not cfg.search.objectives else None
        states = Counter("error" if r.error is not None else "terminated" for r in earlier)
        callbacks.append(LiveMetricsCallback(layout.root.name, cfg, earlier_best=best, earlier_states=states))
    multi = bool(cfg.search.objectives)
    return tune.Tuner(
        trainable,
        param_space=tune_domains(space),
        tune_config=tune.TuneConfig(
            metric=None if multi else OBJECTIVE, mode=None if multi else cfg.search.mode,
            search_alg=searcher(cfg, layout, storage.result(), seed=round_.sampler_seed(cfg)) if uses_study(cfg)
            else None,
            scheduler=scheduler(cfg, space, earlier=history), num_samples=round_.trials,
            max_concurrent_trials=cfg.search.max_concurrent if cfg.search.scheduler == "pbt" else None,
            time_budget_s=cfg.search.time_budget_s,
            # A new in-process trial runs in the process of one that ended (every trial asks for
            # the same resources): no process start and imports per trial (bench/search_overhead.py).
            # Not a distributed trial's: its Ray Train run is still shutting down when Tune
            # resets the actor (Tune waits 2 s, TUNE_FUNCTION_THREAD_TIMEOUT_S), and the next
            # trial then fails ("Trainable runner reuse requires reset_config()").
            reuse_actors=cfg.train.workers == 0),
        run_config=tune.RunConfig(
            name=round_.name, storage_path=str(layout.ray),
            callbacks=callbacks,
            stop=trial_epoch_budget(cfg.search.max_trial_epochs),
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            # PBT restores a trial from another trial's checkpoint: keep them all (small
            # models); otherwise only the latest matters (resume).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if cfg.search.scheduler == "pbt" else 1),
            # Ray's tables are printed; search/ray_output.py sends them to the log unless --verbose.
            verbose=1),
    )


def _new_experiment(cfg: ExperimentConfig) -> Layout:
    layout = Layout(Path(cfg.output.dir).resolve()).with_config(cfg)
    if layout.root.exists() and any(layout.root.iterdir()):
        raise MsaSearchError(f"{layout.root}: experiment directory exists; choose a new output.dir, or continue "
                             f"it with: msa-search tune --resume {layout.root}")
    _check_storage(layout, new=True)
    return layout


def _check_storage(layout: Layout, *, new: bool) -> None:
    """Shared storage and the study's database reachable, and (for a new experiment) not
    holding another experiment of the same name: before Ray starts, before anything is written."""
    if layout.storage:
        check_location(layout.storage, new=new, resume_hint=f"msa-search tune --resume {layout.root}")
    if layout.study_url:
        probe_study(layout.study_url)
        if new and layout.study_name in study_names(layout):
            raise MsaSearchError(f"search.storage: {layout.study_location} holds a study '{layout.study_name}' "
                                 f"already; choose another output.dir name, or continue that experiment with: "
                                 f"msa-search tune --resume {layout.root}")


def _experiment_to_resume(exp_dir: Path) -> tuple[Layout, ExperimentConfig]:
    layout = Layout(exp_dir)
    if not layout.config.is_file():
        raise MsaSearchError(f"{exp_dir}: not an experiment to resume (no {layout.config.name})")
    cfg = load_config(layout.config)
    layout = layout.with_config(cfg)
    if driver_state(layout) == "running":  # two drivers would restore, and run, the same trials
        raise MsaSearchError(f"{exp_dir}: its search is running (a driver on this host marks {layout.driver}); "
                             "wait for it to end, or stop it (Ctrl-C), then resume")
    _check_storage(layout, new=False)
    recorded = Path(cfg.output.dir)
    if recorded.is_absolute() and recorded != exp_dir:
        # Ray's saved state (trials, callbacks) points at the old place: resuming here would
        # write part of the results there.
        raise MsaSearchError(f"{exp_dir}: this experiment was started in {recorded}; resume it there "
                             "(move the directory back)")
    search_rounds(layout, cfg)  # a damaged rounds file is refused here too
    asked = asked_trials(layout)  # a locked or corrupt study is refused here, before Ray starts
    # No Tune state and no trial asked: the driver was killed before it made the Tuner, and the
    # search starts over (_tuner). Trials asked without Tune's state: it is not where it should be.
    if not exists(layout.tune_state()) and (asked or not layout.is_experiment):
        raise MsaSearchError(f"{exp_dir}: not an experiment to resume (no Ray Tune state in {layout.tune_state()})")
    return layout, cfg


def _trainable(cfg: ExperimentConfig, data: SharedSplits):
    from ray import tune

    base = cfg.model_dump(mode="json")
    if cfg.search.scheduler == "pbt":
        base["train"]["checkpoint_every"] = 1  # PBT exploits through per-epoch checkpoints
    fn = in_process_trial if cfg.train.workers == 0 else distributed_trial
    return tune.with_resources(tune.with_parameters(fn, base=base, data=data), trial_resources(cfg))


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What Ray reserves for a trial of the placed config (search/devices.py)."""
    if cfg.train.workers == 0:
        return {"cpu": cfg.search.cpus_per_trial, "gpu": cfg.search.gpus_per_trial}
    # The trial only drives its Ray Train workers, which take their own. No CPU at all: with
    # even 0.01 each, a worker group asking for every CPU of a node never fits (Ray reserves
    # whole bundles) and the search waited forever; a bundle needs some resource: 1 MiB of memory.
    return {"cpu": 0, "memory": 2**20}


def _outcome(layout: Layout, cfg: ExperimentConfig, grid) -> SearchOutcome:
    """Trials by how they ended: completed (every epoch), stopped early (by the scheduler or
    the budget), errored."""
    outcome = SearchOutcome(layout.root)
    for result in grid:
        if result.error is not None:
            outcome.trials["errored"] += 1
        elif int((result.metrics or {}).get("epoch", -1)) + 1 >= cfg.train.epochs:
            outcome.trials["completed"] += 1
        else:
            outcome.trials["stopped early"] += 1
    if outcome.trials["errored"]:
        recorded = layout.failures.read_text().splitlines() if layout.failures.is_file() else []
        reasons = [json.loads(line)["reason"] for line in recorded]
        errors = [str(r.error).strip().splitlines()[-1] for r in grid if r.error is not None]
        outcome.first_failure = next((r for r in reasons if r), errors[0] if errors else None)
    return outcome
