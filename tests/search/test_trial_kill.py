"""A trial's own process SIGKILLed mid-trial (as the OOM killer or a lost node would) with
`search.max_failures: 1`: Tune restarts the trial from its last checkpoint, the experiment ends
with every trial completed, every (trial, epoch, split, pattern) row is stored exactly once, and
the Optuna study holds one COMPLETE trial per Tune trial (the retry is no new Optuna trial)."""
from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
import ray

from search.config import load_config
from search.layout import Layout
from search.results import ResultsStore
from search.tune import run_experiment
from small_grid import EVAL_GRID_SETTING

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SAMPLES, EPOCHS = 2, 3
SETTINGS = ["data.scale=0.1", f"train.epochs={EPOCHS}", "train.batch_size=32", "model.hidden_dim=32",
            "model.dim_head=16", "model.num_heads=4", "model.lnln.tokens=4", "train.device=cpu",
            "train.threads=1", "train.checkpoint_every=1", "train.eval_test=every", "search.scheduler=none",
            "search.max_concurrent=1",
            f"search.num_samples={SAMPLES}", "search.max_failures=1", EVAL_GRID_SETTING]
TRAINABLE = "ImplicitFunc"  # the Ray actor class Tune runs a function trainable (our trial) in
# CPU seconds the trial's process must spend after its first epoch was stored before it is
# killed. Between Tune storing a result and Tune taking that result's checkpoint (a `save`
# round trip to the trial) the trial waits idle; only once Tune has the checkpoint does it let
# the trial train on. A kill inside that window restarts the trial from its previous
# checkpoint (here: from scratch), which this test does not exercise.
TRAINING_AGAIN_CPU_S = 0.3


def tune_results(exp: Path) -> dict[str, list[dict]]:
    """Every trial's results as Tune logged them (its result.json), in order."""
    found = {}
    for path in Path(Layout(exp).tune_state()).glob("*/result.json"):
        complete = path.read_text().split("\n")[:-1]  # a line being written has no newline yet
        results = [json.loads(line) for line in complete if line.strip()]
        if results:
            found[results[0]["trial_id"]] = results
    return found


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class TrialKiller(threading.Thread):
    """From the test, never the product: once the first trial's first (checkpointed) epoch is in
    the results store and the trial trains again, SIGKILL the trial's own process, found by the
    pid Tune reports with every result."""

    def __init__(self, exp: Path, timeout: float = 300):
        super().__init__(daemon=True)
        self.exp, self.deadline = exp, time.time() + timeout
        self.trial_id: str | None = None
        self.pid: int | None = None
        self.epochs_stored: list[int] = []  # the trial's epochs in the results store at the kill
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._kill()
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc

    def _wait(self, what: str, found):
        while time.time() < self.deadline:
            value = found()
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what}")

    def _kill(self) -> None:
        store = ResultsStore(Layout(self.exp).results)

        def first_stored_trial():
            df = store.read()
            return next(iter(sorted(set(df[df.epoch == 0].trial_id))), None)

        self.trial_id = self._wait("a trial's first epoch in the results store", first_stored_trial)
        self.pid = self._wait("Tune's log of that epoch",
                              lambda: tune_results(self.exp).get(self.trial_id, [{}])[0].get("pid"))
        process = psutil.Process(self.pid)
        # The trial's own Ray actor, in this test's private cluster (not another run's on this machine).
        assert process in psutil.Process().children(recursive=True), "the trial runs in this test's Ray"
        assert TRAINABLE in " ".join(process.cmdline()), process.cmdline()
        idle = cpu_s(process)
        self._wait("the trial to train its next epoch", lambda: cpu_s(process) - idle >= TRAINING_AGAIN_CPU_S)
        df = store.read()
        self.epochs_stored = sorted(set(df[df.trial_id == self.trial_id].epoch))
        process.send_signal(signal.SIGKILL)


def load_study(exp: Path) -> optuna.Study:
    layout = Layout(exp)
    return optuna.load_study(study_name=layout.study_name, storage=layout.optuna_storage)


def test_killed_trial_continues_from_its_checkpoint_with_no_gap_and_no_duplicate(tmp_path, local_ray):
    exp = tmp_path / "exp"
    cfg = load_config(ROOT / "configs" / "lnln_quick.yaml", [*SETTINGS, f"output.dir={exp}"])
    killer = TrialKiller(exp)
    killer.start()
    outcome = run_experiment(cfg)
    killer.join(timeout=30)
    assert killer.error is None, repr(killer.error)
    assert 0 in killer.epochs_stored and len(killer.epochs_stored) < EPOCHS, "killed mid-trial, after its first epoch"

    assert dict(outcome.trials) == {"completed": SAMPLES}, (dict(outcome.trials), outcome.first_failure)
    assert not Layout(exp).failures.exists(), Layout(exp).failures.read_text()

    # Tune restarted the killed trial in a new process from the checkpoint of its last stored
    # epoch: it reported each epoch once, in order, none of them twice.
    logged = tune_results(exp)
    assert len(logged) == SAMPLES and killer.trial_id in logged
    results = logged[killer.trial_id]
    assert [r["epoch"] for r in results] == list(range(EPOCHS))
    assert [r["training_iteration"] for r in results] == list(range(1, EPOCHS + 1))
    before = [r for r in results if r["pid"] == killer.pid]
    after = results[len(before):]
    assert 1 <= len(before) < EPOCHS and results[:len(before)] == before, "the kill came mid-trial"
    assert len({r["pid"] for r in after}) == 1 and after[0]["pid"] != killer.pid
    assert [r["iterations_since_restore"] for r in after] == list(range(1, len(after) + 1))
    assert results[-1]["iterations_since_restore"] < EPOCHS, "restored from its checkpoint, not started over"
    for trial_id, others in logged.items():
        if trial_id != killer.trial_id:
            assert len({r["pid"] for r in others}) == 1 and [r["epoch"] for r in others] == list(range(EPOCHS))

    # The results store: every (trial, epoch, split, pattern) exactly once.
    df = ResultsStore(Layout(exp).results).read()
    key = ["trial_id", "epoch", "split", "pattern"]
    assert not df.duplicated(key).any()
    expected = set(itertools.product(logged, range(EPOCHS), ("valid", "test"), cfg.missing.eval_grid))
    assert set(map(tuple, df[key].itertuples(index=False))) == expected
    assert len(df) == SAMPLES * EPOCHS * 2 * len(cfg.missing.eval_grid)

    # The study: one COMPLETE Optuna trial per Tune trial (the retry asked for no new one), told
    # the trial's last objective, with one intermediate value per epoch.
    study = load_study(exp)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * SAMPLES
    for trial_id, results in logged.items():
        params = json.loads(Layout(exp).trial_params(trial_id).read_text())
        matching = [t for t in study.trials if t.params == params]
        assert len(matching) == 1, (trial_id, params, [t.params for t in study.trials])
        assert matching[0].value == pytest.approx(results[-1]["objective"])
        assert matching[0].intermediate_values == pytest.approx(
            {r["training_iteration"]: r["objective"] for r in results})
