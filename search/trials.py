"""Tune trials: the functions Ray Tune runs, one per sampled configuration.

Each trial's config is the experiment's base config with the sampled dotted keys set
(`ExperimentConfig.with_params`). With `train.workers: 0` a trial trains in its own Tune
process (cheap trials); with `train.workers >= 1` it fits a nested Ray Train run whose
reports reach Tune through `TuneReportCallback` (Ray 2.60 runs Train V2, where
`Tuner(TorchTrainer)` is not supported). Either way the same loop reports the same metrics.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .config import TRIAL_CONTEXT, ExperimentConfig
from .evaluation_plan import ending_epochs, resolved_policy
from .layout import Layout
from .nested_runs import nested_start
from .ray_setup import torch_trainer
from .results import EpochReport, epoch_metrics
from .shared_data import DATA_PRIVATE_MB, SharedSplits
from .devices import in_process_device
from .trainer import TrainState, build_state, checkpoint_due, fit, load_state, save_state

STATE_FILE = "state.pt"  # inside a Tune checkpoint of an in-process trial


def trial_config(params: dict, base: dict) -> ExperimentConfig:
    """The trial's config; the NaN test hook (`search.nan_trial`) applies here."""
    cfg = ExperimentConfig.model_validate(base, context=TRIAL_CONTEXT).with_params(params)
    if cfg.search.nan_trial is not None and _claim_start_index(Layout(Path(cfg.output.dir))) == cfg.search.nan_trial:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"inject_nan": True})})
    return cfg


def _claim_start_index(layout: Layout) -> int:
    """0-based order in which this trial started: the first free number, claimed atomically
    with O_EXCL so concurrent trials never share one."""
    claims = layout.trial_starts
    claims.mkdir(exist_ok=True)
    n = 0
    while True:
        try:
            os.close(os.open(claims / str(n), os.O_CREAT | os.O_EXCL))
            return n
        except FileExistsError:
            n += 1


def trial_threads(cfg: ExperimentConfig) -> int:
    """Intra-op threads of an in-process trial: train.threads, else the CPUs Ray reserved for it."""
    return cfg.train.threads or max(1, int(cfg.search.cpus_per_trial))


def trial_state(cfg: ExperimentConfig, splits: dict, checkpoint) -> tuple[TrainState, torch.device]:
    """An in-process trial's state, restored from `checkpoint` (a Tune checkpoint) when given,
    and its device. The driver placed the trial (search/devices.py): cuda means Ray reserved a
    GPU share for it and made that GPU the only one this process sees; cpu means no GPU, even
    where the node has some (Ray leaves them visible to a trial that asked for none)."""
    device = in_process_device(cfg)
    state = build_state(cfg, splits["train"], device)
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            load_state(state, Path(ckpt) / STATE_FILE, device)
    return state, device


def in_process_trial(params: dict, base: dict, data: SharedSplits) -> None:
    """train.workers = 0: train in this Tune process, report (and checkpoint) every epoch."""
    from ray import tune

    cfg = trial_config(params, base)
    torch.set_num_threads(trial_threads(cfg))
    splits, data_mb = data.load_measured()  # the node's one copy in the object store, not copied
    state, device = trial_state(cfg, splits, tune.get_checkpoint())

    # A deferred test grid is evaluated after the search from a stopped trial's latest
    # checkpoint: so every epoch where ASHA may stop it is checkpointed, whatever checkpoint_every.
    stops = ending_epochs(cfg, in_search=True) if resolved_policy(cfg, in_search=True) == "deferred" else frozenset()

    def on_epoch(state: TrainState, report: EpochReport) -> None:
        metrics = {**epoch_metrics(report, cfg.search), DATA_PRIVATE_MB: data_mb}
        if checkpoint_due(state, cfg) or report.epoch in stops:
            with tempfile.TemporaryDirectory() as ckpt:
                save_state(state, Path(ckpt) / STATE_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt))
        else:
            tune.report(metrics)

    fit(cfg, splits, device=device, state=state, on_epoch=on_epoch, in_search=True)


def distributed_trial(params: dict, base: dict, data: SharedSplits) -> None:
    """train.workers >= 1: a nested Ray Train run per trial; a restarted trial goes on from the
    newest checkpoint whose epoch the search recorded (search/nested_runs.py)."""
    from ray import tune
    from ray.train import Checkpoint
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(params, base)
    trial_id = tune.get_context().get_trial_id()
    layout = Layout(Path(cfg.output.dir)).with_config(cfg)
    start = nested_start(layout, trial_id)
    torch_trainer(cfg, data=data, checkpoint_key=trial_id, name=start.name, storage_path=layout.nested_trials,
                  callbacks=[TuneReportCallback()], in_search=True,
                  start_from=None if start.start_from is None else Checkpoint(start.start_from)).fit()
