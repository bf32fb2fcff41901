"""Driver-side callbacks that store what runs report: every reported epoch goes to the results
store (search/results.py) from the process that drives the run, never from the workers.

- `TrainResultsCallback` (Ray Train, in the controller of `msa-search train`): rank 0's report
  -> results store + the epoch log the CLI prints progress from.
- `TuneResultsCallback` (Ray Tune, in the `msa-search tune` driver): each trial's report ->
  results store + its sampled parameters; failed trials -> failures.jsonl.

Both are plain module-level classes holding only paths and the base config: Ray pickles the
Tune callbacks with the experiment and brings them back on `Tuner.restore`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ray import tune
from ray.train import UserCallback

from .config import ExperimentConfig
from .layout import Layout
from .results import ResultsStore, RunInfo, reported_results
from .shared_data import DATA_PRIVATE_MB


class TrainResultsCallback(UserCallback):
    def __init__(self, run_dir: Path, run_id: str, cfg: ExperimentConfig):
        self.layout = Layout(run_dir)
        self.run = RunInfo.of(run_dir.name, run_id, cfg)
        self.started = time.time()

    def after_report(self, run_context, metrics, checkpoint):
        report = metrics[0]
        if "rows" not in report:
            return
        epoch = int(report["epoch"])
        ResultsStore(self.layout.results).append(self.run, epoch, reported_results(report),
                                                 time.time() - self.started)
        line = {"epoch": epoch, "robust_f1": report["robust_f1"], "objective": report["objective"],
                "checkpoint": checkpoint is not None,
                **{k: v for k, v in report.items() if k.startswith(("mask_fingerprint/", "time/"))},
                # Every rank's, to see that ranks on a node share one copy of the data.
                DATA_PRIVATE_MB: [m.get(DATA_PRIVATE_MB) for m in metrics],
                "losses": {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("loss/")}}
        with self.layout.epoch_log.open("a") as fh:
            fh.write(json.dumps(line) + "\n")


class TuneResultsCallback(tune.Callback):
    def __init__(self, exp_dir: Path, base: ExperimentConfig):
        self.layout = Layout(exp_dir)
        self.base = base
        self.started = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "rows" not in result:
            return
        params_file = self.layout.trial_params(trial.trial_id)
        if not params_file.exists():
            params_file.parent.mkdir(exist_ok=True)
            params_file.write_text(json.dumps(trial.config, indent=2) + "\n")
        run = RunInfo.of(self.layout.root.name, trial.trial_id, self.base.with_params(trial.config))
        ResultsStore(self.layout.results).append(run, int(result["epoch"]), reported_results(result),
                                                 time.time() - self.started)

    def on_trial_error(self, iteration, trials, trial, **info):
        with self.layout.failures.open("a") as fh:
            fh.write(json.dumps({"trial_id": trial.trial_id, "params": trial.config,
                                 "reason": failure_reason(trial)}) + "\n")


def failure_reason(trial) -> str:
    """The root cause out of a failed trial's error file (its last 'XxxError: ...' line)."""
    error_file = getattr(trial, "error_file", None)
    if not error_file or not Path(error_file).is_file():
        return ""
    lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
    causes = [line for line in lines if "Error" in line.split(":", 1)[0] or "Diverged" in line]
    return (causes[-1] if causes else lines[-1]).strip() if lines else ""
