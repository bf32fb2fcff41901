"""`msa-search tune`: Ray Tune + Optuna over the model's search space (DESIGN.md).

Each trial is an ordinary ExperimentConfig (base config + the sampled dotted keys). With
`train.workers: 0` a trial trains inside its Tune function (cheap trials); with
`train.workers >= 1` the trial function builds and fits a Ray Train TorchTrainer whose
reports reach Tune through TuneReportCallback (Ray 2.60 runs Train V2, where
`Tuner(TorchTrainer)` is not supported). Either way the same loop and the same results.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from data_pipeline.errors import MsaSearchError
from data_pipeline.loader import load_split
from data_pipeline.presets import SPLITS
from data_pipeline.source import prepare_store
from data_pipeline.store import read_spec

from .config import ExperimentConfig, load_config, objective_mode
from .results import OBJECTIVE, ResultsStore, epoch_metrics, flatten
from .space import apply_params, resolve_space, space_to_data, tune_domains
from .trainer import (EpochReport, TrainState, build_state, fit, load_state, objective_value, resolve_device,
                      save_state)

TUNE_NAME = "tune"
FAILURES = "failures.jsonl"


def study_name(exp_dir: Path) -> str:
    return f"msa-search-{exp_dir.name}"


def optuna_storage_url(exp_dir: Path) -> str:
    return f"sqlite:///{exp_dir.resolve() / 'optuna.db'}"


# --- the trial -----------------------------------------------------------------------------

def _claim_start_index(exp_dir: Path) -> int:
    """0-based order in which this trial started (for the NaN test hook): the first free
    number, claimed atomically with O_EXCL so concurrent trials never share one."""
    claims = exp_dir / ".trial-starts"
    claims.mkdir(exist_ok=True)
    n = 0
    while True:
        try:
            os.close(os.open(claims / str(n), os.O_CREAT | os.O_EXCL))
            return n
        except FileExistsError:
            n += 1


def run_trial(params: dict, base: dict, store: str) -> None:
    """Tune function trainable (train.workers = 0): train in this process, report per epoch."""
    from ray import tune

    cfg = apply_params(ExperimentConfig.model_validate(base), params)
    if cfg.search.nan_trial is not None and _claim_start_index(Path(base["output"]["dir"])) == cfg.search.nan_trial:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"inject_nan": True})})
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.search.cpus_per_trial)))
    spec = read_spec(store)
    splits = {s: load_split(store, s, spec) for s in SPLITS}
    device = resolve_device(cfg.train.device)
    state = build_state(cfg, splits["train"], device)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            load_state(state, Path(ckpt) / "state.pt")

    def on_epoch(state: TrainState, report: EpochReport) -> None:
        metrics = epoch_metrics(report, {n: objective_value(report.results, cfg, n) for n in cfg.search.objectives})
        if state.epoch % cfg.train.checkpoint_every == 0 or state.epoch == cfg.train.epochs:
            with tempfile.TemporaryDirectory() as ckpt:
                save_state(state, Path(ckpt) / "state.pt")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt))
        else:
            tune.report(metrics)

    fit(cfg, splits, device=device, state=state, on_epoch=on_epoch)


def run_distributed_trial(params: dict, base: dict, store: str) -> None:
    """Tune function trainable (train.workers >= 1): a nested Ray Train run per trial."""
    from ray import tune
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .worker import worker_loop

    cfg = apply_params(ExperimentConfig.model_validate(base), params)
    trial_id = tune.get_context().get_trial_id()
    gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "store": store, "run_id": trial_id,
                           "checkpoint_key": trial_id, "tune": True},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=trial_id, storage_path=str(Path(base["output"]["dir"]) / "trials"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


# --- the driver ------------------------------------------------------------------------------

def _results_callback(exp_dir: Path, base: ExperimentConfig):
    from ray import tune

    store = ResultsStore(exp_dir / "results")

    class ResultsCallback(tune.Callback):
        """Appends every reported epoch's rows to the results store; records failures."""

        def __init__(self):
            self.started = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "rows" not in result:
                return
            params_file = exp_dir / "trial_params" / f"{trial.trial_id}.json"
            if not params_file.exists():
                params_file.parent.mkdir(exist_ok=True)
                params_file.write_text(json.dumps(trial.config, indent=2) + "\n")
            cfg = apply_params(base, trial.config)
            store.write_report(result, experiment=exp_dir.name, trial_id=trial.trial_id, model=cfg.model.name,
                               wall_time_s=time.time() - self.started, hparams=flatten(cfg.model_dump(mode="json")))

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = ""
            error_file = getattr(trial, "error_file", None)
            if error_file and Path(error_file).is_file():
                lines = [l for l in Path(error_file).read_text().splitlines() if l.strip()]
                causes = [l for l in lines if "Error" in l.split(":", 1)[0] or "Diverged" in l]
                reason = (causes[-1] if causes else lines[-1]).strip() if lines else ""
            with (exp_dir / FAILURES).open("a") as fh:
                fh.write(json.dumps({"trial_id": trial.trial_id, "params": trial.config, "reason": reason}) + "\n")

    return ResultsCallback()


def _searcher(cfg: ExperimentConfig, exp_dir: Path):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler, "nsga2": optuna.samplers.NSGAIISampler}
    sampler = samplers[cfg.search.sampler](seed=cfg.search.seed)
    storage = optuna.storages.RDBStorage(optuna_storage_url(exp_dir))
    if cfg.search.objectives:
        metric = [f"{OBJECTIVE}/{name}" for name in cfg.search.objectives]
        mode = [objective_mode(name) for name in cfg.search.objectives]
    else:
        metric, mode = OBJECTIVE, cfg.search.mode
    search = OptunaSearch(sampler=sampler, storage=storage, study_name=study_name(exp_dir), metric=metric, mode=mode)
    return ConcurrencyLimiter(search, max_concurrent=cfg.search.max_concurrent)


def _budget_stopper(budget: int | None):
    """Ends the whole experiment once `budget` trial-epochs were reported (equal budgets
    make searches comparable, whatever their schedulers stop early)."""
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


def _scheduler(cfg: ExperimentConfig, space: dict):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if cfg.search.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs, grace_period=1,
                             reduction_factor=2)
    if cfg.search.scheduler == "pbt":
        # Schedule parameters change while a trial runs: loss weights and the GRL strength.
        # A trial that exploits another restarts from its checkpoint with the new values
        # (the model reads weights and lambda_max from its config, not from the checkpoint).
        mutable = {k: v for k, v in tune_domains(space).items()
                   if k.startswith("model.loss_weights.") or k == "model.adversarial.lambda_max"}
        if not mutable:
            raise MsaSearchError("search.scheduler: pbt needs loss weights or model.adversarial.lambda_max "
                                 "in the search space")
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=cfg.search.pbt_interval,
                                       hyperparam_mutations=mutable)
    return None


def _trainable(cfg: ExperimentConfig, exp_dir: Path, store: Path):
    from ray import tune

    base = cfg.model_dump(mode="json")
    base["output"]["dir"] = str(exp_dir)
    if cfg.search.scheduler == "pbt":
        base["train"]["checkpoint_every"] = 1  # PBT exploits through per-epoch checkpoints
    if cfg.train.workers == 0:
        fn, resources = run_trial, {"cpu": cfg.search.cpus_per_trial}
    else:
        fn, resources = run_distributed_trial, {"cpu": 0.01}  # the trial only drives its workers
    return tune.with_resources(tune.with_parameters(fn, base=base, store=str(store)), resources)


def run_experiment(cfg: ExperimentConfig | None, *, resume_dir: Path | None = None,
                   console: Console | None = None, ray_address: str | None = None) -> Path:
    """Run (or resume) an experiment; returns its directory."""
    from ray import tune

    from .distributed import ensure_ray

    console = console or Console(stderr=True, markup=False)
    if resume_dir is not None:
        exp_dir = Path(resume_dir).resolve()
        if not (exp_dir / "config.yaml").is_file() or not (exp_dir / "ray" / TUNE_NAME).is_dir():
            raise MsaSearchError(f"{exp_dir}: not an experiment to resume (no config.yaml or ray/{TUNE_NAME}/)")
        cfg = load_config(exp_dir / "config.yaml")
    else:
        exp_dir = Path(cfg.output.dir).resolve()
        if exp_dir.exists() and any(exp_dir.iterdir()):
            raise MsaSearchError(f"{exp_dir}: experiment directory exists; choose a new output.dir, or continue "
                                 f"it with: msa-search tune --resume {exp_dir}")
    space = resolve_space(cfg)  # every search-space error before Ray starts
    _scheduler(cfg, space)
    if cfg.train.workers >= 1:
        from .distributed import check_distributed_config
        check_distributed_config(cfg)
    exp_dir.mkdir(parents=True, exist_ok=True)
    if resume_dir is None:
        (exp_dir / "config.yaml").write_text(cfg.to_yaml())
        (exp_dir / "space.json").write_text(json.dumps(space_to_data(space), indent=2) + "\n")
    store = prepare_store(cfg.data, exp_dir / "data")
    ensure_ray(ray_address)
    trainable = _trainable(cfg, exp_dir, store)
    callbacks = [_results_callback(exp_dir, cfg)]
    if resume_dir is not None:
        tuner = tune.Tuner.restore(str(exp_dir / "ray" / TUNE_NAME), trainable=trainable,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False,
                                   param_space=tune_domains(space))
        # Callbacks are not part of the saved state: re-attach ours.
        tuner._local_tuner._run_config.callbacks = callbacks
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_domains(space),
            tune_config=tune.TuneConfig(
                metric=None if cfg.search.objectives else OBJECTIVE,
                mode=None if cfg.search.objectives else cfg.search.mode,
                # PBT mutates running trials' configs, which a sequential sampler cannot
                # model: it samples its initial population at random from the same space.
                search_alg=None if cfg.search.scheduler == "pbt" else _searcher(cfg, exp_dir),
                scheduler=_scheduler(cfg, space), num_samples=cfg.search.num_samples,
                max_concurrent_trials=cfg.search.max_concurrent if cfg.search.scheduler == "pbt" else None,
                time_budget_s=cfg.search.time_budget_s),
            run_config=tune.RunConfig(
                name=TUNE_NAME, storage_path=str(exp_dir / "ray"), callbacks=callbacks,
                stop=_budget_stopper(cfg.search.max_trial_epochs),
                failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
                # PBT restores a trial from another trial's checkpoint: keep them all (small
                # models); otherwise only the latest matters (resume).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if cfg.search.scheduler == "pbt" else 1),
                verbose=1),
        )
    tuner.fit()
    return exp_dir
