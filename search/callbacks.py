"""Driver-side callbacks that store what runs report: every reported epoch goes to the results
store (search/results.py) from the process that drives the run, never from the workers.

- `TrainResultsCallback` (Ray Train, in the controller of `msa-search train`): rank 0's report
  -> results store + the epoch log the CLI prints progress from; the last epoch's compacts it.
- `TuneResultsCallback` (Ray Tune, in the `msa-search tune` driver): each trial's report ->
  results store + its sampled parameters; failed trials -> failures.jsonl; a trial that ends,
  finished, stopped or failed, is compacted in the store.

Both are plain module-level classes holding only paths and the base config: Ray pickles the
Tune callbacks with the experiment and brings them back on `Tuner.restore`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ray import tune
from ray.tune.experiment import Trial
from ray.train import UserCallback

from data_pipeline.atomic import OutputWriteError, atomic_file, location_fault, writing

from .config import ExperimentConfig
from .layout import Layout
from .results import ResultsStore, RunInfo, compact_finished_trial, reported_results
from .shared_data import DATA_PRIVATE_MB


class TrainResultsCallback(UserCallback):
    def __init__(self, run_dir: Path, run_id: str, cfg: ExperimentConfig):
        self.layout = Layout(run_dir).with_config(cfg)  # results in output.storage when set
        self.run = RunInfo.of(run_dir.name, run_id, cfg)
        self.epochs = cfg.train.epochs
        # A resumed run's clock goes on from its stored rows' (none on a new run).
        self.started = time.time() - ResultsStore(self.layout.results).elapsed_s(run_id)

    def after_report(self, run_context, metrics, checkpoint):
        report = metrics[0]
        if "rows" not in report:
            return
        epoch = int(report["epoch"])
        ResultsStore(self.layout.results).append(self.run, epoch, reported_results(report),
                                                 time.time() - self.started)
        if epoch + 1 >= self.epochs:
            # The run's last epoch: Ray Train 2.60's UserCallback has no hook at the end of a
            # run (after_report and after_exception only), so its parts become one file here.
            compact_finished_trial(self.layout.results, self.run.trial_id)
        line = {"epoch": epoch, "robust_f1": report["robust_f1"], "objective": report["objective"],
                "checkpoint": checkpoint is not None,
                **{k: v for k, v in report.items() if k.startswith(("mask_fingerprint/", "time/"))},
                # Every rank's, to see that ranks on a node share one copy of the data.
                DATA_PRIVATE_MB: [m.get(DATA_PRIVATE_MB) for m in metrics],
                "losses": {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("loss/")}}
        with writing(self.layout.epoch_log), self.layout.epoch_log.open("a") as fh:
            fh.write(json.dumps(line) + "\n")


class TuneResultsCallback(tune.Callback):
    def __init__(self, exp_dir: Path, base: ExperimentConfig, earlier_trials: frozenset[str] = frozenset()):
        """earlier_trials: the trials of the search's earlier rounds (search/rounds.py), which this
        round's Tune does not know of; kept with the callback in Tune's state for a resume."""
        self.layout = Layout(exp_dir).with_config(base)  # results in output.storage when set
        self.base = base
        self.started = time.time()
        self.earlier_trials = earlier_trials

    def setup(self, **info):
        self._settled = False  # each driver, the first after a crash included, settles once
        self._params: dict[str, str] = {}  # trial id -> its params file's text

    def on_step_begin(self, iteration, trials, **info):
        if not self._settled:
            self._settled = True
            self._forget_trials_not_in(trials)

    def _forget_trials_not_in(self, trials) -> None:
        """Rows and parameters of trials that Tune does not know: reported by a trial it started
        after its last save of its state, before a crash. The resumed search starts that trial
        anew under another id (search/strategy.py hands it the same Optuna trial). Earlier rounds'
        trials are known: they ended before this round began."""
        known = {t.trial_id for t in trials} | set(getattr(self, "earlier_trials", ()))
        store = ResultsStore(self.layout.results)
        store.remove_trials_except(known)
        # A trial that ended just before the crash, its compaction not yet done: done now (one
        # listing finds them; most ended trials were compacted when they ended).
        ended = [t.trial_id for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR)]
        for trial_id in store.trials_with_parts(ended):
            compact_finished_trial(self.layout.results, trial_id)
        if self.layout.trial_params_dir.is_dir():
            for params_file in self.layout.trial_params_dir.glob("*.json"):
                if params_file.stem not in known:
                    params_file.unlink()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "rows" not in result:
            return
        # The values this epoch trained with, as the trainable reports them: Tune runs the
        # scheduler before the callbacks, and PBT, exploiting on this very result, has already
        # given the trial the values its next epochs train with (`trial.config`).
        config = result.get("config", trial.config)
        self._write_params(trial.trial_id, config)
        run = RunInfo.of(self.layout.root.name, trial.trial_id, self.base.with_params(config))
        ResultsStore(self.layout.results).append(run, int(result["epoch"]), reported_results(result),
                                                 time.time() - self.started)

    def _write_params(self, trial_id: str, config: dict) -> None:
        """The values a trial's last reported epoch trained with (export and status build its
        config from them): written at its first report, and again once it reports an epoch
        trained with PBT's values (another trial's, mutated)."""
        params_file = self.layout.trial_params(trial_id)
        text = json.dumps(config, indent=2) + "\n"
        if trial_id not in self._params and params_file.exists():  # by an earlier driver
            self._params[trial_id] = params_file.read_text()
        if self._params.get(trial_id) != text:
            # Whole or absent, should the driver be killed; a full or read-only disk stops the
            # search (Tune ends it when a callback raises), with one line naming the file.
            with writing(params_file), atomic_file(params_file, force=True) as tmp:  # PBT: replaced whole
                tmp.write_text(text)
            self._params[trial_id] = text

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Called once a trial reports no more: after its last epoch, and when the scheduler
        # stops it (ASHA; Ray 2.60's TuneController.stop_trial calls this hook for both).
        compact_finished_trial(self.layout.results, trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        compact_finished_trial(self.layout.results, trial.trial_id)
        reason = failure_reason(trial)
        # A trial failing while the experiment's disk is full or read-only (its checkpoint
        # could not be saved there): every next trial would fail alike, its results lost, so
        # the search stops here with one line saying where and why.
        state = self.layout.ray
        fault = location_fault(state) if isinstance(state, Path) else None
        try:
            with writing(self.layout.failures), self.layout.failures.open("a") as fh:
                fh.write(json.dumps({"trial_id": trial.trial_id, "params": trial.config, "reason": reason}) + "\n")
        except OutputWriteError:
            if fault is None:
                raise
        if fault is not None:
            raise OutputWriteError(f"{trial.path or state}: cannot write ({fault}); trial {trial.trial_id} failed "
                                   f"({reason or 'no reason recorded'}) and the search stops; the rows written "
                                   f"before stay readable in {self.layout.results}")


def failure_reason(trial) -> str:
    """The root cause out of a failed trial's error file (its last 'XxxError: ...' line)."""
    error_file = getattr(trial, "error_file", None)
    if not error_file or not Path(error_file).is_file():
        return ""
    lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
    causes = [line for line in lines if "Error" in line.split(":", 1)[0] or "Diverged" in line]
    return (causes[-1] if causes else lines[-1]).strip() if lines else ""
